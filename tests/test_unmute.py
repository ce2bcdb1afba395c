"""The Unmute dialect end to end (DESIGN.md §2): a client without ``?model=``, Ogg
Opus both ways, the character speaking first, barge-in, nudges and goodbyes.

    test ──session.update {voice, instructions, allow_recording}──▶ server
         ◀── session.updated, then the greeting: response.created, text deltas,
             response.audio.delta (pages of ONE Ogg Opus stream for the session) …
         ──input_audio_buffer.append (base64 slices of ONE Ogg Opus stream)──▶
             fake STT (scripted words and pause) ─▶ turn-taking ─▶ fake LLM ─▶ fake TTS

Unmute's clients validate every server event against a closed union of pydantic
models; ``UNMUTE_MODELS`` below restates the fields those models require (from
``unmute/openai_realtime_api_events.py``), and every event these tests receive is
checked against it on arrival.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, MakeServer, character_source, write_directory
from pydantic import BaseModel, ValidationError

from server.app import SESSIONS
from server.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusDecoder, OpusEncoder
from server.realtime import protocol
from server.realtime.dialects import Dialect, accepts
from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS, tone
from tests.fakes.openai_chat import FakeOpenAI, stall, text

WITHIN = 20.0 * SCALE
VOICE = "Wren"
INSTRUCTIONS = {"type": "constant", "text": "Be brief.", "language": "en"}
"""What Unmute's frontend sends: one of its instruction objects, not a string."""
HELLO = {"type": "session.update",
         "session": {"voice": VOICE, "instructions": INSTRUCTIONS, "allow_recording": False}}

Samples = npt.NDArray[np.float32]


# ── Unmute's server-event union, as its pydantic models require ──────────────


class _Event(BaseModel):
    event_id: str = ""


class _ErrorDetails(BaseModel):
    type: str
    code: str | None = None
    message: str
    param: str | None = None
    details: object | None = None


class _Instructions(BaseModel):
    type: Literal["constant", "smalltalk", "guess_animal", "quiz_show", "news",
                  "unmute_explanation"]
    text: str | None = None
    language: Literal["en", "fr", "en/fr", "fr/en"] | None = None


class _SessionConfig(BaseModel):
    instructions: _Instructions | None = None
    voice: str | None = None
    allow_recording: bool


class _Response(BaseModel):
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    voice: str
    chat_history: list[dict[str, Any]] = []


class _Error(_Event):
    error: _ErrorDetails


class _SessionUpdated(_Event):
    session: _SessionConfig


class _ResponseCreated(_Event):
    response: _Response


class _Delta(_Event):
    delta: str


class _TextDone(_Event):
    text: str


class _Nothing(_Event):
    pass


class _TranscriptionDelta(_Event):
    delta: str
    start_time: float


class _AdditionalOutputs(_Event):
    args: Any


class _AudioDeltaReady(_Event):
    number_of_samples: int


class _Character(BaseModel):
    name: str
    good: bool | None
    comment: str | None


class _Characters(_Event):
    directory: str
    characters: list[_Character]


class _CharactersListed(_Characters):
    character_count: int


class _CharactersReloaded(_Characters):
    loaded_count: int
    error_count: int
    total_files: int
    errors: list[dict[str, str]]
    duration_ms: float


UNMUTE_MODELS: dict[str, type[_Event]] = {
    "error": _Error,
    "session.updated": _SessionUpdated,
    "response.created": _ResponseCreated,
    "response.text.delta": _Delta,
    "response.text.done": _TextDone,
    "response.audio.delta": _Delta,
    "response.audio.done": _Nothing,
    "conversation.item.input_audio_transcription.delta": _TranscriptionDelta,
    "input_audio_buffer.speech_started": _Nothing,
    "input_audio_buffer.speech_stopped": _Nothing,
    "unmute.additional_outputs": _AdditionalOutputs,
    "unmute.response.text.delta.ready": _Delta,
    "unmute.response.audio.delta.ready": _AudioDeltaReady,
    "unmute.interrupted_by_vad": _Nothing,
}
"""Unmute's ``ServerEvent`` union, type by type."""
TROUPE_MODELS: dict[str, type[_Event]] = {
    "session.characters.reloaded": _CharactersReloaded,
    "session.characters.listed": _CharactersListed,
}
"""Troupe's own additions, which Unmute-dialect clients of Troupe also accept."""


