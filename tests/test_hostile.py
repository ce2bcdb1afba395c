"""Hostile character files are contained: reported, skipped, and harmless to others.

Each hostile file is followed (in sorted order) by a valid character in the same
file, so seeing that character loaded would prove the containment failed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import Connect, character_source, write_directory

SECRET = "troupe-test-secret-5f1c9a"

HOSTILE = {
    "a_loops.py": "while True:\n    pass\n",
    "b_exits.py": "import os\nos._exit(7)\n",
    "c_segfaults.py": "import ctypes\nctypes.string_at(0)\n",
    "d_hogs_memory.py": "hoard = []\nwhile True:\n    hoard.append(bytearray(16 * 1024 * 1024))\n",
    "e_floods.py": "while True:\n    print('x' * 65536)\n",
    "e_floods_and_carries_on.py": (
        "for _ in range(100):\n    try:\n        print('x' * 65536)\n"
        "    except BaseException:\n        pass\n"
    ),
}
EXPECTED_ERRORS = {
    "a_loops.py": "Timeout",
    "b_exits.py": "Crashed",
    "c_segfaults.py": "Crashed",
    "d_hogs_memory.py": "MemoryLimitExceeded",
    "e_floods.py": "OutputLimitExceeded",
    "e_floods_and_carries_on.py": "OutputLimitExceeded",
}


def env_probe(name: str) -> str:
    """A character that refuses to load if it can read the server's secret anywhere:
    its own environment, its /proc environ, the zygote's, or (by scanning /proc)
    any process's, the server's included."""
    return character_source(name, body=f"""
        import os
        def _gather():
            seen = [repr(dict(os.environ))]
            for path in ["/proc/self/environ", "/proc/{os.getpid()}/environ",
                         "/proc/" + str(os.getppid()) + "/environ"]:
                try:
                    seen.append(open(path, "rb").read().decode(errors="replace"))
                except OSError as exc:
                    seen.append(type(exc).__name__)
            try:
                entries = os.listdir("/proc")
            except OSError as exc:  # Landlock: /proc is out of reach
                entries = []
                seen.append(type(exc).__name__)
            for entry in entries:
                if entry.isdigit():
                    try:
                        with open(f"/proc/{{entry}}/environ", "rb") as environ:
                            seen.append(environ.read().decode(errors="replace"))
                    except OSError:
                        pass
            return " | ".join(seen)
        if {SECRET!r} in _gather():
            raise RuntimeError("the server's secret is visible to character code")
        """)


def hostile_directory(root: Path) -> Path:
    files = {
        name: source + character_source(f"Leaked {name}") for name, source in HOSTILE.items()
    }
    files["f_good.py"] = character_source("Survivor")
    files["g_reads_env.py"] = env_probe("Snoop")
    return write_directory(root, "hostile", files)


@pytest.fixture
def secret_in_server_environment(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TROUPE_TEST_SECRET", SECRET)
    return SECRET


async def test_hostile_files_are_reported_and_the_rest_load(
    connect: Connect, allowed_root: Path, secret_in_server_environment: str
) -> None:
    directory = hostile_directory(allowed_root)
    session = await connect()

    reloaded = await session.reload(directory)

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert {c["name"] for c in reloaded["characters"]} == {"Survivor", "Snoop"}
    errors = {e["file"]: e["error_type"] for e in reloaded["errors"]}
    assert errors == EXPECTED_ERRORS
    assert reloaded["total_files"] == len(HOSTILE) + 2
    # The whole reload answers within the load deadline of the test config (15 s);
    # duration_ms is the server's own measure of it.
    assert reloaded["duration_ms"] < 15_000


async def test_character_code_never_sees_the_servers_environment(
    connect: Connect, allowed_root: Path, secret_in_server_environment: str
) -> None:
    session = await connect()

    reloaded = await session.reload(
        write_directory(allowed_root, "probe", {"probe.py": env_probe("Probe")})
    )

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert reloaded["errors"] == []
    assert [c["name"] for c in reloaded["characters"]] == ["Probe"]


async def test_secret_from_the_server_processs_birth_environment_is_hidden(
    server_process: Callable[..., Awaitable[str]], allowed_root: Path
) -> None:
    """The secret is in the server's environment from exec, so it is also in
    /proc/<server>/environ and in the environment the zygote would inherit."""
    url = await server_process(env={"TROUPE_TEST_SECRET": SECRET})
    directory = write_directory(allowed_root, "probe", {"probe.py": env_probe("Probe")})
    async with aiohttp.ClientSession() as http, http.ws_connect(
        f"{url}/v1/realtime?model=x", protocols=("realtime",)
    ) as ws:
        await ws.receive_json()  # session.created
        await ws.send_json({"type": "session.characters.reload", "directory": str(directory)})
        reloaded = await ws.receive_json(timeout=20)

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert reloaded["errors"] == []


async def test_other_sessions_are_unaffected_by_a_hostile_reload(
    connect: Connect, allowed_root: Path
) -> None:
    bystander = await connect()
    before = await bystander.names()
    attacker = await connect()

    hostile = asyncio.create_task(attacker.reload(hostile_directory(allowed_root)))
    during = []
    while not hostile.done():
        during.append(await bystander.names())
    reloaded = await hostile

    assert reloaded["type"] == "session.characters.reloaded"
    assert during and all(names == before for names in during)
    assert await bystander.names() == before
    assert set(await attacker.names()) == {"Survivor", "Snoop"}


async def test_character_code_has_no_network(connect: Connect, allowed_root: Path) -> None:
    accepted = []
    listener = await asyncio.start_server(
        lambda reader, writer: accepted.append(writer.close()), "127.0.0.1", 0
    )
    port = listener.sockets[0].getsockname()[1]
    dialer = character_source("Dialer", body=f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        except OSError:
            pass
        """)
    session = await connect()
    try:
        reloaded = await session.reload(write_directory(allowed_root, "dialer", {"d.py": dialer}))
    finally:
        listener.close()
        await listener.wait_closed()

    assert [c["name"] for c in reloaded["characters"]] == ["Dialer"]
    assert accepted == [], "character code connected to a socket of the host"
