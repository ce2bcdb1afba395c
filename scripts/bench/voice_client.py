"""The voice part's client side (``scripts/bench/voice.py``): the audio it sends, and
one OpenAI GA session (``?model=bench``: pcm16 both ways, server turn detection)
that appends 80 ms of audio at a time at real time (each append scheduled at start +
k × 80 ms, ``asyncio.sleep`` pacing) and stamps every server event with
``time.perf_counter()`` as it arrives.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt

from scripts.bench.common import TIMEOUT, BenchError
from scripts.measure import Spread
from server.audio.pcm import pcm16_bytes
from server.backends.embedded.tts import EmbeddedTTS

RATE = 24_000
APPEND = 1920
"""Samples per ``input_audio_buffer.append``: 80 ms, as a microphone client sends."""
APPEND_SEC = APPEND / RATE
QUESTION = "What is your name?"
LEAD_SILENCE = 0.5
"""Seconds of silence before the embedded question."""
SPEECH_LEVEL = 0.02
"""|sample| above which the synthesized question counts as speech (about −34 dBFS)."""

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



# ── statistics ───────────────────────────────────────────────────────────────


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


def delta_seconds(event: dict[str, Any]) -> float:
    return len(base64.b64decode(event["delta"])) / 2 / RATE
