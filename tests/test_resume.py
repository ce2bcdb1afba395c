"""Conversations that survive their connection (README "Resume"): on one process with
the sandbox they had; across replicas through a real Redis, after a drain (SIGTERM)
or a replica killed outright (SIGKILL); and the tokens' rules, tried as a client."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    REPO,
    SCALE,
    MakeServer,
    Realtime,
    character_source,
    free_port,
    needs_redis,
    write_directory,
)

from tests.fakes.fault_proxy import FaultProxy, Reset
from tests.fakes.openai_chat import FakeOpenAI, text

NONCE_CHARACTER = character_source("Nora") + """
import random
NONCE = random.getrandbits(64)
PromptGenerator.make_system_prompt = lambda self: f"You are Nora; sandbox {NONCE}."
"""
"""A character whose system prompt names a number only its sandbox knows."""


def say(words: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": words}]}}


async def turn(session: Realtime, words: str) -> list[dict[str, Any]]:
    await session.send(say(words))
    await session.send({"type": "response.create"})
    events = [await session.receive()]
    while events[-1]["type"] != "response.done":
        events.append(await session.receive())
    return events


def history(fake: FakeOpenAI) -> list[tuple[str, str]]:
    """The last request's messages, as (role, content)."""
    return [(m["role"], m["content"]) for m in fake.requests[-1]["messages"]]


async def open_session(url: str, http: aiohttp.ClientSession, *, resume: str | None = None,
                       headers: dict[str, str] | None = None,
                       ) -> tuple[Realtime, dict[str, Any]]:
    path = f"{url}/v1/realtime?model=test" + (f"&resume={resume}" if resume else "")
    ws = await http.ws_connect(path, protocols=("realtime",), headers=headers or {})
    session = Realtime(ws)
    created = await session.receive()
    assert created["type"] == "session.created", created
    return session, created


