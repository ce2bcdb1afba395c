"""Sessions leave nothing behind: no child processes, no fds, no metric series."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, Connect, MakeServer, character_source, write_directory

from server.app import POOL, SESSIONS


def zygote_children(zygote: int | None) -> set[int]:
    """Pids of live (not zombie) processes whose parent is the sandbox zygote."""
    assert zygote is not None, "the pool has no zygote"
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == zygote and state != "Z":
            children.add(int(entry.name))
    return children


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(condition: object, attempts: int = 100) -> bool:
    """Poll ``condition()`` a bounded number of times (the server closes sessions
    asynchronously after the client's close frame)."""
    for _ in range(int(attempts * SCALE)):
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return bool(condition())  # type: ignore[operator]


async def metric_session_series(server: TestClient) -> list[str]:
    text = await (await server.get("/metrics")).text()
    return [line for line in text.splitlines() if "session_id=" in line]


async def test_open_close_loop_leaves_nothing(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    directory = write_directory(allowed_root, "small", {"a.py": character_source("A")})
    warm = await connect()
    await warm.names()
    await warm.ws.close()
    assert await eventually(lambda: not server.app[SESSIONS])
    pool = server.app[POOL]
    zygote = pool.zygote_pid
    baseline_children, baseline_fds = zygote_children(zygote), open_fds()
    baseline_warm = len(pool.warm_directories)

    def kept_warm() -> int:
        """Sandboxes the pool keeps loaded on purpose since the baseline (a channel
        and a pidfd each)."""
        return len(pool.warm_directories) - baseline_warm

    for round_ in range(30):
        session = await connect()
        if round_ % 2:
            await session.reload(directory)
        assert await session.names()
        await session.ws.close()

    sessions = server.app[SESSIONS]
    assert await eventually(lambda: not sessions)
    assert await eventually(
        lambda: len(zygote_children(zygote)) <= len(baseline_children) + kept_warm())
    assert await eventually(lambda: open_fds() <= baseline_fds + 2 * kept_warm())
    assert await metric_session_series(server) == []


async def test_no_process_survives_the_server(make_server: MakeServer, allowed_root: Path) -> None:
    server = await make_server()
    ws = await server.ws_connect("/v1/realtime?model=x", protocols=("realtime",))
    await ws.receive_json()
    await ws.close()
    zygote = server.app[POOL].zygote_pid
    children = zygote_children(zygote)
    assert children  # the pool's idle children and the server-wide set's

    await server.close()

    assert zygote is not None
    assert await eventually(lambda: not any(pid_alive(pid) for pid in {zygote, *children}))


async def test_sandboxes_die_when_the_server_is_killed(
    server_process: Callable[..., Awaitable[str]]
) -> None:
    url = await server_process(env={"TROUPE_ADMIN_TOKEN": "admin"})
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/realtime?model=x", protocols=("realtime",))
        await ws.receive_json()
        await ws.send_json({"type": "session.characters.list"})
        await ws.receive_json()
        async with http.get(f"{url}/v1/sessions",
                            headers={"Authorization": "Bearer admin"}) as response:
            pids = [session["sandbox_pid"] for session in await response.json()]
        async with http.get(f"{url}/v1/health") as response:
            server_pid = (await response.json())["pid"]
        assert pids and all(pid_alive(pid) for pid in pids)

        os.kill(server_pid, signal.SIGKILL)

        assert await eventually(lambda: not any(pid_alive(pid) for pid in pids))
        await ws.close()


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        return f"no /proc/{pid}: {exc}"


def pid_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def test_server_shutdown_closes_sessions_with_going_away(
    server_process: Callable[..., Awaitable[str]]
) -> None:
    url = await server_process()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/realtime?model=x", protocols=("realtime",))
        await ws.receive_json()
        async with http.get(f"{url}/v1/health") as response:
            server_pid = (await response.json())["pid"]

        os.kill(server_pid, signal.SIGTERM)
        closing = await ws.receive(timeout=10 * SCALE)

        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY


def worker_pids(parent: int) -> list[int]:
    """The embedded models' worker processes of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and any(arg.endswith(b"_worker") for arg in cmdline):
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(300)
async def test_model_workers_end_when_the_server_is_killed(
    server_process: Callable[..., Awaitable[str]]
) -> None:
    url = await server_process(env={"TROUPE_STT": "embedded", "TROUPE_LLM": "embedded"})
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/health") as response:
        health = await response.json()
    workers = worker_pids(health["pid"])
    assert health["stt_up"] and health["llm_up"], health
    assert len(workers) >= 2, workers  # speech-to-text (one per core) and the model

    os.kill(health["pid"], signal.SIGKILL)

    assert await eventually(lambda: not any(pid_alive(pid) for pid in workers))
