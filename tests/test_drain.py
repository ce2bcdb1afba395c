"""Readiness and drain (DESIGN.md sections 6 and 10): a replica a balancer can trust.

    GET /v1/ready   200 {"ready": true, "sessions", "capacity"}; 503 with the reasons
                    (draining, full, a configured backend down) and Retry-After
    SIGTERM         not ready at once, new sessions refused with 503 before the
                    handshake, live ones go on for --drain-timeout, then 1001 with a
                    reason; every child reaped; exit code 0
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from conftest import REPO, SCALE, Connect, MakeServer, Realtime, free_port


async def test_ready_says_sessions_and_capacity_and_turns_503_when_full(
    make_server: MakeServer, connect_to: Callable[..., Awaitable[Realtime]]
) -> None:
    server = await make_server(max_sessions=1)
    first = await server.get("/v1/ready")
    assert first.status == 200
    assert await first.json() == {"ready": True, "reasons": [], "sessions": 0,
                                  "capacity": 1, "draining": False}

    session = await connect_to(server)
    full = await server.get("/v1/ready")

    assert full.status == 503
    assert (await full.json())["reasons"] == ["full"]
    assert full.headers["Retry-After"]
    await session.ws.close()


async def test_ready_is_503_while_a_configured_backend_is_down(
    make_server: MakeServer, connect: Connect
) -> None:
    server = await make_server(tts=f"ws://127.0.0.1:{free_port()}")  # nothing listens

    answer = await server.get("/v1/ready")

    assert answer.status == 503
    assert "tts_down" in (await answer.json())["reasons"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_sigterm_drains_then_closes_with_1001_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", str(port), "--log-level", "WARNING",
        cwd=REPO, env={**os.environ, "TROUPE_LLM": "none", "TROUPE_STT": "none",
                       "TROUPE_TTS": "none", "TROUPE_DRAIN_TIMEOUT": str(3 * SCALE)},
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(int(400 * SCALE)):
                try:
                    async with http.get(f"{url}/v1/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
            ws = await http.ws_connect(f"{url}/v1/realtime?model=x", protocols=("realtime",))
            live = Realtime(ws)
            await live.receive()
            assert await live.names()
            async with http.get(f"{url}/v1/health") as response:
                children = (await response.json())["sandbox"]["children"]
            assert children

            process.send_signal(signal.SIGTERM)
            for _ in range(int(100 * SCALE)):  # not ready at once (bounded wait)
                async with http.get(f"{url}/v1/ready") as response:
                    if response.status == 503:
                        body = await response.json()
                        break
                await asyncio.sleep(0.02)
            assert body["draining"] is True and "draining" in body["reasons"]
            try:
                await http.ws_connect(f"{url}/v1/realtime?model=x", protocols=("realtime",))
                raise AssertionError("a draining server accepted a new session")
            except aiohttp.WSServerHandshakeError as refused:
                assert refused.status == 503
                assert refused.headers is not None and refused.headers["Retry-After"]
            assert await live.names()  # the live session goes on while draining

            closing = await ws.receive(timeout=30 * SCALE)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
            assert closing.extra  # a reason
        assert await asyncio.wait_for(process.wait(), 30 * SCALE) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_with_no_session_exits_at_once_and_reaps_every_child(
    server_process: Callable[..., Awaitable[str]]
) -> None:
    url = await server_process(env={"TROUPE_DRAIN_TIMEOUT": "600"})
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/health") as response:
        health = await response.json()
    pid = health["pid"]
    children = _children(pid)

    os.kill(pid, signal.SIGTERM)

    for _ in range(int(200 * SCALE)):  # nobody to wait for: no 600 s drain
        if not _alive(pid) and not any(_alive(child) for child in children):
            break
        await asyncio.sleep(0.05)
    assert not _alive(pid)
    assert not any(_alive(child) for child in children)


def _children(parent: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _parent(int(entry.name)) == parent]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None
