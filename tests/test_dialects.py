"""The three client families, recognised at connect and answered in their own shapes
(DESIGN.md §2): OpenAI GA, OpenAI beta, and Unmute."""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient
from conftest import Realtime, error_code

from server.conversation import events
from server.conversation.events import SessionFields
from server.conversation.settings import SessionSettings
from server.errors import TroupeError
from server.realtime import protocol
from server.realtime.dialects import Dialect, Edge, render

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


# ── the pure parts: settings, rendering, decoding, the edge ──────────────────


def _fields(**given: Any) -> SessionFields:
    return msgspec.convert(given, SessionFields)


def test_settings_take_both_openai_shapes_and_leave_out_the_voice() -> None:
    settings = SessionSettings("sess_1", "m")
    settings.apply(_fields(voice="Ada", instructions="Be brief.", modalities=["text"],
                           input_audio_format="opus", temperature=0.3,
                           turn_detection=None, tools=[{"type": "function"}]))
    assert (settings.voice, settings.instructions, settings.modalities) == (
        None, "Be brief.", ["text"])
    assert (settings.input_audio_format, settings.output_audio_format) == ("opus", "pcm16")
    assert (settings.temperature, settings.turn_detection) == (0.3, None)

    settings.apply(_fields(output_modalities=["audio"], audio={
        "input": {"format": {"type": "audio/pcm", "rate": 24000},
                  "turn_detection": {"type": "server_vad"}},
        "output": {"format": {"type": "audio/opus"}, "voice": "Bea"}}))
    assert (settings.input_audio_format, settings.output_audio_format) == ("pcm16", "opus")
    assert settings.modalities == ["audio"]
    assert settings.turn_detection == {"type": "server_vad"}
    assert settings.requested_voice(_fields(audio={"output": {"voice": "Bea"}})) == "Bea"
    # A field not sent changes nothing; turn_detection's null is a value.
    settings.apply(_fields())
    assert settings.turn_detection == {"type": "server_vad"} and settings.temperature == 0.3


@pytest.mark.parametrize("fields", [
    {"input_audio_format": "g711_ulaw"},
    {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}},
])
def test_settings_refuse_a_format_before_changing_anything(fields: dict[str, Any]) -> None:
    settings = SessionSettings("sess_1", "m")
    with pytest.raises(TroupeError) as refused:
        settings.apply(_fields(temperature=0.1, **fields))
    assert refused.value.code == "invalid_event"
    assert refused.value.param is not None and refused.value.param.startswith("session.")
    assert settings.temperature == 0.8


