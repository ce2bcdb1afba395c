"""The phases in the order they run: every fault on every backend, every sandbox
fault, the embedded models' workers killed and stopped, and ``python -m server``
stopped with SIGTERM while its sessions talk."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

from scripts.chaos.injectors import backend_injector, sandbox_injector
from scripts.chaos.phase import Row, format_row, run_phase
from scripts.chaos.players import Player, answer, open_players, select
from scripts.chaos.stage import EMBEDDED_TURN_BOUND, REPO, Stage
from server.app import LLM_BACKEND, SPEECH
from server.backends.embedded import llm as embedded_llm
from tests.fakes.fault_proxy import Cut, Fault, Latency, Refuse, Reset, Stall
from tests.fault_checks import codes, descendants, eventually, pid_alive, speak, status

MIDWAY = {"llm": 1000, "tts": 30_000}
FAULTS: dict[str, Callable[[int], Fault]] = {
    "latency": lambda midway: Latency(0.1),
    "stall": lambda midway: Stall(midway),
    "cut": lambda midway: Cut(midway),
    "reset": lambda midway: Reset(midway),
    "refused": lambda midway: Refuse(),
}
SANDBOX_FAULTS = ["kill-load", "kill-list", "kill-prompt", "kill-tool", "stop"]


def wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.only or any(part in name for part in args.only.split(","))


async def backend_phases(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    for backend in ("llm", "tts", "stt"):
        for kind, make in FAULTS.items():
            name = f"{backend}-{kind}"
            if not wanted(args, name):
                continue
            fault = make(MIDWAY.get(backend, 0))

            async def play(players: list[Player], spoken: bool = backend == "stt") -> None:
                await asyncio.gather(*(player.spoken_turns(args.turns) if spoken
                                       else player.text_turns(args.turns)
                                       for player in players))

            rows.append(await run_phase(stage, name, args, play,
                                        backend_injector(stage, backend, fault, args.rounds)))
            print(format_row(rows[-1]), flush=True)


async def sandbox_phases(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    for kind in SANDBOX_FAULTS:
        name = f"sandbox-{kind}"
        if not wanted(args, name):
            continue

        async def setup(players: list[Player]) -> None:
            for player in players:
                mark = len(player.session.events)
                await player.session.send({"type": "session.characters.reload",
                                           "directory": str(stage.root / "cast")})
                await answer(player.session, mark, ("session.characters.reloaded", "error"))
                await select(player.session, "Tired")

        async def play(players: list[Player]) -> None:
            await asyncio.gather(*(player.text_turns(args.turns) for player in players))

        rows.append(await run_phase(stage, name, args, play,
                                    sandbox_injector(stage, kind, args.rounds), setup))
        print(format_row(rows[-1]), flush=True)


async def embedded_phase(root: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    """The embedded model's worker killed mid-reply, the STT workers mid-stream."""
    stage = Stage(root, turn_bound=EMBEDDED_TURN_BOUND)
    await stage.start_server(llm="embedded", stt="embedded", tts=None)
    app = stage.app
    assert app is not None
    llm, stt = app[LLM_BACKEND].llm, app[SPEECH].stt
    try:
        async with aiohttp.ClientSession() as http:  # the model's prompt cache warms
            (warm,) = await open_players(http, stage.url, 1, EMBEDDED_TURN_BOUND)
            await warm.text_turn("Hello.")
            await warm.session.close()

        async def play(players: list[Player]) -> None:
            stop = asyncio.Event()
            listening = asyncio.create_task(speak(players[0].session, stop, pace=0.08))
            try:
                await asyncio.gather(*(player.text_turns(args.turns, "Tell me about the sea.")
                                       for player in players))
            finally:
                stop.set()
                await listening

        async def inject(players: list[Player], playing: asyncio.Event) -> int:
            """Round 1: the model's worker and the speech-to-text workers killed; round
            2: the model's worker stopped (it hangs until its stall timeout)."""
            faults = 0
            for signum in (signal.SIGKILL, signal.SIGSTOP):
                # Mid-reply: once some session is receiving text.
                seen = sum(len(p.session.events) for p in players)

                def writing(seen: int = seen) -> bool:
                    return any(e["type"] == "response.output_text.delta"
                               for p in players for e in p.session.events[-3:]) and \
                        sum(len(p.session.events) for p in players) > seen

                if not await eventually(writing, 60) or playing.is_set():
                    break
                # The busiest of the model's workers: one writing a reply.
                model: int | None = next(iter(getattr(llm, "pids", [])), None)
                if model is not None:
                    if signum is signal.SIGSTOP:  # short only while it writes
                        llm.stall_timeout = 3.0  # type: ignore[attr-defined]
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(model, signum)
                    faults += 1
                if signum is signal.SIGKILL and stt is not None:
                    for worker in list(getattr(stt, "pids", [])):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker, signal.SIGKILL)
                    faults += 1
                def ended(gone: int | None = model) -> bool:
                    return gone is None or not pid_alive(gone)

                await eventually(ended, 30)
                llm.stall_timeout = embedded_llm.STALL_TIMEOUT  # type: ignore[attr-defined]
                await asyncio.sleep(1.0)
            return faults

        sessions = args.sessions
        args.sessions = min(3, sessions)
        try:
            if wanted(args, "embedded-worker-kill-hang"):
                rows.append(await run_phase(stage, "embedded-worker-kill-hang", args, play,
                                            inject))
                print(format_row(rows[-1]), flush=True)
        finally:
            args.sessions = sessions
    finally:
        await stage.close()