def unmute_problem(event: dict[str, Any]) -> str | None:
    """Why an Unmute client would reject ``event``; None if it takes it."""
    model = {**UNMUTE_MODELS, **TROUPE_MODELS}.get(event.get("type", ""))
    if model is None:
        return f"{event.get('type')!r} is not in Unmute's server-event union: {event}"
    try:
        model.model_validate(event)
    except ValidationError as exc:
        return f"{event['type']}: {exc}"
    return None


# ── the client ───────────────────────────────────────────────────────────────


class Unmute:
    """An Unmute-dialect session that checks each event as it arrives and keeps them."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(event))

    async def receive(self) -> dict[str, Any]:
        message = await self.ws.receive(timeout=WITHIN)
        assert message.type is aiohttp.WSMsgType.TEXT, (
            f"expected an event, got {message!r} after {self.kinds()[-5:]}")
        return self._take(message.data)

    def _take(self, data: str) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(data)
        self.events.append(event)
        problem = unmute_problem(event)
        assert problem is None, problem
        return event

    async def until(self, kind: str) -> list[dict[str, Any]]:
        """The events up to and including the next one of type ``kind``."""
        taken = [await self.receive()]
        while taken[-1]["type"] != kind:
            taken.append(await self.receive())
        return taken

    async def until_closed(self) -> list[dict[str, Any]]:
        """The events up to the server's close (then ``ws.close_code`` is set)."""
        taken: list[dict[str, Any]] = []
        while True:
            message = await self.ws.receive(timeout=WITHIN)
            if message.type is not aiohttp.WSMsgType.TEXT:
                assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), (
                    message)
                return taken
            taken.append(self._take(message.data))

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]


Open = Callable[[TestClient], Awaitable[Unmute]]