def test_each_dialect_renders_the_settings_in_its_shape() -> None:
    settings = SessionSettings("sess_1", "gpt-realtime", voice="Ada",
                               input_audio_format="opus", allow_recording=True)
    ga, beta, unmute = (render(dialect, settings) for dialect in Dialect)
    assert ga["type"] == "realtime" and ga["model"] == "gpt-realtime"
    assert ga["audio"]["input"]["format"] == {"type": "audio/opus"}
    assert ga["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                     "voice": "Ada"}
    assert beta["model"] is None  # the beta SDK checks it against OpenAI's names
    assert (beta["input_audio_format"], beta["voice"]) == ("opus", "Ada")
    assert unmute == {"voice": "Ada", "instructions": None, "allow_recording": True}


def test_decoding_names_what_to_fix() -> None:
    event = protocol.decode_client('{"type": "session.characters.reload", "directory": "d",'
                                   ' "extra": 1}')
    assert event == events.CharactersReload(directory="d")
    with pytest.raises(protocol.InvalidEvent) as unknown:
        protocol.decode_client('{"type": "nope", "event_id": "e1"}')
    assert (unknown.value.param, unknown.value.event_id) == ("type", "e1")
    assert all(name in str(unknown.value) for name in protocol.CLIENT_EVENT_TYPES)
    with pytest.raises(protocol.InvalidEvent) as wrong:
        protocol.decode_client('{"type": "input_audio_buffer.append", "audio": 5}')
    assert wrong.value.param == "audio"
    with pytest.raises(protocol.InvalidEvent, match="nests"):
        protocol.decode_client('{"type": "response.create", "response": ' + "[" * 70
                               + "]" * 70 + "}")


def test_client_event_types_come_from_the_union() -> None:
    assert set(protocol.CLIENT_EVENT_TYPES) == {
        protocol.tag(event) for event in typing.get_args(events.ClientEventUnion)}
    assert "session.characters.reload" in protocol.CLIENT_EVENT_TYPES


def _reply_events() -> list[events.Outgoing]:
    """A spoken reply as the conversation emits it, whoever listens."""
    info = events.ResponseInfo(id="r", status="completed", voice="Ada", output=[
        events.MessageItem(id="i", role="assistant",
                           content=[{"type": "audio", "transcript": "Hi there"}])])
    return [
        events.ResponseCreated(response=info),
        events.AudioTranscriptDelta(delta="Hi th", response_id="r", item_id="i"),
        events.AudioDeltaReady(number_of_samples=1920),
        events.AudioDelta(delta="AAAA", response_id="r", item_id="i"),
        events.AudioTranscriptDelta(delta="ere", response_id="r", item_id="i"),
        events.TextComplete(response_id="r", item_id="i"),
        events.AdditionalOutputs(args={"chat_history": []}),
        events.AudioTranscriptDone(transcript="Hi there", response_id="r", item_id="i"),
        events.AudioDone(response_id="r", item_id="i"),
        events.ResponseDone(response=info),
    ]


def _shown(dialect: Dialect) -> list[events.ServerEvent]:
    edge = Edge(dialect)
    return [shown for event in _reply_events() for shown in edge.out(event)]


def test_the_ga_edge_renames_and_drops_unmutes_bookkeeping() -> None:
    shown = _shown(Dialect.GA)
    assert [protocol.tag(type(e)) for e in shown] == [
        "response.created", "response.output_audio_transcript.delta",
        "response.output_audio.delta", "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done", "response.output_audio.done",
        "response.done"]
    done = shown[-1]
    assert isinstance(done, events.ResponseDone)
    assert done.response.output[0].content == [{"type": "output_audio",
                                                "transcript": "Hi there"}]
    beta = _shown(Dialect.BETA)
    assert [type(e) for e in beta] == [type(e) for e in _reply_events()
                                       if not isinstance(e, (
                                           events.TextComplete, events.AudioDeltaReady,
                                           events.AdditionalOutputs))]


def test_the_unmute_edge_sends_whole_words_and_its_own_events_only() -> None:
    shown = _shown(Dialect.UNMUTE)
    kinds = [protocol.tag(type(e)) for e in shown]
    assert kinds == [
        "response.created", "unmute.response.text.delta.ready", "response.text.delta",
        "unmute.response.audio.delta.ready", "response.audio.delta",
        "unmute.response.text.delta.ready", "response.text.delta",
        "unmute.additional_outputs", "response.text.done", "response.audio.done"]
    words = [e.delta for e in shown if isinstance(e, events.TextDelta)]
    assert words == ["Hi", "there"]  # "there" once the text is complete, not at its end
    done = shown[-2]
    assert isinstance(done, events.TextDone) and done.text == "Hi there"


def test_a_cancelled_replys_last_piece_is_not_the_next_ones_first_word() -> None:
    edge = Edge(Dialect.UNMUTE)
    info = events.ResponseInfo(id="r", status="cancelled", voice="Ada")
    for event in (events.TextDelta(delta="unfini", response_id="r", item_id="i"),
                  events.ResponseDone(response=info), events.ResponseCreated(response=info)):
        edge.out(event)
    shown = edge.out(events.TextDelta(delta="Hello again", response_id="r", item_id="i"))
    assert [e.delta for e in shown if isinstance(e, events.TextDelta)] == ["Hello"]


def test_the_settings_are_rendered_at_the_edge() -> None:
    settings = SessionSettings("sess_1", "m", voice="Ada")
    assert Edge(Dialect.UNMUTE).out(events.SessionCreated(session=settings)) == []
    [updated] = Edge(Dialect.BETA).out(events.SessionUpdated(session=settings))
    assert isinstance(updated, events.SessionUpdated)
    assert updated.session == render(Dialect.BETA, settings)
