"""Voice-loop figures for ``make bench`` (alone: ``python -m scripts.bench --only voice``).

    phase     server                                        what is timed
    fakes     ``python -m server`` with its STT, LLM and    the server's own latency: a
              TTS the protocol fakes of tests/, served on   backend's frame sent → the
              127.0.0.1 by this process                     client's event; end of speech
                                                            → first reply audio
    embedded  ``python -m server`` with the defaults:       end of speech → first reply
              --stt/--tts/--llm embedded                    audio, for a spoken question
    load      ``create_app`` in this process, STT and TTS   event-loop lateness, STT lag
              embedded, LLM the built-in responder (or      and reply audio gaps while N
              embedded: --load-llm)                         sessions talk at once

Every client is an OpenAI GA session (``?model=bench``: pcm16 both ways, server
turn detection), appending 80 ms of audio at a time at real time (each append
scheduled at start + k × 80 ms, ``asyncio.sleep`` pacing) and stamping every server
event with ``time.perf_counter()`` as it arrives. The fakes stamp each frame just
before they write it, with the same clock, in this process.

- Server-added latency (fakes): the fake TTS sends its audio at real time (80 ms
  frames, as a TTS speaking as it generates), so the server's own pacing (real time
  plus ``--audio-lead``) never holds a frame back; the fake LLM writes a chunk every
  20 ms. Each Audio frame is matched to the n-th ``response.output_audio.delta`` of
  the reply (same samples, checked), each text chunk to the n-th
  ``response.output_audio_transcript.delta`` (same text), each STT ``Word`` to the
  n-th transcription delta, and the STT's first pause ``Step`` after the speech to
  ``input_audio_buffer.speech_stopped``. The figures include two loopback hops and
  this process's own parsing (tens of µs), and this process also runs the fakes.
- End of speech → first audio: from the moment the append holding the last speech
  sample was sent to the first ``response.output_audio.delta``, with a breakdown
  (each step's time after the end of speech; negative: before it). With the fakes the
  "speech" is scripted in the fake STT (words 1.04-1.84 s, the model's delay 6 steps,
  0.48 s, as Kyutai's stt-1b-en_fr), the LLM answers at once and the TTS speaks at
  once: what remains is the STT's delay plus the server. Embedded: the embedded TTS's
  own "What is your name?" after 0.5 s of silence, then silence; Silero VAD and
  pocketsphinx end the turn after a held pause, SmolLM2 writes, piper speaks the
  first sentence once it is written ("first sentence written": the text delta after
  which ``embedded_tts.phrases`` has a phrase ready; a reply of one sentence is only
  spoken at its end, which the client cannot see, so some runs lack that step). One
  session per run, closed at the first audio; the first run meets a cold prompt
  cache, and its time is shown beside the others.
- Load: N sessions in this process's server, started 0.1 s apart, each says the
  question and keeps streaming silence until its reply is done or ``LOAD_WINDOW``
  after its end of speech. A task sleeping 10 ms again and again records how late it
  wakes (2 s idle first, as a baseline). STT lag = arrival of an STT-driven event
  minus the send time of the audio it is about (``audio_start_ms`` of
  speech_started, ``audio_end_ms`` of speech_stopped, a transcription delta's
  ``start_time``); a session whose transcript never came within the window counts as
  not transcribed. Audio gaps: playing each reply from its first delta, the time the
  player would have run dry. CPU: of this process (server and clients) and of the
  server's child processes (model workers, zygote, sandbox children).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt
from aiohttp import web

from scripts.bench import (
    REPO,
    TIMEOUT,
    BenchError,
    Client,
    Server,
    descendants,
    log,
    percentile,
    proc_stat,
)
from server.app import create_app
from server.audio.pcm import pcm16_bytes
from server.backends.embedded.tts import EmbeddedTTS, phrases
from server.config import EMBEDDED, Config

# The protocol fakes live with the tests and import each other as top-level modules
# (``from loopback import serve``), so tests/ goes on sys.path to import them here.
sys.path.insert(0, str(REPO / "tests"))
import fake_kyutai
import fake_kyutai_stt
import fake_openai

RATE = 24_000
APPEND = 1920
"""Samples per ``input_audio_buffer.append``: 80 ms, as a microphone client sends."""
APPEND_SEC = APPEND / RATE
UNMUTE_MS = (450.0, 750.0)
"""Unmute's published end-of-speech to first-audio latency."""
QUESTION = "What is your name?"
LEAD_SILENCE = 0.5
"""Seconds of silence before the embedded question."""
SPEECH_LEVEL = 0.02
"""|sample| above which the synthesized question counts as speech (about −34 dBFS)."""
SCRIPT = (("What", 1.04), ("is", 1.28), ("your", 1.44), ("name", 1.60))
SCRIPT_END = 1.84
"""The fake STT's speech: words and their start times, and the end of speech
(seconds of audio, 23 appends; words start after the 12 steps the client ignores)."""
REPLY = ("Well, hello there! It is lovely to hear from you today. I was just making "
         "coffee for the regulars, and the harbour is calm and bright this morning, "
         "so tell me what brings you here.")
