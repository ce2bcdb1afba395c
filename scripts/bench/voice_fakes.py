"""The voice part's first phase: ``python -m server`` with its STT, LLM and TTS the
protocol fakes of ``tests/fakes``, served on 127.0.0.1 by this process, each stamping
every frame just before it writes it (``time.perf_counter()``, the clock the client
stamps arrivals with). What remains between a backend's frame and the client's event
is the server's own latency.

- The fake TTS sends its audio at real time (80 ms frames, as a TTS speaking as it
  generates), so the server's own pacing (real time plus ``--audio-lead``) never
  holds a frame back; the fake LLM writes a chunk every 20 ms.
- Each Audio frame is matched to the n-th ``response.output_audio.delta`` of the
  reply (same samples, checked), each text chunk to the n-th
  ``response.output_audio_transcript.delta`` (same text), each STT ``Word`` to the
  n-th transcription delta, and the STT's first pause ``Step`` after the speech to
  ``input_audio_buffer.speech_stopped``. The figures include two loopback hops and
  this process's own parsing (tens of µs), and this process also runs the fakes.
- The "speech" is scripted in the fake STT (words 1.04-1.84 s, the model's delay 6
  steps, 0.48 s, as Kyutai's stt-1b-en_fr); the LLM answers at once and the TTS
  speaks at once: what remains of end of speech → first audio is the STT's delay
  plus the server.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np
from aiohttp import web

from scripts.bench.common import BenchError, Client, log, serving
from scripts.bench.voice_client import APPEND, APPEND_SEC, RATE, VoiceSession
from scripts.measure import Spread, ms
from server.audio.pcm import pcm16_bytes
from tests.fakes import kyutai_stt as fake_kyutai_stt
from tests.fakes import kyutai_tts as fake_kyutai
from tests.fakes import openai_chat as fake_openai

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

    @classmethod
    def around(cls, ws: web.WebSocketResponse, record: Record,
               pace: bool = False) -> web.WebSocketResponse:
        """``ws`` seen through a ``_Stamping``, typed as what the fake expects (it
        forwards everything else to ``ws``)."""
        return cast(web.WebSocketResponse, cls(ws, record, pace))

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
        await super()._serve(request, _Stamping.around(ws, self._sent), connection)

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
        await super()._converse(request, _Stamping.around(ws, self._sent, pace=True),
                                connection)

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
        async with serving(root, options, backends_up=True) as client:
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
