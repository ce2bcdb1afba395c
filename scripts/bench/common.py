"""What both parts of ``make bench`` share: the server they measure, run as
``python -m server`` on a loopback port (``serving``), and a client for it.

    serving(root, options) ─▶ ServerProcess (scripts/measure.py), its log in a temp
                              file (kept when something broke), stopped by pid with
                              every process it started; a leftover fails the run
    Client(http, server)   ─▶ /v1/health, /v1/sessions (admin), Realtime sessions
    Realtime(ws)           ─▶ one OpenAI GA session: send an event, receive the next
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from scripts.measure import ServerDidNotStart, ServerProcess, sandbox_children

TIMEOUT = 30.0
"""Seconds any single wait may take before the run counts as broken."""
SETTLE_POLL = 0.1
"""Seconds between the health polls that decide the server is idle."""


class BenchError(Exception):
    """Something broke: the run cannot produce trustworthy figures."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def serving(root: Path, options: Sequence[str] = (),
                  backends_up: bool = False) -> AsyncIterator[Client]:
    """``python -m server`` allowed to load from ``root``, with ``options``, healthy
    (and with ``backends_up``, its STT, LLM and TTS up); a client for it. Stopped (by
    pid) at the end; raises ``BenchError`` when a process it started outlives it."""
    fd, name = tempfile.mkstemp(prefix="troupe-bench-server-", suffix=".log")
    os.close(fd)  # the server appends to it
    log_path = Path(name)
    server = ServerProcess(["--allowed-root", str(root), "--max-reloads-per-minute", "100000",
                            *options], log_path)
    log(f"server pid {server.pid} on {server.url}"
        + (f" ({' '.join(options)})" if options else "") + f", log {log_path}")
    completed = False
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            client = Client(http, server)
            await client.wait_ready()
            if backends_up:
                health = await client.health()
                if not (health["stt_up"] and health["llm_up"] and health["tts_up"]):
                    raise BenchError(f"a backend is down: {health['backends']}")
            server.watched.track()
            yield client
            server.watched.track()
        completed = True
    finally:
        # In a thread: fakes the server talks to may be served by this loop.
        leftovers = await asyncio.to_thread(server.stop, TIMEOUT)
        if leftovers:
            log("processes outlived the server and were killed: "
                f"{sorted(left.pid for left in leftovers)}")
        if completed and not leftovers:
            os.unlink(log_path)
        else:
            log(f"server log kept at {log_path}")
    if leftovers:
        raise BenchError(f"{len(leftovers)} processes outlived the server")


class Realtime:
    """One session, OpenAI GA dialect (``?model=bench``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def receive(self, expected: str) -> dict[str, Any]:
        message = await self.ws.receive(timeout=TIMEOUT)
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise BenchError(f"expected {expected}, got a {message.type.name} frame")
        event: dict[str, Any] = msgspec.json.decode(message.data)
        if event.get("type") != expected:
            raise BenchError(f"expected {expected}, got {event}")
        return event

    async def request(self, expected: str, event_type: str, **fields: Any) -> dict[str, Any]:
        await self.ws.send_str(msgspec.json.encode({"type": event_type, **fields}).decode())
        return await self.receive(expected)

    async def close(self) -> None:
        await self.ws.close()


class Client:
    """HTTP and WebSocket access to one running server."""

    def __init__(self, http: aiohttp.ClientSession, server: ServerProcess) -> None:
        self.http = http
        self.server = server

    async def health(self) -> dict[str, Any]:
        return await self.server.health(self.http)

    async def wait_ready(self) -> None:
        try:
            await self.server.wait_healthy(self.http, TIMEOUT)
        except ServerDidNotStart as exc:
            raise BenchError(str(exc)) from None

    async def wait_settled(self, sessions: int) -> dict[str, Any]:
        """Until ``sessions`` are open, the pool is full, no retired child runs (counted
        in /proc) and the server's own count of children has stopped moving (closing
        sessions still finishing their kills); returns the last health body."""
        deadline = time.monotonic() + TIMEOUT
        previous: tuple[int, ...] = ()
        while True:
            body = await self.health()
            pool = body["sandbox"]
            wanted = (pool["pool_size"] + pool["default_set_loaded"] + pool.get("warm", 0)
                      + sessions)
            running = len(sandbox_children(self.server.pid))
            state = (body["sessions"]["active"], running, pool["pool_idle"], pool["children"])
            if state == previous and state[:3] == (sessions, wanted, pool["pool_size"]):
                return body
            if time.monotonic() > deadline:
                raise BenchError(f"the server did not settle with {sessions} sessions "
                                 f"({running} sandbox children running): {body}")
            previous = state
            await asyncio.sleep(SETTLE_POLL)

    async def open(self) -> Realtime:
        ws = await self.http.ws_connect(
            f"{self.server.url}/v1/realtime?model=bench", protocols=("realtime",)
        )
        session = Realtime(ws)
        try:
            await session.receive("session.created")
        except BaseException:
            await session.close()
            raise
        return session

    async def start_session(self) -> tuple[Realtime, float, float]:
        """A new session whose characters are listed, and the seconds until
        ``session.created`` and until ``session.characters.listed``."""
        started = time.perf_counter()
        session = await self.open()
        created = time.perf_counter() - started
        try:
            listed = await session.request("session.characters.listed",
                                           "session.characters.list")
        except BaseException:
            await session.close()
            raise
        elapsed = time.perf_counter() - started
        if listed["character_count"] < 1:
            raise BenchError(f"the default set listed no characters: {listed}")
        return session, created, elapsed

    async def sandbox_pids(self) -> list[int]:
        async with self.http.get(
            f"{self.server.url}/v1/sessions",
            headers={"Authorization": f"Bearer {self.server.admin_token}"},
        ) as response:
            sessions = await response.json()
        return [s["sandbox_pid"] for s in sessions if s["sandbox_pid"] is not None]
