"""A scripted Kyutai STT (moshi-server's ``/api/asr-streaming``) on loopback, for tests.

    test ──script(("Hello", 0.5), ("there", 0.9), end=1.4)──▶ FakeKyutaiSTT
    client ──GET /api/asr-streaming  kyutai-api-key: … (or ?auth_id=…)──▶ 401 unless api_key
           ◀── Ready               (at_capacity: Error{"no free channels"}, then close)
           ──▶ Audio{pcm} …        samples counted, cut into 1920-sample (80 ms) frames;
                                   per frame, once the audio passes a scripted time plus
           ◀── Word / EndWord      the model's delay (``delay_steps`` frames),
           ◀── Step{step_idx, prs, buffered_pcm}   and one Step per frame: prs[2] is the
                                   pause probability, high outside the scripted speech
           ──▶ Marker{id}
           ◀── Marker{id}          once every frame sent before it, plus the delay, is done

It follows moshi-server's ``BatchedAsr`` (``rust/moshi-server/src/batched_asr.rs``):
the same msgpack maps (``OutMsg`` with ``type`` tags, written here as plain dicts so
the fake does not borrow the client's schema), the same marker rule, ``Error`` then
close when no slot is free, and a message it cannot parse ends the connection.
Failure modes: ``at_capacity``, ``ready=False`` (the plain ``Asr`` module, which
never says Ready), ``drop_after_sec`` (connection cut, or closed cleanly, mid-stream).

Every test gets the ``fake_kyutai_stt`` fixture (``tests/conftest.py`` lists this module
in ``pytest_plugins``), or uses ``FakeKyutaiSTT`` directly.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import WSCloseCode, WSMsgType, web

from .loopback import build_info, serve

FRAME_SAMPLES = 1920
FRAME_SEC = FRAME_SAMPLES / 24_000
PAUSE_HEAD = 2
SPEAKING, PAUSED, OTHER_HEADS = 0.02, 0.97, 0.1
"""prs[2] during and outside speech; the other heads stay flat, so a client reading
the wrong head sees no pause."""


@dataclass(frozen=True)
class Spoken:
    text: str
    start: float
    stop: float
    """Seconds into the audio."""


@dataclass
class Connection:
    """What one client sent."""

    headers: dict[str, str]
    query: dict[str, str]
    audio_messages: list[int] = field(default_factory=list)
    """Samples in each Audio message, in order."""
    samples: list[float] = field(default_factory=list)
    markers: list[int] = field(default_factory=list)
    rejected: list[Any] = field(default_factory=list)
    """Messages outside the protocol (each ended the connection)."""


class _Transcriber:
    """One stream's server side, without I/O: audio and markers in, messages out."""

    def __init__(self, words: list[Spoken], end_of_speech: float | None,
                 delay_steps: int) -> None:
        self.delay_steps = delay_steps
        self.speech = (words[0].start, end_of_speech) if words and end_of_speech else None
        due: list[tuple[int, int, dict[str, Any]]] = []
        for word in words:
            due.append((self._frame(word.start), 1,
                        {"type": "Word", "text": word.text, "start_time": word.start}))
            due.append((self._frame(word.stop), 0, {"type": "EndWord", "stop_time": word.stop}))
        self.due = sorted(due, key=lambda d: (d[0], d[1]))
        self.markers: list[tuple[int, int]] = []
        self.samples = 0
        self.frames = 0

    def _frame(self, seconds: float) -> int:
        """The frame count after which the server has said something about ``seconds``."""
        return math.ceil(seconds / FRAME_SEC - 1e-9) + self.delay_steps

    @property
    def processed_sec(self) -> float:
        return self.frames * FRAME_SEC

    def audio(self, samples: int) -> list[dict[str, Any]]:
        self.samples += samples
        out: list[dict[str, Any]] = []
        while (self.frames + 1) * FRAME_SAMPLES <= self.samples:
            self.frames += 1
            while self.due and self.due[0][0] <= self.frames:
                out.append(self.due.pop(0)[2])
            out.append(self._step())
            out += self._markers_due()
        return out

    def marker(self, marker_id: int) -> list[dict[str, Any]]:
        waiting = math.ceil(self.samples / FRAME_SAMPLES)
        self.markers.append((waiting + self.delay_steps, marker_id))
        return self._markers_due()

    def _step(self) -> dict[str, Any]:
        heard = (self.frames - self.delay_steps) * FRAME_SEC
        speaking = self.speech is not None and self.speech[0] <= heard < self.speech[1]
        prs = [OTHER_HEADS] * 4
        prs[PAUSE_HEAD] = SPEAKING if speaking else PAUSED
        return {"type": "Step", "step_idx": self.frames - 1, "prs": prs,
                "buffered_pcm": self.samples - self.frames * FRAME_SAMPLES}

    def _markers_due(self) -> list[dict[str, Any]]:
        due = [m for m in self.markers if m[0] <= self.frames]
        self.markers = [m for m in self.markers if m[0] > self.frames]
        return [{"type": "Marker", "id": marker_id} for _, marker_id in due]


