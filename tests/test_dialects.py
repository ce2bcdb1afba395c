"""The three client families, recognised at connect and answered in their own shapes
(DESIGN.md §2): OpenAI GA, OpenAI beta, and Unmute."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import Realtime, error_code

BETA_HEADER = {"OpenAI-Beta": "realtime=v1"}
# dialect → (query string, headers) of the connect request
DIALECTS: dict[str, tuple[str, dict[str, str]]] = {
    "ga": ("?model=gpt-realtime", {}),
    "beta": ("?model=gpt-4o-realtime-preview", BETA_HEADER),
    "unmute": ("", {}),
}
PCM_24K = {"type": "audio/pcm", "rate": 24000}

Dial = Callable[[str], Awaitable[Realtime]]


@pytest.fixture
async def dial(server: TestClient) -> AsyncIterator[Dial]:
    """Open a raw session in a dialect; nothing is read from it yet."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_session(dialect: str) -> Realtime:
        query, headers = DIALECTS[dialect]
        ws = await server.ws_connect("/v1/realtime" + query, protocols=("realtime",),
                                     headers=headers)
        sockets.append(ws)
        return Realtime(ws)

    yield open_session
    for ws in sockets:
        await ws.close()


async def ready(dial: Dial, dialect: str) -> Realtime:
    """A session in ``dialect`` whose ``session.created`` (if any) was read."""
    session = await dial(dialect)
    if dialect != "unmute":
        created = await session.receive()
        assert created["type"] == "session.created", created
    return session


async def update(session: Realtime, fields: dict[str, Any]) -> dict[str, Any]:
    """Send a session.update; return the ``session`` of its ``session.updated``."""
    updated = await session.request({"type": "session.update", "session": fields})
    assert updated["type"] == "session.updated", updated
    shown: dict[str, Any] = updated["session"]
    return shown


def voice_in(dialect: str, session: dict[str, Any]) -> Any:
    return session["audio"]["output"]["voice"] if dialect == "ga" else session["voice"]


# ── what each dialect sees first ─────────────────────────────────────────────


async def test_ga_clients_get_a_realtime_session_first(dial: Dial) -> None:
    session = await dial("ga")

    created = await session.receive()

    assert created["type"] == "session.created"
    assert created["session"]["type"] == "realtime"
    assert created["session"]["model"] == "gpt-realtime"
    assert created["session"]["audio"]["output"]["format"] == PCM_24K
    assert created["session"]["audio"]["input"]["format"] == PCM_24K


async def test_beta_clients_get_flat_audio_formats_first(dial: Dial) -> None:
    session = await dial("beta")

    created = await session.receive()

    assert created["type"] == "session.created"
    assert created["session"]["input_audio_format"] == "pcm16"
    assert created["session"]["output_audio_format"] == "pcm16"


@pytest.mark.parametrize(("request_event", "answer"), [
    ({"type": "session.characters.list"}, "session.characters.listed"),
    ({"type": "session.update", "session": {"allow_recording": False}}, "session.updated"),
])
async def test_unmute_clients_get_no_session_created(
    dial: Dial, request_event: dict[str, Any], answer: str
) -> None:
    session = await dial("unmute")

    first = await session.request(request_event)

    assert first["type"] == answer


async def test_unmute_session_updated_echoes_voice_and_recording(dial: Dial) -> None:
    session = await dial("unmute")

    shown = await update(session, {
        "voice": "Margaux",
        "instructions": {"type": "constant", "text": "Parle de pain."},
        "allow_recording": True,
    })

    assert shown["voice"] == "Margaux"
    assert shown["allow_recording"] is True


async def test_unmute_clients_are_told_about_an_unknown_voice(dial: Dial) -> None:
    session = await dial("unmute")

    refused = await session.request({"type": "session.update", "session": {"voice": "Nobody"}})

    assert error_code(refused) == "character_not_found"


# ── session.update in every dialect ──────────────────────────────────────────


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_unknown_fields_are_ignored(dial: Dial, dialect: str) -> None:
    session = await ready(dial, dialect)

    updated = await session.request({
        "type": "session.update",
        "whatever_top_level": True,
        "session": {
            "input_audio_transcription": {"model": "whisper-1"},
            "tool_choice": "auto",
            "whatever": 1,
        },
    })

    assert updated["type"] == "session.updated", updated


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_voice_selects_a_character_of_the_session(dial: Dial, dialect: str) -> None:
    session = await ready(dial, dialect)

    shown = await update(session, {"voice": "Bramble"})

    assert voice_in(dialect, shown) == "Bramble"


async def test_ga_audio_output_voice_selects_a_character(dial: Dial) -> None:
    session = await ready(dial, "ga")

    shown = await update(session, {"type": "realtime", "audio": {"output": {"voice": "Margaux"}}})

    assert shown["audio"]["output"]["voice"] == "Margaux"


async def test_beta_openai_fields_are_applied(dial: Dial) -> None:
    session = await ready(dial, "beta")
    tool = {"type": "function", "name": "lookup", "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}

    shown = await update(session, {
        "modalities": ["text"],
        "instructions": "Answer in one sentence.",
        "input_audio_format": "pcm16",
        "output_audio_format": "opus",
        "turn_detection": None,
        "tools": [tool],
        "temperature": 0.6,
    })

    assert shown["modalities"] == ["text"]
    assert shown["instructions"] == "Answer in one sentence."
    assert shown["input_audio_format"] == "pcm16"
    assert shown["output_audio_format"] == "opus"
    assert shown["turn_detection"] is None
    assert shown["tools"] == [tool]
    assert shown["temperature"] == 0.6


# ── audio formats ────────────────────────────────────────────────────────────


async def test_ga_format_objects_are_accepted(dial: Dial) -> None:
    session = await ready(dial, "ga")

    shown = await update(session, {"type": "realtime", "audio": {
        "input": {"format": PCM_24K}, "output": {"format": PCM_24K},
    }})

    assert shown["audio"]["input"]["format"] == PCM_24K
    assert shown["audio"]["output"]["format"] == PCM_24K


@pytest.mark.parametrize(("dialect", "fields", "param"), [
    pytest.param("ga", {"audio": {"output": {"format": {"type": "audio/pcmu"}}}},
                 "session.audio.output.format", id="ga-type"),
    pytest.param("ga", {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
                 "session.audio.input.format", id="ga-rate"),
    pytest.param("beta", {"input_audio_format": "g711_ulaw"},
                 "session.input_audio_format", id="beta"),
])
async def test_an_unsupported_format_is_refused_and_changes_nothing(
    dial: Dial, dialect: str, fields: dict[str, Any], param: str
) -> None:
    session = await ready(dial, dialect)
    before = await update(session, {})

    refused = await session.request({"type": "session.update", "session": fields})

    assert error_code(refused) == "invalid_event"
    assert refused["error"]["param"] == param
    assert await update(session, {}) == before
