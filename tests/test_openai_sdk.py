"""The official ``openai`` SDK's realtime clients against the real server.

    AsyncOpenAI(websocket_base_url="ws://127.0.0.1:PORT/v1")
        .realtime.connect(model=…)       ─▶ GA dialect   (GA event names, session.type)
        .beta.realtime.connect(model=…)  ─▶ beta dialect (OpenAI-Beta: realtime=v1)

The SDK parses server events leniently (``construct_type_unchecked``): a frame that
does not match its models still comes back as *some* object, an unknown ``type`` as
the union's first variant. So besides driving a text turn through each client, the
tests replay the SDK's handshake (its URL and headers) with a plain aiohttp
client and validate every raw event strictly against the SDK's pydantic model for
its ``type``: anything that fails there would break a client that trusts the types.
The spoken turns (section 4) go through the SDK's own connection and check each frame
both ways: as the SDK parsed it, and strictly as sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterable
from typing import Any, Literal, get_args, get_origin

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, MakeServer
from openai import AsyncOpenAI
from openai.types.beta.realtime.realtime_server_event import (
    RealtimeServerEvent as BetaServerEvent,
)
from openai.types.realtime.realtime_server_event import RealtimeServerEvent as GAServerEvent
from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest
from pydantic import BaseModel, TypeAdapter, ValidationError

from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS, tone
from tests.fakes.openai_chat import FakeOpenAI, text

MODEL = "m"
WITHIN = 20.0 * SCALE
Dialect = Literal["ga", "beta"]
UNIONS: dict[str, Any] = {"ga": GAServerEvent, "beta": BetaServerEvent}


# ── the SDK's models ─────────────────────────────────────────────────────────


def variants(union: Any) -> dict[str, type[BaseModel]]:
    """The SDK's event model for each ``type`` value of a server-event union."""
    members = get_args(get_args(union)[0])  # Annotated[Union[...], discriminator]
    table: dict[str, type[BaseModel]] = {}
    for model in members:
        for tag in declared_types(model):
            table[tag] = model
    return table


def declared_types(model: type[BaseModel]) -> tuple[str, ...]:
    annotation = model.model_fields["type"].annotation
    assert get_origin(annotation) is Literal, (model, annotation)
    return get_args(annotation)


MODELS = {dialect: variants(union) for dialect, union in UNIONS.items()}


def check_parsed(event: BaseModel) -> None:
    """An event the SDK handed us is its own type for that event, not a fallback
    variant, with every field that type requires."""
    event_type = getattr(event, "type", None)
    assert event_type in declared_types(type(event)), (
        f"the SDK parsed {event_type!r} as {type(event).__name__} (a fallback variant): "
        "it does not know this event")
    required = {name for name, field in type(event).model_fields.items() if field.is_required()}
    missing = required - event.model_fields_set
    assert not missing, f"{event_type}: missing required fields {sorted(missing)}"


def mismatches(dialect: Dialect, raw: dict[str, Any]) -> list[str]:
    """Why the SDK's models reject ``raw`` (strict pydantic validation); [] if valid."""
    event_type = raw.get("type")
    model = MODELS[dialect].get(event_type) if isinstance(event_type, str) else None
    if model is None:
        return [f"{event_type}: not a server event type of the SDK's {dialect} union"]
    try:
        model.model_validate(raw, strict=True)
    except ValidationError as exc:
        return [
            f"{event_type} ({model.__name__}): "
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}; "
            f"sent {error['input']!r}"
            for error in relevant(exc.errors(include_url=False))
        ]
    # The whole union must take it too (what a TypeAdapter user would do).
    TypeAdapter(UNIONS[dialect]).validate_python(raw, strict=True)
    return []


def relevant(errors: list[Any]) -> list[Any]:
    """Pydantic tries every member of a nested union (the SDK tags them with its own
    metadata, not pydantic's): keep the errors of the members whose ``type`` and
    ``role`` match what was sent, unless none does."""
    def branches(loc: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [loc[:i + 1] for i, part in enumerate(loc)
                if isinstance(part, str) and part[:1].isupper()]

    wrong = {loc[:-1] for loc in (tuple(e["loc"]) for e in errors)
             if branches(loc) and loc[:-1] == branches(loc)[-1]
             and loc[-1] in ("type", "role")}
    kept = [e for e in errors if not any(b in wrong for b in branches(tuple(e["loc"])))]
    return kept or errors


# ── connecting ───────────────────────────────────────────────────────────────


def sdk_client(server: TestClient) -> AsyncOpenAI:
    port = server.port
    return AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1",
                       websocket_base_url=f"ws://127.0.0.1:{port}/v1")