@pytest.fixture
async def unmute() -> AsyncIterator[Open]:
    """Opens Unmute-dialect sessions (no ``?model=``, as Unmute's frontend connects)."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_session(server: TestClient) -> Unmute:
        ws = await server.ws_connect("/v1/realtime", protocols=("realtime",))
        sockets.append(ws)
        return Unmute(ws)

    yield open_session
    for ws in sockets:
        await ws.close()


class Microphone:
    """The client's one Ogg Opus stream for the whole session, sent in slices that
    ignore page boundaries (as a browser's recorder flushes them)."""

    def __init__(self, session: Unmute, seed: int = 7) -> None:
        self.session = session
        self.encoder = OpusEncoder()
        self.sent: list[Samples] = []
        self._random = random.Random(seed)

    async def speak(self, samples: Samples) -> None:
        assert samples.size % FRAME_SAMPLES == 0  # nothing left inside the encoder
        self.sent.append(samples)
        stream = self.encoder.encode(samples)
        at = 0
        while at < len(stream):
            size = self._random.randint(1, 700)
            chunk = base64.b64encode(stream[at:at + size]).decode()
            await self.session.send({"type": "input_audio_buffer.append", "audio": chunk})
            at += size

    async def hum(self, seconds: float) -> None:
        t = np.arange(whole_frames(seconds)) / SAMPLE_RATE
        await self.speak((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))

    async def silence(self, seconds: float) -> None:
        await self.speak(np.zeros(whole_frames(seconds), dtype=np.float32))


def whole_frames(seconds: float) -> int:
    """``seconds`` of samples, rounded up to whole Opus frames."""
    return -(-round(seconds * SAMPLE_RATE) // FRAME_SAMPLES) * FRAME_SAMPLES


# ── the character's Ogg stream ───────────────────────────────────────────────


@dataclass(frozen=True)
class Page:
    header_type: int
    serial: int
    sequence: int
    body: bytes


def ogg_pages(data: bytes) -> list[Page]:
    """Split bytes that must hold whole Ogg pages only."""
    pages: list[Page] = []
    at = 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS", f"no Ogg page at byte {at}"
        serial, sequence = struct.unpack_from("<II", data, at + 14)
        lacing_end = at + 27 + data[at + 26]
        end = lacing_end + sum(data[at + 27:lacing_end])
        assert end <= len(data), "the last page is cut short"
        pages.append(Page(data[at + 5], serial, sequence, data[lacing_end:end]))
        at = end
    return pages


def audio_of(events: list[dict[str, Any]]) -> list[bytes]:
    return [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"]


def one_ogg_opus_stream(deltas: list[bytes]) -> Samples:
    """Check that the payloads are whole pages of a single Ogg Opus stream (one
    header, one serial number, no page missing); return its decoded samples."""
    for delta in deltas:
        ogg_pages(delta)  # each delta alone is whole pages
    stream = b"".join(deltas)
    pages = ogg_pages(stream)
    assert [p.header_type & 0x02 for p in pages].count(0x02) == 1, "more than one stream"
    assert pages[0].header_type & 0x02 and pages[0].body.startswith(b"OpusHead")
    assert pages[1].body.startswith(b"OpusTags")
    assert not any(p.body.startswith(b"OpusHead") for p in pages[1:])
    assert {p.serial for p in pages} == {pages[0].serial}
    assert [p.sequence for p in pages] == list(range(len(pages)))
    return OpusDecoder().decode(stream)


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def best_correlation(received: Samples, sent: Samples, max_lag: int = 480) -> float:
    window = min(received.size, sent.size) - max_lag
    return max(float(np.corrcoef(received[lag:lag + window], sent[:window])[0, 1])
               for lag in range(max_lag + 1))


# ── (a) the character greets first ───────────────────────────────────────────


async def test_the_character_greets_first_in_one_ogg_opus_stream(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    unmute: Open,
) -> None:
    fake_openai.script(text("Hello ", "there, ", "friend."))
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    session = await unmute(server)

    await session.send(HELLO)
    events = await session.until("response.audio.done")

    kinds = [e["type"] for e in events]
    assert events[0]["type"] == "session.updated"
    assert events[0]["session"] == {"voice": VOICE, "instructions": INSTRUCTIONS,
                                    "allow_recording": False}
    assert events[1]["type"] == "response.created"
    assert events[1]["response"]["status"] == "in_progress"
    assert events[1]["response"]["voice"] == VOICE
    assert set(kinds[2:-3]) == {
        "unmute.response.text.delta.ready", "response.text.delta",
        "unmute.response.audio.delta.ready", "response.audio.delta"}
    assert kinds[-3:] == ["unmute.additional_outputs", "response.text.done",
                          "response.audio.done"]
    # Unmute's frontend puts the spaces between words; the model's pieces come as is.
    said = " ".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    ready = "".join(e["delta"] for e in events
                    if e["type"] == "unmute.response.text.delta.ready")
    assert said == ready == events[-2]["text"] == "Hello there, friend."
    history = events[-3]["args"]["chat_history"]
    assert history[0]["role"] == "system"
    assert history[-1] == {"role": "assistant", "content": "Hello there, friend."}

    # Each audio delta is announced with its sample count, and the counts add up to
    # what the TTS said: three words of its tone.
    expected = 3 * fake_kyutai_tts.samples_per_word
    for at, kind in enumerate(kinds):
        if kind == "response.audio.delta":
            assert kinds[at - 1] == "unmute.response.audio.delta.ready"
    counts = [e["number_of_samples"] for e in events
              if e["type"] == "unmute.response.audio.delta.ready"]
    assert sum(counts) == expected
    decoded = one_ogg_opus_stream(audio_of(events))
    assert abs(decoded.size - expected) < FRAME_SAMPLES
    spoken = np.concatenate([tone(i, fake_kyutai_tts.samples_per_word) for i in range(3)])
    assert rms(decoded) == pytest.approx(rms(spoken), rel=0.2)
    assert best_correlation(decoded, spoken) > 0.9
    assert fake_kyutai_tts.connections[0].texts == ["Hello", "there,", "friend."]


# ── (b) a spoken turn in Ogg Opus, answered in the same Ogg stream ───────────


async def test_a_spoken_turn_in_ogg_opus_is_transcribed_and_answered(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT, fake_kyutai_tts: FakeKyutaiTTS,
    make_server: MakeServer, unmute: Open,
) -> None:
    fake_openai.script(text("Welcome."), text("Aye, ", "aye."))
    fake_kyutai_stt.script(("Ahoy", 0.3), ("captain", 0.7), end=1.1)
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url,
                               tts=fake_kyutai_tts.url)
    session = await unmute(server)
    microphone = Microphone(session)

    await session.send(HELLO)
    greeting = await session.until("response.audio.done")
    await microphone.hum(2.0)  # the pause after 1.1 s ends the person's turn
    turn = await session.until("response.created")
    reply = await session.until("response.audio.done")

    kinds = [e["type"] for e in turn]
    assert kinds[0] == "input_audio_buffer.speech_started"
    heard = [e for e in turn if e["type"] == "conversation.item.input_audio_transcription.delta"]
    assert [(e["delta"], e["start_time"]) for e in heard] == [("Ahoy", 0.3), (" captain", 0.7)]
    assert kinds[-2:] == ["input_audio_buffer.speech_stopped", "response.created"]
    reply_kinds = [e["type"] for e in reply]
    assert "conversation.item.input_audio_transcription.delta" not in reply_kinds
    assert " ".join(e["delta"] for e in reply if e["type"] == "response.text.delta") == (
        "Aye, aye.")
    assert reply[-3]["args"]["chat_history"][1:] == [
        {"role": "assistant", "content": "Welcome."},
        {"role": "user", "content": "Ahoy captain"},
        {"role": "assistant", "content": "Aye, aye."},
    ]
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user",
                                                       "content": "Ahoy captain"}

    # The server decoded the slices of the Ogg stream into the audio that was sent.
    received = np.array(fake_kyutai_stt.connections[0].samples, dtype=np.float32)
    assert received.size >= SAMPLE_RATE
    assert best_correlation(received[:SAMPLE_RATE], microphone.sent[0][:SAMPLE_RATE]) > 0.9

    # The reply continues the greeting's Ogg stream: one header for the session.
    first, second = audio_of(greeting), audio_of(reply)
    assert not ogg_pages(second[0])[0].header_type & 0x02  # no new beginning of stream
    decoded = one_ogg_opus_stream(first + second)
    words = 1 + 2  # "Welcome." then "Aye," "aye."
    assert abs(decoded.size - words * fake_kyutai_tts.samples_per_word) < 2 * FRAME_SAMPLES


# ── (b2) subtitles in whole words ────────────────────────────────────────────

PIECES = ("Don", "'t", " wor", "ry,", " ", "I'll he", "lp yo", "u.")
"""A reply as a model streams it: words cut in pieces, spaces leading or alone."""
SAID = "Don't worry, I'll help you."


async def test_unmute_text_deltas_are_whole_words_without_spaces(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    unmute: Open,
) -> None:
    """Unmute's frontend shows each ``response.text.delta`` as a word and joins them
    with spaces (Unmute sends the words its TTS speaks): pieces would read "Don 't"."""
    fake_openai.script(text(*PIECES))
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    session = await unmute(server)

    await session.send(HELLO)
    events = await session.until("response.audio.done")

    kinds = [e["type"] for e in events]
    words = [e["delta"] for e in events if e["type"] == "response.text.delta"]
    assert words == ["Don't", "worry,", "I'll", "help", "you."]
    assert all(word and word == word.strip() for word in words)
    done = events[kinds.index("response.text.done")]
    assert " ".join(words) == done["text"] == SAID
    last_word = len(kinds) - 1 - kinds[::-1].index("response.text.delta")
    assert last_word < kinds.index("response.text.done")
    # The model's own pieces still go out as ``unmute.response.text.delta.ready``.
    assert [e["delta"] for e in events
            if e["type"] == "unmute.response.text.delta.ready"] == list(PIECES)


async def test_openai_text_deltas_stay_the_models_pieces(
    fake_openai: FakeOpenAI, make_server: MakeServer,
) -> None:
    fake_openai.script(text(*PIECES))
    server = await make_server(llm=fake_openai.base_url)
    ws = await server.ws_connect("/v1/realtime?model=m", protocols=("realtime",),
                                 headers={"OpenAI-Beta": "realtime=v1"})
    try:
        await ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Help?"}]}})
        await ws.send_json({"type": "response.create"})
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.text.done":
            events.append(await ws.receive_json(timeout=WITHIN))
    finally:
        await ws.close()

    deltas = [e["delta"] for e in events if e["type"] == "response.text.delta"]
    assert deltas == list(PIECES)
    assert "".join(deltas) == events[-1]["text"] == SAID


# ── (c) nothing outside Unmute's closed union ────────────────────────────────


def server_event_types() -> set[str]:
    """Every event type server/realtime/protocol.py can send."""
    found: set[str] = set()
    classes: list[type[protocol.ServerEvent]] = [protocol.ServerEvent]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        tag = cls.__struct_config__.tag
        if isinstance(tag, str):
            found.add(tag)
    return found


def test_the_unmute_dialect_accepts_exactly_unmutes_union_and_ours() -> None:
    sendable = server_event_types()
    accepted = {kind for kind in sendable if accepts(Dialect.UNMUTE, kind)}

    assert accepted == set(UNMUTE_MODELS) | set(TROUPE_MODELS)
    assert {"session.created", "response.done", "conversation.item.created",
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed"} <= sendable - accepted


async def test_every_event_fits_unmutes_models(
    fake_openai: FakeOpenAI, make_server: MakeServer, unmute: Open, allowed_root: Path,
) -> None:
    fake_openai.script(text("Hi."), stall("Once upon"), text("Hello, Bea."))
    server = await make_server(llm=fake_openai.base_url)
    session = await unmute(server)

    await session.send({"type": "bogus"})
    await session.send({"type": "session.update", "session": {
        "voice": "Nobody", "instructions": INSTRUCTIONS, "allow_recording": True}})
    refused = [await session.receive(), await session.receive()]
    await session.send({"type": "session.characters.list"})
    listed = await session.until("session.characters.listed")
    await session.send(HELLO)
    greeting = await session.until("response.text.done")
    await session.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "A story?"}]}})
    await session.send({"type": "response.create"})
    await session.until("response.text.delta")
    directory = write_directory(allowed_root, "d", {"b.py": character_source("Bea")})
    await session.send({"type": "session.characters.reload", "directory": str(directory)})
    reloaded = await session.until("session.characters.reloaded")
    await session.send({"type": "session.update", "session": {
        "voice": "Bea", "instructions": INSTRUCTIONS, "allow_recording": False}})
    await session.until("session.updated")
    await session.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
    await session.send({"type": "response.create"})
    last = await session.until("response.text.done")

    # Every event was checked against Unmute's models as it arrived (Unmute.receive).
    assert [e["error"]["code"] for e in refused] == ["invalid_event", "character_not_found"]
    assert all(e["error"]["type"] and e["error"]["message"] for e in refused)
    assert VOICE in [c["name"] for c in listed[-1]["characters"]]
    assert greeting[0]["session"]["allow_recording"] is False
    assert reloaded[-1]["characters"] == [{"name": "Bea", "good": True, "comment": None}]
    assert last[-1]["text"] == "Hello, Bea."
    assert "response.done" not in session.kinds()
    assert "conversation.item.created" not in session.kinds()
    assert "session.created" not in session.kinds()


