"""A client cannot make the server hold more than the session's limits (README "Limits").

Written as the clients that broke it: one that stops reading but keeps sending, one
that sends faster than its session can answer, one that sends garbage as fast as
loopback allows, one that nests JSON 1 000 deep. Each gets an ``error`` where it can
still read one, then a close with a code and reason; everyone else goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import (
    SCALE,
    Connect,
    MakeServer,
    Realtime,
    character_source,
    error_code,
    write_directory,
)

from scripts.raw_ws import RawClient
from server.app import SESSIONS
from server.realtime import session as session_module
from server.realtime.protocol import MAX_DEPTH


async def eventually(condition: Callable[[], object], within: float = 30.0) -> bool:
    """Poll ``condition()`` for at most ``within`` seconds (scaled)."""
    for _ in range(int(within * SCALE / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def closing_logged(caplog: pytest.LogCaptureFixture, reason: str) -> bool:
    return any(reason in record.getMessage() for record in caplog.records
               if record.name == "server.realtime.session")


async def read_until_closed(session: Realtime) -> tuple[list[dict[str, Any]], aiohttp.WSMessage]:
    """Every event until the server's close frame (answered by aiohttp)."""
    events: list[dict[str, Any]] = []
    while True:
        message = await session.ws.receive(timeout=30 * SCALE)
        if message.type is not aiohttp.WSMsgType.TEXT:
            return events, message
        events.append(json.loads(message.data))


def nested(depth: int) -> str:
    """JSON of objects and arrays, alternately, ``depth`` deep."""
    opening = "".join("[" if level % 2 else '{"x":' for level in range(depth))
    closing = "".join("]" if level % 2 else "}" for level in reversed(range(depth)))
    return opening + closing


def item_create(text: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]}}


# ── JSON nested too deep ──────────────────────────────────────────────────────

DEEP_EVENTS = {  # the deep value goes where the %s is
    "response.create response": '{"type": "response.create", "response": {"metadata": %s}}',
    "session.update tools": '{"type": "session.update", "session": {"tools": '
                            '[{"type": "function", "name": "f", "parameters": %s}]}}',
    "session.update turn_detection": '{"type": "session.update", '
                                     '"session": {"turn_detection": %s}}',
    "session.update instructions": '{"type": "session.update", "session": {"instructions": %s}}',
    "session.update audio.input": '{"type": "session.update", "session": '
                                  '{"audio": {"input": {"turn_detection": %s}}}}',
    "item.create, a field it ignores": '{"type": "conversation.item.create", "item": '
                                       '{"content": [{"type": "input_text", "text": "hi"}]}, '
                                       '"extra": %s}',
    "item.create content": '{"type": "conversation.item.create", "item": {"content": %s}}',
    "audio append, a field it ignores": '{"type": "input_audio_buffer.append", "audio": "", '
                                        '"x": %s}',
    "characters.list event_id": '{"type": "session.characters.list", "event_id": %s}',
    "an unknown event type": '{"type": "no.such.event", "x": %s}',
    "the frame itself": "%s",
}


@pytest.mark.parametrize("depth", [1000, 100_000, MAX_DEPTH + 1])
@pytest.mark.parametrize("template", DEEP_EVENTS.values(), ids=DEEP_EVENTS.keys())
async def test_json_nested_too_deep_is_an_invalid_event_and_the_session_goes_on(
    connect: Connect, caplog: pytest.LogCaptureFixture, template: str, depth: int,
) -> None:
    session = await connect()
    await session.ws.send_str(template % nested(depth))
    error = await session.receive()
    assert error_code(error) == "invalid_event", error
    assert f"more than {MAX_DEPTH} deep" in error["error"]["message"]
    assert await session.names()  # the session goes on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_nesting_within_the_limit_and_brackets_in_strings_are_accepted(
    connect: Connect,
) -> None:
    session = await connect()
    text = '[{"\\"\\\\' * 5000  # brackets, quotes and backslashes inside a string
    # The event, session, tools and the tool are 4 levels.
    await session.ws.send_str(
        f'{{"type": "session.update", "session": {{"instructions": {json.dumps(text)}, '
        f'"tools": [{{"type": "function", "name": "f", "parameters": {nested(MAX_DEPTH - 4)}'
        '}]}}')
    updated = await session.receive()
    assert updated["type"] == "session.updated", updated
    created = await session.request(item_create(text))
    assert created["type"] == "conversation.item.added", created
    assert created["item"]["content"][0]["text"] == text


# ── a flood of invalid frames ─────────────────────────────────────────────────


async def test_a_flood_of_invalid_frames_gets_errors_then_one_rate_limited_then_1008(
    connect: Connect,
) -> None:
    flooder, bystander = await connect(), await connect()
    limit = session_module.MAX_INVALID_EVENTS
    frames = ["not json", '{"type": "no.such.event"}', nested(MAX_DEPTH + 1),
              '{"type": "session.update", "session": {"temperature": "hot"}}']
    with contextlib.suppress(ConnectionError):
        for index in range(limit * 10):
            if index % 5 == 4:
                await flooder.ws.send_bytes(b"\0binary")
            else:
                await flooder.ws.send_str(frames[index % 5 % len(frames)])
    events, close = await read_until_closed(flooder)
    codes = [error_code(event) for event in events if event["type"] == "error"]
    assert codes == ["invalid_event"] * limit + ["rate_limited"], codes
    assert close.type is aiohttp.WSMsgType.CLOSE, close
    assert (close.data, close.extra) == (1008, "too many invalid events")
    assert await bystander.names()