async def refusal(url: str, http: aiohttp.ClientSession, token: str,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_session(url, http, resume=token, headers=headers)
    async with http.get(f"{url}/v1/realtime?model=test&resume={token}",
                        headers={**(headers or {}), "Connection": "Upgrade",
                                 "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                 "Sec-WebSocket-Protocol": "realtime"}) as response:
        body = await response.json()
    return refused.value.status, body


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_conversation(session: Realtime, directory: Path) -> None:
    reloaded = await session.reload(directory)
    assert reloaded["type"] == "session.characters.reloaded", reloaded
    await session.send({"type": "session.update", "session": {"voice": "Nora"}})
    updated = await session.receive()
    assert updated["type"] == "session.updated", updated
    await turn(session, "My number is 42.")


# ── one process ──────────────────────────────────────────────────────────────


async def test_a_dropped_connection_resumes_with_its_sandbox_character_and_history(
    fake_openai: FakeOpenAI, make_server: MakeServer, allowed_root: Path,
    http: aiohttp.ClientSession,
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    proxy, url = await FaultProxy.before(str(server.make_url("")).rstrip("/"))
    try:
        fake_openai.script(text("Noted."), text("It was 42."))
        session, created = await open_session(url, http)
        token = created["resume_token"]
        await start_conversation(session, write_directory(allowed_root, "n", {
            "nora.py": NONCE_CHARACTER}))
        before = history(fake_openai)
        proxy.hurt_all(Reset())  # the network drops it: no close frame

        resumed, created = await open_session(url, http, resume=token)
        await turn(resumed, "What was my number?")
        names = await resumed.names()
    finally:
        await proxy.close()

    assert created["resumed_from"] and created["resume_token"] != token
    assert created["session"]["id"] != created["resumed_from"]
    after = history(fake_openai)
    assert after[0] == before[0]  # the same system prompt: the same sandbox, still loaded
    assert after[1:] == [("user", "My number is 42."), ("assistant", "Noted."),
                         ("user", "What was my number?")]
    assert names == ["Nora"]


async def test_a_token_is_good_once_and_a_closed_conversation_is_gone(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server()
    url = str(server.make_url("")).rstrip("/")
    first, created = await open_session(url, http)
    await first.ws.close(code=1001)  # a tab reloading: kept
    resumed, again = await open_session(url, http, resume=created["resume_token"])
    assert again["resumed_from"] == created["session"]["id"]

    status, body = await refusal(url, http, created["resume_token"])
    assert status == 404 and body["error"]["code"] == "resume_token_invalid"
    assert "used already" in body["error"]["message"]

    await resumed.ws.close(code=1000)  # goodbye on purpose: nothing kept
    status, body = await refusal(url, http, again["resume_token"])
    assert status == 404


async def test_nobody_comes_back_within_the_window(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server(resume_window=0.3)
    url = str(server.make_url("")).rstrip("/")
    session, created = await open_session(url, http)
    await session.ws.close(code=1001)
    await asyncio.sleep(1.0)
    status, body = await refusal(url, http, created["resume_token"])
    assert status == 404 and "--resume-window" in body["error"]["message"]
    async with http.get(f"{url}/v1/health") as response:
        health = await response.json()
    assert health["sessions"]["kept"] == 0


async def test_another_keys_token_is_refused(
    make_server: MakeServer, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "alice"\nsecret = "sk-alice-0123456789"\n\n'
                    '[[key]]\nname = "mallory"\nsecret = "sk-mallory-0123456789"\n')
    server = await make_server(api_keys=keys)
    url = str(server.make_url("")).rstrip("/")
    alice = {"Authorization": "Bearer sk-alice-0123456789"}
    mallory = {"Authorization": "Bearer sk-mallory-0123456789"}
    session, created = await open_session(url, http, headers=alice)
    await session.ws.close(code=1001)

    status, body = await refusal(url, http, created["resume_token"], headers=mallory)
    assert status == 403 and body["error"]["code"] == "resume_token_not_yours"
    _, again = await open_session(url, http, resume=created["resume_token"], headers=alice)
    assert again["resumed_from"] == created["session"]["id"]


async def test_a_claim_while_the_old_connection_lingers_takes_it_over(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server()
    url = str(server.make_url("")).rstrip("/")
    old, created = await open_session(url, http)
    _, again = await open_session(url, http, resume=created["resume_token"])
    closed = await old.ws.receive(timeout=10 * SCALE)
    assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4000
    assert again["resumed_from"] == created["session"]["id"]


async def test_the_unmute_dialect_gets_its_token_in_session_updated(
    make_server: MakeServer, http: aiohttp.ClientSession,
) -> None:
    server = await make_server()
    url = str(server.make_url("")).rstrip("/")
    ws = await http.ws_connect(f"{url}/v1/realtime", protocols=("realtime",))
    session = Realtime(ws)
    await session.send({"type": "session.update", "session": {
        "instructions": {"type": "constant", "text": "hi"}, "allow_recording": False}})
    updated = await session.receive()
    while updated["type"] != "session.updated":
        updated = await session.receive()
    assert len(updated["resume_token"]) >= 32
    await ws.close()


# ── replicas sharing a Redis ─────────────────────────────────────────────────

Start = Callable[..., Awaitable[tuple[str, asyncio.subprocess.Process]]]


@pytest.fixture
async def replica(allowed_root: Path, fake_openai: FakeOpenAI,
                  ) -> AsyncIterator[Start]:
    """``python -m server`` processes sharing ``state_url``; stopped by PID."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(state_url: str, **env: str) -> tuple[str, asyncio.subprocess.Process]:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "--port", str(port), "--allowed-root",
            str(allowed_root), "--log-level", "WARNING", "--state-url", state_url,
            cwd=REPO, env={**os.environ, "TROUPE_LLM": fake_openai.base_url,
                           "TROUPE_STT": "none", "TROUPE_TTS": "none",
                           "TROUPE_DRAIN_TIMEOUT": "1", **env})
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as probe:
            for _ in range(int(400 * SCALE)):
                try:
                    async with probe.get(f"{url}/v1/ready") as response:
                        if response.status == 200:
                            return url, process
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"a replica did not come up on {url}")

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


@needs_redis
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["drained", "killed"])
async def test_a_conversation_moves_to_another_replica(
    how: signal.Signals, replica: Start, redis_url: str,
    fake_openai: FakeOpenAI, allowed_root: Path, http: aiohttp.ClientSession,
) -> None:
    first_url, first = await replica(redis_url)
    second_url, _ = await replica(redis_url)
    fake_openai.script(text("Noted."), text("It was 42."))
    session, created = await open_session(first_url, http)
    await start_conversation(session, write_directory(allowed_root, "n", {
        "nora.py": NONCE_CHARACTER}))
    before = history(fake_openai)
    await asyncio.sleep(1.5)  # the state is written within a second of a change

    first.send_signal(how)
    closed = await session.ws.receive(timeout=20 * SCALE)
    if how is signal.SIGTERM:  # drained: told why, with 1001
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1001
        assert closed.extra
    resumed, again = await open_session(second_url, http, resume=created["resume_token"])
    await turn(resumed, "What was my number?")
    assert await first.wait() in (0, -signal.SIGKILL)

    assert again["resumed_from"] == created["session"]["id"]
    after = history(fake_openai)
    assert after[0][1].startswith("You are Nora; sandbox ")  # a new sandbox, same character
    assert after[1:] == [("user", "My number is 42."), ("assistant", "Noted."),
                         ("user", "What was my number?")]
    assert before[1] == after[1]
    assert await resumed.names() == ["Nora"]
    assert again["session"]["audio"]["output"]["voice"] == "Nora"