"""What the fake LLM answers, a word per chunk (35 chunks); the fake TTS speaks each
word as one 80 ms frame."""
CHUNK_INTERVAL = 0.02
"""Seconds between the fake LLM's chunks (a model writing 50 tokens a second)."""
PROBE_SLEEP = 0.01
IDLE_PROBE = 2.0
"""Seconds the lateness probe runs on the idle in-process server first."""
LOAD_STAGGER = 0.1
LOAD_WINDOW = 20.0
"""Seconds after its end of speech that a load session waits for its reply to end."""
REPLY_TIMEOUT = 120.0
"""Seconds an embedded reply may take to start (model loads, a busy worker)."""

Samples = npt.NDArray[np.float32]


# ── audio the client sends ───────────────────────────────────────────────────


def _append(pcm: bytes) -> str:
    return msgspec.json.encode({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm).decode()}).decode()


SILENCE = _append(bytes(APPEND * 2))


def appends(audio: Samples) -> list[str]:
    """``audio`` as append events of 80 ms each, the last zero-padded, encoded once."""
    padded = np.concatenate([audio, np.zeros((-len(audio)) % APPEND, np.float32)])
    data = pcm16_bytes(padded)
    return [_append(data[i:i + APPEND * 2]) for i in range(0, len(data), APPEND * 2)]


@dataclass(frozen=True)
class Question:
    """A spoken question as append events, and which append holds its last speech sample."""

    frames: list[str]
    end_index: int
    seconds: float