async def sigterm_phase(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    """``python -m server`` with the fakes, its sessions talking, idle or reloaded,
    stopped with SIGTERM: each session should get 1001 with a reason, and every
    process it started should go with it."""
    if not wanted(args, "server-sigterm"):
        return
    row = Row("server-sigterm")
    port = _free_port()
    env = {**os.environ, "TROUPE_LLM": stage.llm.base_url, "TROUPE_TTS": stage.tts.url,
           "TROUPE_STT": "none", "TROUPE_NUDGE_AFTER": "0",
           "TROUPE_DRAIN_TIMEOUT": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", str(port), "--allowed-root",
        str(stage.root), "--log-level", "ERROR", cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            pid = await _health_pid(http, url)
            players = await open_players(http, url, args.sessions)
            for index, player in enumerate(players):
                player.expected_close = True
                if index % 3 == 0:  # talking when the signal comes
                    await player.session.send({"type": "conversation.item.create", "item": {
                        "type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": "A story?"}]}})
                    await player.session.send({"type": "response.create"})
                elif index % 3 == 1:
                    mark = len(player.session.events)
                    await player.session.send({"type": "session.characters.reload",
                                               "directory": str(stage.root / "cast")})
                    await answer(player.session, mark, ("session.characters.reloaded",))
            for player in players[::3]:
                await player.session.wait(lambda e: e["type"] == "response.output_audio.delta"
                                          or e["type"] == "response.done")
            started = descendants(pid)
            row.injected = 1
            os.kill(pid, signal.SIGTERM)
            for player in players:
                await eventually(player.session.ended.is_set, 30)
            await asyncio.wait_for(process.wait(), 60)
            await eventually(lambda: not any(pid_alive(p) for p in started), 30)
            row.sessions = len(players)
            row.disturbed = sum(
                1 for p in players if p.session.close_code != aiohttp.WSCloseCode.GOING_AWAY
                or not p.session.close_reason or codes(p.session.events))
            for player in players[::3]:
                cut = status(player.session.events) != "completed"
                row.turns_lost += cut
                row.turns_ok += not cut
            for player in players:
                row.errors.update(codes(player.session.events))
            row.procs = sum(pid_alive(p) for p in started)
            row.fds = row.series = "-"
            reasons = {p.session.close_reason for p in players}
            row.notes.append(f"closed {collections.Counter(p.session.close_code for p in players)}"
                             f" reasons {reasons}; exit {process.returncode}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    rows.append(row)
    print(format_row(row), flush=True)


async def _health_pid(http: aiohttp.ClientSession, url: str) -> int:
    for _ in range(600):
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/v1/health") as response:
                if response.status == 200:
                    return int((await response.json())["pid"])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"python -m server did not come up on {url}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