# ── a backlog that overflows ──────────────────────────────────────────────────


@pytest.fixture
def small_backlog(monkeypatch: pytest.MonkeyPatch) -> int:
    """A backlog of 16 events and 16 dropped before a close (the defaults take
    seconds of reloads to fill)."""
    monkeypatch.setattr(session_module, "MAX_BACKLOG_EVENTS", 16)
    monkeypatch.setattr(session_module, "MAX_DROPPED_EVENTS", 16)
    return 16


async def test_a_full_backlog_drops_events_with_one_error_and_the_session_goes_on(
    connect: Connect, allowed_root: Path, small_backlog: int,
) -> None:
    directory = write_directory(allowed_root, "one", {"a.py": character_source("A")})
    session = await connect()
    reload = {"type": "session.characters.reload", "directory": str(directory)}
    # Each reload takes milliseconds; the frames arrive in microseconds.
    for index in range(small_backlog + 10):
        await session.send({**reload, "event_id": f"r{index}"})
    reloaded, errors = 0, []
    while reloaded < small_backlog:
        event = await session.receive()
        if event["type"] == "error":
            errors.append(event)
        else:
            assert event["type"] == "session.characters.reloaded", event
            reloaded += 1
    assert [error_code(error) for error in errors] == ["rate_limited"], errors
    assert errors[0]["error"]["details"]["backlog_events"] == small_backlog
    # What was accepted is answered, in order; then the session takes events again.
    await session.send({"type": "session.characters.list"})
    while (event := await session.receive())["type"] != "session.characters.listed":
        assert event["type"] == "session.characters.reloaded", event
    assert [c["name"] for c in event["characters"]] == ["A"]


async def test_a_backlog_that_stays_full_closes_the_session_with_1008(
    connect: Connect, allowed_root: Path, small_backlog: int,
) -> None:
    directory = write_directory(allowed_root, "one", {"a.py": character_source("A")})
    session, bystander = await connect(), await connect()
    reload = {"type": "session.characters.reload", "directory": str(directory)}
    with contextlib.suppress(ConnectionError):
        for _ in range(small_backlog * 2 + 20):
            await session.send(reload)
    events, close = await read_until_closed(session)
    errors = [error_code(event) for event in events if event["type"] == "error"]
    assert errors == ["rate_limited"], events
    assert (close.data, close.extra) == (1008, "too many events while behind"), close
    assert await bystander.names()


# ── a client that does not read ───────────────────────────────────────────────

FLOODS = [
    pytest.param(json.dumps({"type": "session.characters.list"}), 100_000,
                 id="characters.list"),
    pytest.param(json.dumps(item_create("x" * 1_000_000)), 200, id="1 MB items"),
]


@pytest.mark.parametrize("reads_again", [True, False], ids=["reads again", "never reads"])
@pytest.mark.parametrize(("frame", "most"), FLOODS)
async def test_a_client_that_stops_reading_is_closed_with_1008_and_everything_freed(
    make_server: MakeServer, connect_to: Any, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, frame: str, most: int,
    reads_again: bool,
) -> None:
    # The deadline bounds the test should the outbox limit not be reached first. A
    # flood of small events may fill the backlog too: not what is tested here.
    monkeypatch.setattr(session_module, "SEND_TIMEOUT", 2.0 * SCALE)
    monkeypatch.setattr(session_module, "MAX_DROPPED_EVENTS", most)
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT", (5.0 if reads_again else 0.5) * SCALE)
    caplog.set_level(logging.INFO, logger="server.realtime.session")
    gc.collect()
    gc.disable()
    request.addfinalizer(gc.enable)
    server: TestClient[Any, Any] = await make_server()
    sessions = server.app[SESSIONS]
    assert server.port is not None
    raw = await RawClient.connect(server.host, server.port)
    assert await eventually(lambda: any(s.characters.sandbox for s in sessions.values()))
    [slow] = sessions.values()
    assert slow.characters.sandbox is not None
    pid = slow.characters.sandbox.pid
    gone = weakref.ref(slow)
    del slow
    bystander: Realtime = await connect_to(server)
    assert await bystander.names()  # loaded before the flood, which takes the CPU

    async def flood() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(most):
                await raw.send_text(frame)

    flooding = asyncio.create_task(flood())
    assert await eventually(lambda: closing_logged(caplog, "client not reading"), 120)
    flooding.cancel()
    if reads_again:
        # Within its close timeout the server still flushes what it had written, and
        # its close frame comes last.
        events, close = await raw.read_all()
        assert close == (1008, "client not reading"), (close, events[-3:])
        errors = {error_code(event) for event in events if event["type"] == "error"}
        assert errors <= {"rate_limited"}, events
    else:
        # The server resets the connection: nothing it held for us is kept.
        assert await eventually(lambda: closing_logged(caplog, "resetting"))
        assert (await raw.read_all())[1] is None
    raw.abort()
    assert await eventually(lambda: len(sessions) == 1)
    assert await eventually(lambda: not alive(pid)), "the session's sandbox lives on"

    # Freed as it ends, by reference counting: not left in a cycle for the collector
    # (which an idle server may not run for a long time).
    assert await eventually(lambda: gone() is None), "the session is still referenced"
    assert await bystander.names()