async def until_done(events: AsyncIterable[Any]) -> list[Any]:
    """Events from the iterator up to and including ``response.done``."""
    received: list[Any] = []
    async with asyncio.timeout(WITHIN):
        async for event in events:
            received.append(event)
            if event.type == "response.done":
                break
    return received


USER_ITEM = {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Hi"}]}
GA_SESSION = {"type": "realtime", "output_modalities": ["text"], "instructions": "Be brief.",
              "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                        "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
BETA_SESSION = {"modalities": ["text"], "instructions": "Be brief.",
                "input_audio_format": "pcm16", "output_audio_format": "pcm16"}


# ── 1. the GA client ─────────────────────────────────────────────────────────


async def test_ga_client_has_a_text_turn(
    fake_openai: FakeOpenAI, make_server: MakeServer
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Hello", " there"))

    async with sdk_client(server) as client, client.realtime.connect(model=MODEL) as connection:
        created = await asyncio.wait_for(connection.recv(), WITHIN)
        await connection.session.update(session=GA_SESSION)  # type: ignore[arg-type]
        updated = await asyncio.wait_for(connection.recv(), WITHIN)
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        events = await until_done(connection)

    for event in (created, updated, *events):
        check_parsed(event)
    assert created.type == "session.created"
    assert isinstance(created.session, RealtimeSessionCreateRequest)
    assert created.session.type == "realtime"
    assert updated.type == "session.updated"
    assert isinstance(updated.session, RealtimeSessionCreateRequest)
    assert updated.session.output_modalities == ["text"]
    assert updated.session.instructions == "Be brief."
    kinds = [e.type for e in events]
    assert kinds[:2] == ["conversation.item.added", "response.created"]
    assert set(kinds[2:-2]) == {"response.output_text.delta"}
    assert kinds[-2:] == ["response.output_text.done", "response.done"]
    said = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert said == "Hello there" == events[-2].text
    assert events[0].item.role == "user"
    assert events[-1].response.status == "completed"
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user", "content": "Hi"}


# ── 2. the beta client ───────────────────────────────────────────────────────


async def test_beta_client_has_a_text_turn(
    fake_openai: FakeOpenAI, make_server: MakeServer
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Hello", " there"))

    async with (sdk_client(server) as client,
                client.beta.realtime.connect(model=MODEL) as connection):
        created = await asyncio.wait_for(connection.recv(), WITHIN)
        await connection.session.update(session=BETA_SESSION)  # type: ignore[arg-type]
        updated = await asyncio.wait_for(connection.recv(), WITHIN)
        await connection.conversation.item.create(item=USER_ITEM)  # type: ignore[arg-type]
        await connection.response.create()
        events = await until_done(connection)

    for event in (created, updated, *events):
        check_parsed(event)
    assert created.type == "session.created"
    assert updated.type == "session.updated"
    assert updated.session.modalities == ["text"]
    assert updated.session.instructions == "Be brief."
    kinds = [e.type for e in events]
    assert kinds[:2] == ["conversation.item.created", "response.created"]
    assert set(kinds[2:-2]) == {"response.text.delta"}
    assert kinds[-2:] == ["response.text.done", "response.done"]
    said = "".join(e.delta for e in events if e.type == "response.text.delta")
    assert said == "Hello there" == events[-2].text
    assert events[-1].response.status == "completed"


# ── 3. every raw event against the SDK's models, strictly ────────────────────


def sdk_handshake(server: TestClient, dialect: Dialect, model: str) -> tuple[str, dict[str, str]]:
    """The URL and headers the SDK's client of ``dialect`` connects with (the two
    tests above show the server tells them apart by exactly this)."""
    headers = {"Authorization": "Bearer x"}
    if dialect == "beta":
        headers["OpenAI-Beta"] = "realtime=v1"
    return f"ws://127.0.0.1:{server.port}/v1/realtime?model={model}", headers


@pytest.mark.parametrize(("dialect", "model"), [
    ("ga", MODEL),
    ("beta", MODEL),
    # The beta models type session.model as a closed list of OpenAI's names.
    ("beta", "gpt-4o-realtime-preview"),
])
async def test_every_event_validates_against_the_sdk_models(
    dialect: Dialect, model: str, fake_openai: FakeOpenAI, make_server: MakeServer,
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Hello", " there"))
    uri, headers = sdk_handshake(server, dialect, model)
    session = GA_SESSION if dialect == "ga" else BETA_SESSION

    raw: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(uri, headers=headers) as ws:

        async def receive() -> dict[str, Any]:
            message = await ws.receive(timeout=WITHIN)
            assert message.type is aiohttp.WSMsgType.TEXT, message
            event: dict[str, Any] = json.loads(message.data)
            raw.append(event)
            return event

        async def send(event: dict[str, Any]) -> None:
            await ws.send_str(json.dumps(event))

        assert (await receive())["type"] == "session.created"
        await send({"type": "session.update", "session": session})
        assert (await receive())["type"] == "session.updated"
        await send({"type": "response.cancel"})  # nothing to cancel: an error event
        assert (await receive())["type"] == "error"
        await send({"type": "conversation.item.create", "item": USER_ITEM})
        await send({"type": "response.create"})
        while (await receive())["type"] != "response.done":
            pass

    found = [problem for event in raw for problem in mismatches(dialect, event)]
    assert not found, (
        f"{len(found)} mismatch(es) with the SDK's {dialect} models:\n" + "\n".join(found))


# ── 4. spoken turns: audio in through the SDK, audio and transcript out ──────

HEARD = (("Ahoy", 0.3), ("captain", 0.7))
"""What the fake STT hears (word, start in seconds of audio); speech ends at 1.1 s."""
SAID = ("Aye, ", "aye.")
"""The fake LLM's reply: two words for the fake TTS, so two words of its tone."""
PCM_CHUNK = 2400
"""Samples in each input_audio_buffer.append (100 ms at 24 kHz)."""
GA_SPOKEN = {"type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
             "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                       "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
BETA_SPOKEN = {"modalities": ["text", "audio"], "instructions": "Be brief.",
               "input_audio_format": "pcm16", "output_audio_format": "pcm16"}
# (the dialect's own event names) audio delta, audio done, transcript delta, transcript
# done, the user item's event
NAMES = {
    "ga": ("response.output_audio.delta", "response.output_audio.done",
           "response.output_audio_transcript.delta", "response.output_audio_transcript.done",
           "conversation.item.added"),
    "beta": ("response.audio.delta", "response.audio.done",
             "response.audio_transcript.delta", "response.audio_transcript.done",
             "conversation.item.created"),
}


def microphone(seconds: float) -> list[str]:
    """``seconds`` of pcm16 24 kHz (a quiet 300 Hz hum; the fake STT only counts
    samples), base64, in 100 ms appends."""
    t = np.arange(round(seconds * 24_000)) / 24_000
    pcm = (3000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
    step = 2 * PCM_CHUNK
    return [base64.b64encode(pcm[at:at + step]).decode() for at in range(0, len(pcm), step)]


async def received_until(connection: Any, last: str, raw: list[dict[str, Any]]) -> list[Any]:
    """Events through the SDK up to and including the first of type ``last``; the raw
    frames go to ``raw`` (each one is also parsed by the SDK itself)."""
    parsed: list[Any] = []
    async with asyncio.timeout(WITHIN):
        while not parsed or parsed[-1].type != last:
            data = await connection.recv_bytes()
            raw.append(json.loads(data))
            parsed.append(connection.parse_event(data))
    return parsed


def strictly_valid(dialect: Dialect, parsed: list[Any], raw: list[dict[str, Any]]) -> None:
    """Each event as the SDK parsed it (``check_parsed``) and as sent (``mismatches``):
    every problem is listed at once."""
    found = [problem for event in raw for problem in mismatches(dialect, event)]
    for event in parsed:
        try:
            check_parsed(event)
        except AssertionError as exc:
            found.append(f"parsed by the SDK: {exc}".partition("\nassert")[0])
    assert not found, (
        f"{len(found)} mismatch(es) with the SDK's {dialect} models:\n" + "\n".join(found))


@pytest.fixture
async def voice_server(fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT,
                       fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer) -> TestClient:
    """A server whose STT, LLM and TTS are the loopback fakes, scripted for one turn."""
    fake_kyutai_stt.script(*HEARD, end=1.1)
    fake_openai.script(text(*SAID))
    return await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url,
                             tts=fake_kyutai_tts.url)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_a_spoken_turn_through_the_sdk(
    dialect: Dialect, voice_server: TestClient, fake_openai: FakeOpenAI,
    fake_kyutai_tts: FakeKyutaiTTS,
) -> None:
    audio_delta, audio_done, transcript_delta, transcript_done, user_item = NAMES[dialect]
    raw: list[dict[str, Any]] = []
    async with sdk_client(voice_server) as client:
        connect = client.realtime.connect if dialect == "ga" else client.beta.realtime.connect
        async with connect(model=MODEL) as connection:
            opened = await received_until(connection, "session.created", raw)
            session = GA_SPOKEN if dialect == "ga" else BETA_SPOKEN
            await connection.session.update(session=session)  # type: ignore[arg-type]
            opened += await received_until(connection, "session.updated", raw)
            for chunk in microphone(2.0):  # the pause after 1.1 s ends the turn
                await connection.input_audio_buffer.append(audio=chunk)
            events = await received_until(connection, "response.done", raw)

    kinds = [e.type for e in events]
    assert kinds[0] == "input_audio_buffer.speech_started"
    heard = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
    assert [e.delta for e in heard] == ["Ahoy", " captain"]
    turn_end = kinds.index("input_audio_buffer.speech_stopped")
    assert kinds.index(heard[-1].type) < turn_end < kinds.index("response.created")
    item = next(e.item for e in events if e.type == user_item)
    assert item.role == "user"
    completed = next(e for e in events
                     if e.type == "conversation.item.input_audio_transcription.completed")
    assert completed.transcript == "Ahoy captain"
    assert kinds.index(completed.type) < kinds.index("response.created")

    reply = events[kinds.index("response.created") + 1:]
    assert {e.type for e in reply[:-3]} == {audio_delta, transcript_delta}
    assert [e.type for e in reply[-3:]] == [transcript_done, audio_done, "response.done"]
    said = "".join(e.delta for e in reply if e.type == transcript_delta)
    assert said == "Aye, aye." == reply[-3].transcript
    audio = b"".join(base64.b64decode(e.delta) for e in reply if e.type == audio_delta)
    assert len(audio) == 2 * 2 * fake_kyutai_tts.samples_per_word  # pcm16, two words
    decoded = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768
    np.testing.assert_allclose(
        decoded, np.concatenate([tone(0, fake_kyutai_tts.samples_per_word),
                                 tone(1, fake_kyutai_tts.samples_per_word)]), atol=1e-4)
    done = reply[-1].response
    assert done.status == "completed"
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user",
                                                       "content": "Ahoy captain"}
    strictly_valid(dialect, opened + events, raw)


async def test_push_to_talk_through_the_beta_sdk(
    voice_server: TestClient, fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS,
) -> None:
    raw: list[dict[str, Any]] = []
    async with (sdk_client(voice_server) as client,
                client.beta.realtime.connect(model=MODEL) as connection):
        opened = await received_until(connection, "session.created", raw)
        await connection.session.update(
            session={**BETA_SPOKEN, "turn_detection": None})  # type: ignore[arg-type]
        opened += await received_until(connection, "session.updated", raw)
        for chunk in microphone(1.5):  # no pause ends anything: the client decides
            await connection.input_audio_buffer.append(audio=chunk)
        await connection.input_audio_buffer.commit()
        heard = await received_until(
            connection, "conversation.item.input_audio_transcription.completed", raw)
        await connection.response.create()
        events = await received_until(connection, "response.done", raw)

    assert opened[-1].session.turn_detection is None
    kinds = [e.type for e in heard]
    assert "input_audio_buffer.speech_started" not in kinds
    assert "input_audio_buffer.speech_stopped" not in kinds
    assert [e.delta for e in heard
            if e.type == "conversation.item.input_audio_transcription.delta"] == [
        "Ahoy", " captain"]
    assert kinds[-3:] == ["input_audio_buffer.committed", "conversation.item.created",
                          "conversation.item.input_audio_transcription.completed"]
    assert heard[-1].transcript == "Ahoy captain"
    assert heard[-2].item.content[0].transcript == "Ahoy captain"
    assert heard[-3].item_id == heard[-2].item.id == heard[-1].item_id

    assert events[0].type == "response.created"
    said = "".join(e.delta for e in events if e.type == "response.audio_transcript.delta")
    assert said == "Aye, aye."
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.audio.delta")
    assert len(audio) == 2 * 2 * fake_kyutai_tts.samples_per_word
    assert [e.type for e in events[-3:]] == [
        "response.audio_transcript.done", "response.audio.done", "response.done"]
    assert events[-1].response.status == "completed"
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user",
                                                       "content": "Ahoy captain"}
    strictly_valid("beta", opened + heard + events, raw)