@dataclass
class FakeKyutaiSTT:
    api_key: str = "public_token"
    delay_steps: int = 6
    """``asr_delay_in_tokens`` of Kyutai's stt-1b-en_fr config (0.48 s)."""
    at_capacity: bool = False
    ready: bool = True
    drop_after_sec: float | None = None
    drop_abruptly: bool = True
    """Cut the TCP connection (what moshi-server does when a loop fails); else a
    clean WebSocket close."""
    words: list[Spoken] = field(default_factory=list)
    end_of_speech: float | None = None
    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    def script(self, *words: tuple[str, float], end: float) -> None:
        """Words with their start times (seconds of audio); each lasts until the
        next starts, the last until ``end``, the end of speech."""
        stops = [start for _, start in words[1:]] + [end]
        self.words = [Spoken(text, start, stop)
                      for (text, start), stop in zip(words, stops, strict=True)]
        self.end_of_speech = end

    async def start(self) -> str:
        """Listen on 127.0.0.1, a free port; returns the base URL (``ws://…``)."""
        if self._runner is not None:
            raise RuntimeError(f"FakeKyutaiSTT is already serving at {self.url}")
        app = web.Application()
        app.router.add_get("/api/asr-streaming", self._asr_streaming)
        app.router.add_get("/api/build_info", build_info)
        self._runner, address = await serve(app)
        self.url = f"ws://{address}"
        return self.url

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _asr_streaming(self, request: web.Request) -> web.StreamResponse:
        connection = Connection(dict(request.headers), dict(request.query))
        self.connections.append(connection)
        # As moshi-server: the header, else ?auth_id= (browsers cannot set headers).
        key = request.headers.get("kyutai-api-key", request.query.get("auth_id"))
        if key != self.api_key:
            return web.Response(status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._serve(request, ws, connection)
        finally:
            self._sockets.discard(ws)
        return ws

    async def _serve(self, request: web.Request, ws: web.WebSocketResponse,
                     connection: Connection) -> None:
        if self.at_capacity:
            await _send(ws, {"type": "Error", "message": "no free channels"})
            await ws.close()
            return
        if self.ready:
            await _send(ws, {"type": "Ready"})
        stream = _Transcriber(self.words, self.end_of_speech, self.delay_steps)
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                continue
            match msgspec.msgpack.decode(message.data):
                case {"type": "Audio", "pcm": list(pcm)} if all(
                        isinstance(x, float) for x in pcm):
                    connection.audio_messages.append(len(pcm))
                    connection.samples.extend(pcm)
                    out = stream.audio(len(pcm))
                case {"type": "Marker", "id": int(marker_id)}:
                    connection.markers.append(marker_id)
                    out = stream.marker(marker_id)
                case other:
                    connection.rejected.append(other)
                    await ws.close(code=WSCloseCode.INTERNAL_ERROR)
                    return
            for reply in out:
                await _send(ws, reply)
            if self.drop_after_sec is not None and stream.processed_sec >= self.drop_after_sec:
                if self.drop_abruptly:
                    assert request.transport is not None
                    request.transport.abort()
                else:
                    await ws.close(code=WSCloseCode.INTERNAL_ERROR)
                return


async def _send(ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
    await ws.send_bytes(msgspec.msgpack.encode(message))


@pytest.fixture(name="fake_kyutai_stt")
async def fake_kyutai_stt_fixture() -> AsyncIterator[FakeKyutaiSTT]:
    """``fake_kyutai_stt``: a started ``FakeKyutaiSTT`` accepting the key
    ``public_token``, at ``fake_kyutai_stt.url``; script it before connecting."""
    fake = FakeKyutaiSTT()
    await fake.start()
    yield fake
    await fake.close()