def spoken_question() -> Question:
    speech = EmbeddedTTS().synthesize_all(QUESTION)
    loud = np.nonzero(np.abs(speech) > SPEECH_LEVEL)[0]
    if not len(loud):
        raise BenchError(f"the embedded TTS said {QUESTION!r} in silence")
    lead = int(LEAD_SILENCE * RATE)
    audio = np.concatenate([np.zeros(lead, np.float32), speech])
    return Question(appends(audio), (lead + int(loud[-1])) // APPEND, len(speech) / RATE)


# ── the client ───────────────────────────────────────────────────────────────


class VoiceSession:
    """One OpenAI GA session: appends at real time, each server event stamped
    (``time.perf_counter()``) as it arrives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.sent: list[float] = []
        """When each append went out, in order."""
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._speaker: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, http: aiohttp.ClientSession, url: str) -> VoiceSession:
        ws = await http.ws_connect(f"{url}/v1/realtime?model=bench", protocols=("realtime",))
        session = cls(ws)
        try:
            await session.wait_for("session.created")
        except BaseException:
            await session.close()
            raise
        return session

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            at = time.perf_counter()
            if message.type is not aiohttp.WSMsgType.TEXT:
                self._arrived.set()
                return
            self.events.append((at, msgspec.json.decode(message.data)))
            self._arrived.set()

    def speak(self, frames: Sequence[str]) -> None:
        """Send ``frames``, then silence, one append every 80 ms until ``close``."""
        self._speaker = asyncio.create_task(self._speak(frames))

    async def _speak(self, frames: Sequence[str]) -> None:
        start = time.perf_counter()
        for index in itertools.count():
            delay = start + index * APPEND_SEC - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.sent.append(time.perf_counter())
            await self.ws.send_str(frames[index] if index < len(frames) else SILENCE)

    def sent_at(self, seconds: float) -> float:
        """When the append holding the audio at ``seconds`` went out."""
        index = round(seconds * RATE) // APPEND
        return self.sent[min(max(index, 0), len(self.sent) - 1)]

    def all(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, event) for at, event in self.events if event["type"] == kind]

    def first(self, kind: str) -> tuple[float, dict[str, Any]] | None:
        return next(((at, e) for at, e in self.events if e["type"] == kind), None)

    async def wait_for(self, kind: str, within: float = TIMEOUT,
                       required: bool = True) -> tuple[float, dict[str, Any]] | None:
        """The first ``kind`` event (waiting up to ``within`` s); raises ``BenchError``
        on an ``error`` event, a closed session, or (``required``) a timeout."""
        deadline = time.perf_counter() + within
        while (found := self.first(kind)) is None:
            if (error := self.first("error")) is not None:
                raise BenchError(f"the server sent an error: {error[1]['error']}")
            if self._reader.done():
                raise BenchError(f"the session closed before {kind} ({self.ws.close_code})")
            self._arrived.clear()
            try:
                async with asyncio.timeout(deadline - time.perf_counter()):
                    await self._arrived.wait()
            except TimeoutError:
                if not required:
                    return None
                seen = sorted({e["type"] for _, e in self.events})
                raise BenchError(f"no {kind} within {within:g} s; seen: {seen}") from None
        return found

    async def close(self) -> None:
        if self._speaker is not None:
            self._speaker.cancel()
            await asyncio.gather(self._speaker, return_exceptions=True)
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


# ── the fakes, stamping what they send ───────────────────────────────────────


class _Peek(msgspec.Struct):
    """What the stamping needs of a backend's msgpack frame (the rest is skipped)."""

    type: str
    text: str = ""
    prs: list[float] = []


_peek = msgspec.msgpack.Decoder(_Peek)
Record = Callable[[float, _Peek, bytes], None]


class _Stamping:
    """A fake's server-side WebSocket, seen through: each frame it sends is stamped
    just before the write and handed to ``record``; with ``pace``, Audio frames go
    out at real time (80 ms apart from the first)."""

    def __init__(self, ws: web.WebSocketResponse, record: Record, pace: bool = False) -> None:
        self._ws = ws
        self._record = record
        self._pace = pace
        self._first: float | None = None
        self._frames = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    def __aiter__(self) -> Any:
        return self._ws.__aiter__()

    async def send_bytes(self, data: bytes, *args: Any, **kwargs: Any) -> None:
        peek = _peek.decode(data)
        if self._pace and peek.type == "Audio":
            if self._first is None:
                self._first = time.perf_counter()
            delay = self._first + self._frames * APPEND_SEC - time.perf_counter()
            self._frames += 1
            if delay > 0:
                await asyncio.sleep(delay)
        at = time.perf_counter()
        await self._ws.send_bytes(data, *args, **kwargs)
        self._record(at, peek, data)


class TimedSTT(fake_kyutai_stt.FakeKyutaiSTT):
    """The scripted Kyutai STT, stamping each Word and Step it sends."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.words_sent: list[tuple[float, str]] = []
        self.steps: list[tuple[float, float]] = []
        """(stamp, pause probability) of each Step."""

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse,
                     connection: fake_kyutai_stt.Connection) -> None:
        await super()._serve(request, _Stamping(ws, self._sent), connection)

    def _sent(self, at: float, peek: _Peek, data: bytes) -> None:
        if peek.type == "Word":
            self.words_sent.append((at, peek.text))
        elif peek.type == "Step":
            self.steps.append((at, peek.prs[fake_kyutai_stt.PAUSE_HEAD]))

    def turn_end_sent(self) -> float:
        """When the first pause Step after the speech went out."""
        speaking = False
        for at, pause in self.steps:
            if pause < 0.4:
                speaking = True
            elif speaking and pause > 0.6:
                return at
        raise BenchError("the fake STT never signalled the end of the speech")


class TimedTTS(fake_kyutai.FakeKyutaiTTS):
    """The fake Kyutai TTS, sending its audio at real time, stamping each frame."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.frames: list[tuple[float, bytes]] = []
        self.connected: list[float] = []
        """When each connection's handler started (the WebSocket upgrade request in)."""

    async def _converse(self, request: web.Request, ws: web.WebSocketResponse,
                        connection: fake_kyutai.Connection) -> None:
        self.connected.append(time.perf_counter())
        await super()._converse(request, _Stamping(ws, self._sent, pace=True), connection)

    def _sent(self, at: float, peek: _Peek, data: bytes) -> None:
        if peek.type == "Audio":
            self.frames.append((at, data))


class TimedLLM(fake_openai.FakeOpenAI):
    """The fake chat-completions server answering every request with ``REPLY``, a
    word a chunk, ``CHUNK_INTERVAL`` apart, each stamped just before it is written."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.chunks: list[tuple[float, str]] = []
        self.asked: list[float] = []
        """When each request's handler started (headers in, body not yet read)."""

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(time.perf_counter())
        body: dict[str, Any] = await request.json()
        self.requests.append(body)
        words = REPLY.split(" ")
        reply = fake_openai.text(words[0], *(" " + word for word in words[1:]))
        # The fake's own chunk builder: the exact wire format stays defined once.
        chunks = fake_openai._Chunks(f"chatcmpl-bench{next(self._ids)}", str(body.get("model")))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start, sent = time.perf_counter(), 0
        for chunk in self._chunks(reply, chunks):
            content = chunk["choices"][0]["delta"].get("content")
            if content:
                delay = start + sent * CHUNK_INTERVAL - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent += 1
            at = time.perf_counter()
            await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
            if content:
                self.chunks.append((at, content))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# ── statistics ───────────────────────────────────────────────────────────────


def ms(seconds: Sequence[float]) -> list[float]:
    return [s * 1000 for s in seconds]


@dataclass(frozen=True)
class Spread:
    """Milliseconds: p50, p99 and max of a few samples."""

    p50: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Spread:
        if not values_ms:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(percentile(values_ms, 50), percentile(values_ms, 99), max(values_ms),
                   len(values_ms))


def steps_spread(turns: Sequence[dict[str, float]]) -> dict[str, Spread]:
    """Per step of the breakdown, its spread over the turns that had it."""
    keys = dict.fromkeys(key for turn in turns for key in turn)
    return {key: Spread.of([turn[key] for turn in turns if key in turn]) for key in keys}


def audio_gaps(deliveries: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(seconds a player starting at the first delta would have waited for audio,
    seconds of audio received) for ``(arrival, seconds of audio)`` deltas."""
    runs_dry, waited, total = None, 0.0, 0.0
    for at, seconds in deliveries:
        total += seconds
        if runs_dry is None:
            runs_dry = at
        elif at > runs_dry:
            waited += at - runs_dry
            runs_dry = at
        runs_dry += seconds
    return waited, total


def _delta_seconds(event: dict[str, Any]) -> float:
    return len(base64.b64decode(event["delta"])) / 2 / RATE


# ── servers ──────────────────────────────────────────────────────────────────


@contextlib.asynccontextmanager
async def serving(root: Path, options: Sequence[str]) -> AsyncIterator[tuple[Server, Client]]:
    """``python -m server`` with ``options``, all its backends up; stopped (by pid)
    and checked for leftover processes at the end."""
    server = Server(root, options)
    log(f"server pid {server.pid} on {server.url} ({' '.join(options)}), log {server.log_path}")
    completed = False
    try:
        async with aiohttp.ClientSession() as http:
            client = Client(http, server)
            await client.wait_ready()
            health = await client.health()
            if not (health["stt_up"] and health["llm_up"] and health["tts_up"]):
                raise BenchError(f"a backend is down: {health['backends']}")
            server.track()
            yield server, client
            server.track()
        completed = True
    finally:
        # In a thread: the fakes the server talks to are served by this loop.
        leftovers = await asyncio.to_thread(server.stop)
        if leftovers:
            log(f"processes outlived the server and were killed: {sorted(leftovers)}")
        if completed and not leftovers:
            server.log_path.unlink()
        else:
            log(f"server log kept at {server.log_path}")
    if leftovers:
        raise BenchError(f"{len(leftovers)} processes outlived the server")


# ── phase 1: protocol fakes ──────────────────────────────────────────────────


@dataclass(frozen=True)
class FakeFigures:
    added: dict[str, Spread]
    """Server-added ms per kind: audio, text, transcript, turn_end."""
    turns: list[dict[str, float]]
    """Per run: ms after the end of speech of each step."""


async def measure_fakes(root: Path, runs: int) -> FakeFigures:
    stt, tts, llm = TimedSTT(), TimedTTS(frames_per_word=1), TimedLLM()
    stt.script(*SCRIPT, end=SCRIPT_END)
    added: dict[str, list[float]] = {"audio": [], "text": [], "transcript": [], "turn_end": []}
    turns = []
    for fake in (stt, tts, llm):
        await fake.start()
    try:
        options = ["--stt", stt.url, "--tts", tts.url, "--llm", llm.base_url]
        async with serving(root, options) as (_, client):
            for run in range(runs):
                turn = await _fake_turn(client, stt, tts, llm, added)
                log(f"fakes: run {run + 1}/{runs}: end of speech → first audio "
                    f"{turn['first audio']:.0f} ms")
                turns.append(turn)
    finally:
        for fake in (stt, tts, llm):
            await fake.close()
    return FakeFigures({kind: Spread.of(values) for kind, values in added.items()}, turns)


async def _fake_turn(client: Client, stt: TimedSTT, tts: TimedTTS, llm: TimedLLM,
                     added: dict[str, list[float]]) -> dict[str, float]:
    stt.words_sent.clear()
    stt.steps.clear()
    tts.frames.clear()
    tts.connected.clear()
    llm.chunks.clear()
    llm.asked.clear()
    session = await VoiceSession.open(client.http, client.server.url)
    try:
        session.speak([])  # the fake STT hears its script whatever the audio
        await session.wait_for("response.done")
    finally:
        await session.close()
    end = session.sent[round(SCRIPT_END * RATE) // APPEND - 1]

    words = session.all("conversation.item.input_audio_transcription.delta")
    _match("STT word", [w for _, w in stt.words_sent],
           [e["delta"].strip() for _, e in words])
    added["transcript"] += ms([at - sent for (at, _), (sent, _) in
                               zip(words, stt.words_sent, strict=True)])
    stopped = await session.wait_for("input_audio_buffer.speech_stopped")
    assert stopped is not None
    turn_end = stt.turn_end_sent()
    added["turn_end"].append((stopped[0] - turn_end) * 1000)

    created = await session.wait_for("response.created")
    assert created is not None
    texts = session.all("response.output_audio_transcript.delta")
    _match("LLM chunk", [c for _, c in llm.chunks], [e["delta"] for _, e in texts])
    added["text"] += ms([at - sent for (at, _), (sent, _) in
                         zip(texts, llm.chunks, strict=True)])

    audio = session.all("response.output_audio.delta")
    _match("TTS frame", [_frame_pcm16(data) for _, data in tts.frames],
           [base64.b64decode(e["delta"]) for _, e in audio])
    added["audio"] += ms([at - sent for (at, _), (sent, _) in
                          zip(audio, tts.frames, strict=True)])
    return {key: (at - end) * 1000 for key, at in {
        "STT pause step sent": turn_end,
        "speech_stopped": stopped[0],
        "response.created": created[0],
        "TTS connection in": tts.connected[0],
        "LLM request in": llm.asked[0],
        "first LLM chunk sent": llm.chunks[0][0],
        "first text delta": texts[0][0],
        "first TTS frame sent": tts.frames[0][0],
        "first audio": audio[0][0],
    }.items()}


def _frame_pcm16(data: bytes) -> bytes:
    return pcm16_bytes(np.asarray(msgspec.msgpack.decode(data)["pcm"], np.float32))


def _match(what: str, sent: list[Any], received: list[Any]) -> None:
    if sent != received:
        raise BenchError(f"{what}s sent and received differ: {len(sent)} sent, "
                         f"{len(received)} received (first: {sent[:1]!r} / {received[:1]!r})")


# ── phase 2: the embedded defaults, one session at a time ────────────────────


@dataclass(frozen=True)
class EmbeddedFigures:
    turns: list[dict[str, float]]
    transcripts: list[str]


async def measure_embedded(root: Path, question: Question, runs: int) -> EmbeddedFigures:
    turns, transcripts = [], []
    options = ["--stt", EMBEDDED, "--tts", EMBEDDED, "--llm", EMBEDDED]
    async with serving(root, options) as (_, client):
        for run in range(runs):
            turn, transcript = await _embedded_turn(client, question)
            log(f"embedded: run {run + 1}/{runs}: heard {transcript!r}, end of speech → "
                f"first audio {turn['first audio']:.0f} ms")
            turns.append(turn)
            transcripts.append(transcript)
    return EmbeddedFigures(turns, transcripts)


async def _embedded_turn(client: Client, question: Question) -> tuple[dict[str, float], str]:
    session = await VoiceSession.open(client.http, client.server.url)
    try:
        session.speak(question.frames)
        audio = await session.wait_for("response.output_audio.delta", within=REPLY_TIMEOUT)
        assert audio is not None
    finally:
        await session.close()
    end = session.sent[question.end_index]
    steps = {
        "speech_started": "input_audio_buffer.speech_started",
        "first transcript delta": "conversation.item.input_audio_transcription.delta",
        "speech_stopped": "input_audio_buffer.speech_stopped",
        "transcript completed": "conversation.item.input_audio_transcription.completed",
        "response.created": "response.created",
        "first text delta": "response.output_audio_transcript.delta",
        "first audio": "response.output_audio.delta",
    }
    turn = {name: (found[0] - end) * 1000 for name, kind in steps.items()
            if (found := session.first(kind)) is not None}
    if (sentence := _first_phrase(session)) is not None:
        turn["first sentence written"] = (sentence - end) * 1000
    completed = session.first("conversation.item.input_audio_transcription.completed")
    return turn, completed[1]["transcript"] if completed else ""


def _first_phrase(session: VoiceSession) -> float | None:
    """When the reply's text first held a phrase the embedded TTS speaks on its own
    (a sentence and the space after it, ``server.backends.embedded.tts.phrases``)."""
    text = ""
    for at, event in session.all("response.output_audio_transcript.delta"):
        text += event["delta"]
        if phrases(text, final=False)[0]:
            return at
    return None


# ── phase 3: many sessions on the embedded STT and TTS, in this process ──────


class LatenessProbe:
    """Sleeps ``PROBE_SLEEP`` again and again and records how late it wakes (ms)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(PROBE_SLEEP)
            self.samples.append((time.perf_counter() - before - PROBE_SLEEP) * 1000)

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass(frozen=True)
class LoadSession:
    stopped: float | None
    """ms from the end of speech to speech_stopped."""
    first_audio: float | None
    stt_lags: list[float]
    """ms: arrival of speech_started / transcription deltas / speech_stopped minus the
    send time of the audio they are about."""
    transcript: str | None
    done: bool
    gap: float
    """Seconds a player would have waited for reply audio."""
    audio: float
    """Seconds of reply audio received."""


@dataclass(frozen=True)
class LoadFigures:
    sessions: list[LoadSession]
    llm: str
    idle: Spread
    busy: Spread
    cpu_cores: float
    """CPU seconds this process used per wall second during the load."""
    workers_cores: float
    """The same for its child processes alive before the load began (the embedded
    models' workers, the zygote, the pooled sandbox children)."""
    seconds: float


async def measure_load(question: Question, count: int, llm: str) -> LoadFigures:
    config = Config(host="127.0.0.1", port=0, stt=EMBEDDED, tts=EMBEDDED,
                    llm=EMBEDDED if llm == EMBEDDED else None,
                    max_sessions=max(count, Config.max_sessions))
    runner = web.AppRunner(create_app(config), shutdown_timeout=2.0)
    log(f"load: in-process server, stt/tts embedded, llm {llm}: loading the models")
    before = set(descendants(os.getpid()))
    await runner.setup()
    probe = LatenessProbe()
    started: set[int] = set()
    try:
        started = set(descendants(os.getpid())) - before
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        probe.start()
        await asyncio.sleep(IDLE_PROBE)
        idle = probe.take()
        log(f"load: {count} sessions, {LOAD_STAGGER:g} s apart, each until its reply is "
            f"done or {LOAD_WINDOW:g} s after its end of speech")
        workers = set(descendants(os.getpid())) - before
        cpu, wall = _cpu_seconds(), time.perf_counter()
        workers_cpu = {pid: _cpu_of(pid) for pid in workers}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sessions = await asyncio.gather(*(
                _load_session(http, url, question, n * LOAD_STAGGER) for n in range(count)))
        wall = time.perf_counter() - wall
        cpu_cores = (_cpu_seconds() - cpu) / wall
        workers_cores = sum(_cpu_of(pid) - used for pid, used in workers_cpu.items()) / wall
        busy = probe.take()
        started |= set(descendants(os.getpid())) - before
    finally:
        await probe.stop()
        await runner.cleanup()
        await _check_ended(started)
    return LoadFigures(sessions, llm, Spread.of(idle), Spread.of(busy), cpu_cores,
                       workers_cores, wall)


async def _check_ended(pids: set[int]) -> None:
    """Raises ``BenchError`` (after killing them) if any of ``pids`` (the in-process
    server's workers, sandbox children and zygote) outlives its clean-up by 5 s."""
    alive = {pid: stat[2] for pid in pids if (stat := proc_stat(pid)) and stat[1] != "Z"}
    deadline = time.monotonic() + 5.0
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = {pid: start for pid, start in alive.items()
                 if (stat := proc_stat(pid)) and stat[1] != "Z" and stat[2] == start}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if alive:
        raise BenchError(f"processes outlived the in-process server: {sorted(alive)}")


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used, 0 once it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _load_session(http: aiohttp.ClientSession, url: str, question: Question,
                        delay: float) -> LoadSession:
    await asyncio.sleep(delay)
    session = await VoiceSession.open(http, url)
    try:
        session.speak(question.frames)
        within = (question.end_index + 1) * APPEND_SEC + LOAD_WINDOW
        await session.wait_for("response.done", within=within, required=False)
    finally:
        await session.close()
    end = session.sent[question.end_index]
    lags = [at - session.sent_at(e["audio_start_ms"] / 1000)
            for at, e in session.all("input_audio_buffer.speech_started")]
    lags += [at - session.sent_at(e["start_time"])
             for at, e in session.all("conversation.item.input_audio_transcription.delta")]
    stopped = session.first("input_audio_buffer.speech_stopped")
    if stopped is not None:
        lags.append(stopped[0] - session.sent_at(stopped[1]["audio_end_ms"] / 1000))
    completed = session.first("conversation.item.input_audio_transcription.completed")
    audio = session.all("response.output_audio.delta")
    gap, seconds = audio_gaps([(at, _delta_seconds(e)) for at, e in audio])
    return LoadSession(
        stopped=(stopped[0] - end) * 1000 if stopped else None,
        first_audio=(audio[0][0] - end) * 1000 if audio else None,
        stt_lags=ms(lags),
        transcript=completed[1]["transcript"] if completed else None,
        done=session.first("response.done") is not None,
        gap=gap,
        audio=seconds,
    )


# ── the whole voice part ─────────────────────────────────────────────────────


@dataclass(frozen=True)
class VoiceResults:
    fakes: FakeFigures
    embedded: EmbeddedFigures
    load: LoadFigures
    question_seconds: float

    def figures(self) -> dict[str, float]:
        """Keys of the JSON line (ms unless named otherwise)."""
        added = self.fakes.added
        fake = steps_spread(self.fakes.turns)["first audio"]
        embedded = steps_spread(self.embedded.turns)["first audio"]
        load = self.load
        answered = [s.first_audio for s in load.sessions if s.first_audio is not None]
        figures = {
            "voice_added_audio_p50_ms": added["audio"].p50,
            "voice_added_audio_p99_ms": added["audio"].p99,
            "voice_added_text_p50_ms": added["text"].p50,
            "voice_added_text_p99_ms": added["text"].p99,
            "voice_added_transcript_p50_ms": added["transcript"].p50,
            "voice_added_transcript_p99_ms": added["transcript"].p99,
            "voice_added_turn_end_p50_ms": added["turn_end"].p50,
            "voice_fakes_speech_end_to_audio_p50_ms": fake.p50,
            "voice_fakes_speech_end_to_audio_max_ms": fake.max,
            "voice_embedded_speech_end_to_audio_p50_ms": embedded.p50,
            "voice_embedded_speech_end_to_audio_max_ms": embedded.max,
            "voice_load_sessions": len(load.sessions),
            "voice_load_lateness_p50_ms": load.busy.p50,
            "voice_load_lateness_p99_ms": load.busy.p99,
            "voice_load_lateness_max_ms": load.busy.max,
            "voice_load_stt_lag_p50_ms": self._stt_lags.p50,
            "voice_load_stt_lag_max_ms": self._stt_lags.max,
            "voice_load_transcribed": sum(s.transcript is not None for s in load.sessions),
            "voice_load_speech_end_to_audio_p50_ms": Spread.of(answered).p50,
            "voice_load_speech_end_to_audio_max_ms": Spread.of(answered).max,
            "voice_load_audio_gap_max_s": max((s.gap for s in load.sessions), default=0.0),
        }
        return {key: round(value, 2) for key, value in figures.items()}

    @property
    def _stt_lags(self) -> Spread:
        return Spread.of([lag for s in self.load.sessions for lag in s.stt_lags])

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(figure, value, budget or reference, verdict) rows of the printed table."""
        rows: list[tuple[str, str, str, str]] = []
        added = self.fakes.added
        for kind, label in (("audio", "TTS frame → response.output_audio.delta"),
                            ("text", "LLM chunk → ...output_audio_transcript.delta"),
                            ("transcript", "STT Word → ...transcription.delta"),
                            ("turn_end", "STT pause Step → speech_stopped")):
            spread = added[kind]
            rows.append((f"server-added, {label}",
                         f"{spread.p50:.2f} / {spread.p99:.2f} ms",
                         f"p50 / p99, n={spread.count}", ""))
        rows += self._turn_rows("fakes", self.fakes.turns)
        rows += self._turn_rows("embedded", self.embedded.turns)
        heard = sorted(set(self.embedded.transcripts))
        rows.append(("  embedded STT heard", "; ".join(repr(t) for t in heard),
                     f"{QUESTION!r}, {self.question_seconds:.2f} s", ""))
        rows += self._load_rows()
        return rows

    def _turn_rows(self, label: str, turns: list[dict[str, float]]) -> list[
            tuple[str, str, str, str]]:
        spreads = steps_spread(turns)
        first = spreads.pop("first audio")
        low, high = UNMUTE_MS
        verdict = "below" if first.p50 < low else "within" if first.p50 <= high else "above"
        rows = [(f"end of speech → first audio, {label}",
                 f"{first.p50:.0f} / {first.max:.0f} ms",
                 f"p50 / max, n={first.count}; Unmute {low:.0f}–{high:.0f} ms",
                 f"{verdict} Unmute's")]
        rows.append(("  each run", ", ".join(f"{turn['first audio']:.0f}" for turn in turns)
                     + " ms", "in order", ""))
        rows += [(f"  {step}", f"{spread.p50:.0f} ms", "p50 after end of speech"
                  + (f" ({spread.count} of {first.count} runs)"
                     if spread.count < first.count else ""), "")
                 for step, spread in sorted(spreads.items(), key=lambda item: item[1].p50)]
        return rows

    def _load_rows(self) -> list[tuple[str, str, str, str]]:
        load = self.load
        sessions = load.sessions
        n = len(sessions)
        answered = [s.first_audio for s in sessions if s.first_audio is not None]
        stopped = [s.stopped for s in sessions if s.stopped is not None]
        heard = [s.transcript for s in sessions if s.transcript is not None]
        named = sum("name" in t.split() for t in heard)
        lags, end = self._stt_lags, Spread.of(answered)
        gaps = Spread.of([s.gap * 1000 for s in sessions])
        prefix = f"load, {n} sessions (llm {load.llm})"
        return [
            (f"{prefix}: loop lateness", f"{load.busy.p50:.2f} / {load.busy.p99:.2f} / "
             f"{load.busy.max:.1f} ms", f"p50 / p99 / max, n={load.busy.count}", ""),
            ("  idle loop lateness (before)", f"{load.idle.p50:.2f} / {load.idle.p99:.2f} / "
             f"{load.idle.max:.1f} ms", "p50 / p99 / max", ""),
            ("  CPU: server + clients / its workers", f"{load.cpu_cores:.2f} / "
             f"{load.workers_cores:.2f} cores", f"over {load.seconds:.0f} s", ""),
            ("  transcripts arrived", f"{len(heard)}/{n}, {named} with 'name'", "", ""),
            ("  STT lag (event vs its audio sent)", f"{lags.p50:.0f} / {lags.max:.0f} ms",
             f"p50 / max, n={lags.count}", ""),
            ("  end of speech → speech_stopped", f"{Spread.of(stopped).p50:.0f} / "
             f"{Spread.of(stopped).max:.0f} ms", "p50 / max (0.6 s hold)", ""),
            ("  end of speech → first audio", f"{end.p50:.0f} / {end.max:.0f} ms",
             f"p50 / max, {len(answered)}/{n} answered", ""),
            ("  reply audio gaps per session", f"{gaps.p50:.0f} / {gaps.max:.0f} ms",
             f"p50 / max; {sum(s.done for s in sessions)}/{n} replies done in "
             f"{LOAD_WINDOW:g} s", ""),
            ("  reply audio received per session",
             f"{Spread.of([s.audio for s in sessions]).p50:.1f} s", "p50", ""),
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("voice loop")
    group.add_argument("--voice-runs", type=int, default=6, metavar="N",
                       help="turns with the protocol fakes (default: 6)")
    group.add_argument("--embedded-runs", type=int, default=5, metavar="N",
                       help="spoken turns with the embedded defaults (default: 5)")
    group.add_argument("--load-sessions", type=int, default=20, metavar="N",
                       help="sessions at once on the embedded STT/TTS (default: 20)")
    group.add_argument("--load-llm", choices=("none", EMBEDDED), default="none",
                       help="language model of the load phase: the built-in responder "
                       "(default) or the embedded SmolLM2")


def run(args: argparse.Namespace) -> VoiceResults:
    log(f"voice: synthesizing {QUESTION!r} with the embedded TTS")
    question = spoken_question()
    with tempfile.TemporaryDirectory(prefix="troupe-bench-voice-") as tmp:
        root = Path(tmp).resolve()
        return asyncio.run(_measure(args, root, question))


async def _measure(args: argparse.Namespace, root: Path, question: Question) -> VoiceResults:
    log(f"voice, fakes: {args.voice_runs} turns")
    fakes = await measure_fakes(root, args.voice_runs)
    log(f"voice, embedded: {args.embedded_runs} spoken turns")
    embedded = await measure_embedded(root, question, args.embedded_runs)
    load = await measure_load(question, args.load_sessions, args.load_llm)
    return VoiceResults(fakes, embedded, load, question.seconds)


if __name__ == "__main__":
    from scripts import bench

    sys.exit(bench.main(["--only", "voice", *sys.argv[1:]]))

