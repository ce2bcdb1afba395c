"""Shared fixtures: a real server on loopback per test, real sandbox children.

``SCALE`` stretches every timeout the tests use (set TROUPE_TEST_TIMEOUT_SCALE on a
slow machine); tests never assert on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sandbox import ChildLimits, SandboxConfig
from server.app import create_app
from server.config import Config

# The fake backends' fixtures (fake_kyutai_stt, fake_kyutai_tts, fake_openai), for
# every test that names one.
pytest_plugins = ["tests.fakes.kyutai_stt", "tests.fakes.kyutai_tts", "tests.fakes.openai_chat"]

SCALE = float(os.environ.get("TROUPE_TEST_TIMEOUT_SCALE", "1"))
REPO = Path(__file__).resolve().parent.parent


def character_source(name: str, *, body: str = "", prompt: str | None = None,
                     good: bool | None = True, voice_path: str | None = None) -> str:
    """A valid character file named ``name``; ``body`` runs first, at import."""
    prompt = prompt if prompt is not None else f"You are {name}."
    voice = {"source_type": "file", "path_on_server": voice_path or f"voices/{name}.wav"}
    return textwrap.dedent(body) + textwrap.dedent(f"""
        CHARACTER_NAME = {name!r}
        VOICE_SOURCE = {voice!r}
        INSTRUCTIONS = {{"text": {prompt!r}}}
        METADATA = {{"good": {good!r}, "comment": None}}

        class PromptGenerator:
            def __init__(self, instructions):
                self.instructions = instructions

            def make_system_prompt(self):
                return self.instructions["text"]
        """)


def write_directory(root: Path, name: str, files: dict[str, str]) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for filename, source in files.items():
        (directory / filename).parent.mkdir(parents=True, exist_ok=True)
        (directory / filename).write_text(source)
    return directory


@pytest.fixture
def allowed_root(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    return root


@pytest.fixture
def config(allowed_root: Path) -> Config:
    return Config(
        port=0,
        characters_dir=REPO / "characters",
        allowed_roots=(allowed_root.resolve(),),
        max_reloads_per_minute=1000,
        # No backend unless a test starts one: fakes on loopback, or the embedded models.
        llm=None, stt=None, tts=None,
        sandbox=SandboxConfig(
            limits=ChildLimits(memory_mb=384),
            load_timeout=15.0 * SCALE,
            file_timeout=1.0 * SCALE,
            call_timeout=1.0 * SCALE,
            pool_size=2,
        ),
    )


MakeServer = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_server(aiohttp_client: Any, config: Config) -> MakeServer:
    """Start a real server on 127.0.0.1; keyword arguments override the config."""

    async def make(**overrides: Any) -> TestClient:
        client: TestClient = await aiohttp_client(create_app(replace(config, **overrides)))
        return client

    return make


@pytest.fixture
async def server(make_server: MakeServer) -> TestClient:
    return await make_server()


class Realtime:
    """A WebSocket client speaking the event protocol, for tests."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(event))

    async def receive(self, within: float = 20.0) -> dict[str, Any]:
        message = await self.ws.receive(timeout=within * SCALE)
        assert message.type is aiohttp.WSMsgType.TEXT, f"expected an event, got {message!r}"
        event: dict[str, Any] = json.loads(message.data)
        return event

    async def request(self, event: dict[str, Any], within: float = 20.0) -> dict[str, Any]:
        await self.send(event)
        return await self.receive(within)

    async def reload(self, directory: str | Path) -> dict[str, Any]:
        reload = {"type": "session.characters.reload", "directory": str(directory)}
        return await self.request(reload)

    async def names(self) -> list[str]:
        listed = await self.request({"type": "session.characters.list"})
        assert listed["type"] == "session.characters.listed", listed
        return [c["name"] for c in listed["characters"]]


Connect = Callable[..., Awaitable[Realtime]]
ConnectTo = Callable[..., Awaitable[Realtime]]


@pytest.fixture
async def connect_to() -> AsyncIterator[Callable[..., Awaitable[Realtime]]]:
    """Open a session on a given server: OpenAI GA dialect unless ``model=None``."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_session(client: TestClient, model: str | None = "test-model",
                           headers: dict[str, str] | None = None) -> Realtime:
        path = "/v1/realtime" + (f"?model={model}" if model is not None else "")
        ws = await client.ws_connect(path, protocols=("realtime",), headers=headers or {})
        sockets.append(ws)
        session = Realtime(ws)
        if model is not None:
            created = await session.receive()
            assert created["type"] == "session.created", created
        return session

    yield open_session
    for ws in sockets:
        await ws.close()


@pytest.fixture
async def connect(server: TestClient, connect_to: Callable[..., Awaitable[Realtime]]) -> Connect:
    """Open a session on the default test ``server`` (or ``on=`` another one)."""

    async def open_session(model: str | None = "test-model",
                           headers: dict[str, str] | None = None,
                           on: TestClient | None = None) -> Realtime:
        return await connect_to(on or server, model=model, headers=headers)

    return open_session


def error_code(event: dict[str, Any]) -> str:
    assert event["type"] == "error", event
    code: str = event["error"]["code"]
    return code


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def server_process(allowed_root: Path) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start ``python -m server`` as its own process (with ``env`` added to its
    environment from birth; no backends unless ``env`` names them, e.g.
    ``TROUPE_STT=embedded``); yields a starter returning the base URL. Stopped by PID."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(env: dict[str, str] | None = None) -> str:
        port = free_port()
        backends = {"TROUPE_LLM": "none", "TROUPE_STT": "none", "TROUPE_TTS": "none",
                    # SIGTERM drains live sessions this long (tests that left one open)
                    "TROUPE_DRAIN_TIMEOUT": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "--port", str(port),
            "--allowed-root", str(allowed_root), "--log-level", "WARNING",
            cwd=REPO, env={**os.environ, **backends, **(env or {})},
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(int(600 * SCALE)):  # embedded models take seconds to load
                try:
                    async with http.get(f"{url}/v1/health") as response:
                        if response.status == 200:
                            return url
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"python -m server did not come up on {url}")

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it
            process.terminate()
        await process.wait()


REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (apt-get install redis-server; "
    ".ci/run does)")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis of the tests' own (Debian's redis-server) on a loopback port, nothing
    saved to disk; stopped by PID."""
    assert REDIS is not None
    port = free_port()
    server = subprocess.Popen(
        [REDIS, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)