# ── (d) goodbye ──────────────────────────────────────────────────────────────


async def test_a_reply_ending_with_bye_closes_the_session_after_its_audio(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    unmute: Open,
) -> None:
    fake_openai.script(text("See you. ", "Bye!"))
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    session = await unmute(server)

    await session.send(HELLO)
    events = await session.until_closed()

    assert session.ws.close_code == 1000
    kinds = [e["type"] for e in events]
    assert kinds[-3:] == ["unmute.additional_outputs", "response.text.done",
                          "response.audio.done"]
    assert events[-2]["text"] == "See you. Bye!"
    decoded = one_ogg_opus_stream(audio_of(events))
    assert abs(decoded.size - 3 * fake_kyutai_tts.samples_per_word) < FRAME_SAMPLES


# ── (e) barge-in ─────────────────────────────────────────────────────────────


@dataclass
class BargeIn:
    session: Unmute
    speaking: list[dict[str, Any]]
    """The greeting up to its first audio."""
    interrupted: list[dict[str, Any]]
    """Then up to unmute.interrupted_by_vad."""
    after: list[dict[str, Any]]
    """Then up to the next response.created: the person's turn is answered."""


@pytest.fixture
async def barge_in(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT, fake_kyutai_tts: FakeKyutaiTTS,
    make_server: MakeServer, unmute: Open,
) -> BargeIn:
    """The person says "Wait, stop" while the character greets them."""
    fake_kyutai_tts.frames_per_word = 25  # 2 s a word: the greeting would last 6 s
    fake_openai.script(text("Well, ", "hello ", "there."), text("Sure."))
    fake_kyutai_stt.script(("Wait", 0.4), ("stop", 0.8), end=1.2)
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url,
                               tts=fake_kyutai_tts.url)
    session = await unmute(server)
    microphone = Microphone(session)

    await session.send(HELLO)
    speaking = await session.until("response.audio.delta")
    await microphone.hum(2.0)  # "Wait" while the character speaks: a barge-in
    interrupted = await session.until("unmute.interrupted_by_vad")
    after = await session.until("response.created")
    await session.until("response.text.delta")  # the LLM was asked by now
    return BargeIn(session, speaking, interrupted, after)


