"""Server memory under clients that never read what it sends (README "Limits").

    python -m scripts.slow_readers [--clients 20] [--seconds 60] [--event list|item]

    python -m server --port P --llm none --stt none --tts none   (spawned; killed by pid)
    N × RawClient ── connect with a 4 KB receive buffer, never read, send events at
                     --rate a second, each answered by the server ──▶ server
    every second: VmRSS of the server process (its sandbox children are apart)

``list`` sends ``session.characters.list`` (each answered with the listed
characters, ~1 KB); ``item`` sends ``conversation.item.create`` with --item-bytes
of text (echoed back in ``conversation.item.created``). A client the server cuts
off connects again at once: N clients are present throughout. The run stops early
should the server's RSS pass --max-rss-mb (it then reports that). Prints the RSS
every 5 s, then --settle s after the clients left (with the sessions still open
then), and a last line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.measure import REPO, free_port, rss_mb
from scripts.raw_ws import RawClient


@dataclass
class Tally:
    sent: int = 0
    connections: int = 0
    cut_off: int = 0
    """Connections the server ended while the client was still sending."""
    refused: int = 0
    rss_mb: list[float] = field(default_factory=list)


async def spawn_server(port: int, log_level: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
        "--llm", "none", "--stt", "none", "--tts", "none", "--log-level", log_level,
        cwd=REPO,
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/v1/health") as response:
                    if response.status == 200:
                        return process
            await asyncio.sleep(0.1)
    process.kill()
    await process.wait()
    raise RuntimeError(f"the server did not come up on port {port}")


def event_text(kind: str, item_bytes: int) -> str:
    if kind == "list":
        return json.dumps({"type": "session.characters.list"})
    return json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "x" * item_bytes}]}})


async def slow_reader(port: int, text: str, rate: float, until: float, tally: Tally) -> None:
    """Connect, never read, send ``text`` ``rate`` times a second; again when cut off."""
    while time.monotonic() < until:
        try:
            client = await RawClient.connect("127.0.0.1", port)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            tally.refused += 1
            await asyncio.sleep(0.5)
            continue
        tally.connections += 1
        try:
            while time.monotonic() < until:
                async with asyncio.timeout(until - time.monotonic()):
                    await client.send_text(text)
                tally.sent += 1
                if rate:
                    await asyncio.sleep(1 / rate)
        except (ConnectionError, OSError):
            tally.cut_off += 1
        except TimeoutError:
            pass  # the end of the run, in the middle of a send the server did not take
        finally:
            client.abort()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = await spawn_server(port, args.log_level)
    tally = Tally()
    try:
        await asyncio.sleep(1)
        start_mb = rss_mb(server.pid)
        started = time.monotonic()
        until = started + args.seconds
        text = event_text(args.event, args.item_bytes)
        clients = [asyncio.create_task(slow_reader(port, text, args.rate, until, tally))
                   for _ in range(args.clients)]
        print(f"server pid {server.pid}, RSS at start {start_mb:.0f} MB; "
              f"{args.clients} clients sending {args.event} events for {args.seconds:g} s")
        stopped_early = False
        while time.monotonic() < until:
            await asyncio.sleep(1)
            tally.rss_mb.append(rss_mb(server.pid))
            second = len(tally.rss_mb)
            if second % 5 == 0:
                print(f"  {second:4d} s  RSS {tally.rss_mb[-1]:7.0f} MB  sent {tally.sent}  "
                      f"connections {tally.connections}  cut off {tally.cut_off}", flush=True)
            if tally.rss_mb[-1] > args.max_rss_mb:
                print(f"  RSS passed {args.max_rss_mb} MB: stopping early")
                stopped_early = True
                break
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.sleep(args.settle)  # the clients left: what does the server keep?
        end_mb = rss_mb(server.pid)
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/v1/health") as response:
            sessions_left = (await response.json()).get("sessions", {}).get("active")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(server.wait(), 20)
        except TimeoutError:
            os.kill(server.pid, signal.SIGKILL)
            await server.wait()
    return {
        "clients": args.clients, "seconds": args.seconds, "event": args.event,
        "rate_per_client": args.rate, "stopped_early": stopped_early,
        "rss_start_mb": round(start_mb), "rss_peak_mb": round(max(tally.rss_mb, default=0)),
        "rss_end_of_run_mb": round(tally.rss_mb[-1]) if tally.rss_mb else None,
        "rss_after_clients_left_mb": round(end_mb), "sessions_left": sessions_left,
        "events_sent": tally.sent, "connections": tally.connections,
        "cut_off_by_server": tally.cut_off, "refused": tally.refused,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.slow_readers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--event", choices=("list", "item"), default="list")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="events a second per client; 0: as fast as the server reads")
    parser.add_argument("--item-bytes", type=int, default=1_000_000)
    parser.add_argument("--max-rss-mb", type=float, default=3000.0)
    parser.add_argument("--log-level", default="WARNING", help="the server's")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait after the clients left before the last reading "
                             "(aiohttp keeps a closed WebSocket, and the frames it had not "
                             "handed over, until its heartbeat timer fires: up to 30 s)")
    result = asyncio.run(run(parser.parse_args(argv)))
    print(f"server RSS: {result['rss_start_mb']} MB at start, peak {result['rss_peak_mb']} MB "
          f"with {result['clients']} slow readers, {result['rss_after_clients_left_mb']} MB "
          "after they left")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
