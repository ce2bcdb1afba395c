"""A client cannot make the server hold more than the session's limits (README "Limits").

Written as the clients that broke it: one that nests JSON 1 000 deep.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from conftest import Connect, error_code

from server.protocol import MAX_DEPTH


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