async def test_speech_during_a_reply_interrupts_it(
    barge_in: BargeIn, fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS,
) -> None:
    kinds = [e["type"] for e in barge_in.interrupted]
    assert "input_audio_buffer.speech_started" in kinds
    after_kinds = [e["type"] for e in barge_in.after]
    assert not {"response.audio.delta", "unmute.response.audio.delta.ready",
                "response.text.done", "response.audio.done",
                "unmute.additional_outputs"} & set(after_kinds), after_kinds
    assert "input_audio_buffer.speech_stopped" in after_kinds
    assert "response.done" not in barge_in.session.kinds()
    greeting_audio = [e for e in barge_in.speaking + barge_in.interrupted
                      if e["type"] == "unmute.response.audio.delta.ready"]
    assert sum(e["number_of_samples"] for e in greeting_audio) < (
        3 * fake_kyutai_tts.samples_per_word)  # it stopped part-way
    heard = [e["delta"] for e in barge_in.session.events
             if e["type"] == "conversation.item.input_audio_transcription.delta"]
    assert heard == ["Wait", " stop"]
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user", "content": "Wait stop"}


async def test_the_interrupting_words_belong_to_the_persons_turn(barge_in: BargeIn) -> None:
    """DESIGN.md §2: transcription deltas belong to the person's turn, never inside a
    reply; the speech that interrupts is announced before its words."""
    kinds = barge_in.session.kinds()
    first_word = kinds.index("conversation.item.input_audio_transcription.delta")
    seen = [k for k in kinds if "audio.delta" not in k]  # the order, audio left out

    assert kinds.index("input_audio_buffer.speech_started") < first_word, seen
    assert kinds.index("unmute.interrupted_by_vad") < first_word, seen


# ── (f) nudges ───────────────────────────────────────────────────────────────


async def test_a_long_silence_makes_the_character_speak_again_twice_at_most(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT, fake_kyutai_tts: FakeKyutaiTTS,
    make_server: MakeServer, unmute: Open,
) -> None:
    fake_openai.script(text("Hi."), text("Still there?"), text("Anyone?"), text("Oh, hello."))
    # Silence until 8 s of audio, then a word: the person's turn ends the waiting.
    fake_kyutai_stt.script(("Hello", 8.0), end=8.4)
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url,
                               tts=fake_kyutai_tts.url, nudge_after=1.0)
    session = await unmute(server)
    microphone = Microphone(session)

    await session.send(HELLO)
    await session.until("response.audio.done")
    # The STT's first pause estimates come after about 1 s of audio; from then on,
    # more than nudge_after of silence: a nudge.
    await microphone.silence(2.5)
    first_nudge = await session.until("response.audio.done")
    await microphone.silence(2.0)  # and again
    second_nudge = await session.until("response.audio.done")
    await microphone.silence(3.0)  # MAX_NUDGES reached: the character waits
    await microphone.silence(2.0)  # "Hello" at 8 s
    answer = await session.until("response.audio.done")

    assert first_nudge[0]["type"] == "response.created"
    assert second_nudge[0]["type"] == "response.created"
    kinds = [e["type"] for e in answer]
    assert "response.created" not in kinds[:kinds.index("input_audio_buffer.speech_stopped")]
    assert session.kinds().count("response.created") == 4
    assert fake_openai.requests[-1]["messages"][1:] == [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "..."},
        {"role": "assistant", "content": "Still there?"},
        {"role": "user", "content": "..."},
        {"role": "assistant", "content": "Anyone?"},
        {"role": "user", "content": "Hello"},
    ]
    assert len(fake_openai.requests) == 4


# ── switching character while the last one is still greeting ─────────────────


async def test_switching_character_mid_greeting_never_crashes_the_sandbox(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    unmute: Open,
) -> None:
    """Seen before replies were matched to requests by id: a second voice right after
    the first cancelled the greeting while it fetched its system prompt, the prompt's
    answer stayed in the pipe, and the next call read it ("the sandbox died during
    system_prompt (answered request 4 when 5 was asked)")."""
    voices = ["Wren", "Bramble", "Margaux", "Abner Crane"] * 3
    fake_openai.script(*[text("Hello.") for _ in voices])
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    session = await unmute(server)

    for voice in voices:  # each update cancels the greeting the one before started
        await session.send({"type": "session.update", "session": {
            "voice": voice, "instructions": INSTRUCTIONS, "allow_recording": False}})
    # Each character's prompt is asked for while the greeting before is cancelled.
    await session.send({"type": "session.characters.list"})
    events = await session.until("session.characters.listed")
    sandbox = next(iter(server.app[SESSIONS].values())).characters.sandbox
    first_pid = sandbox.pid if sandbox is not None else None

    await session.send({"type": "session.characters.list"})
    events += await session.until("session.characters.listed")

    errors = [e for e in events if e["type"] == "error"]
    assert errors == []
    updated = [e["session"]["voice"] for e in events if e["type"] == "session.updated"]
    assert updated == voices
    assert sandbox is not None and sandbox.pid == first_pid  # a healthy child is kept
