"""A Kyutai TTS server (moshi-server, ``/api/tts_streaming``) on loopback, for tests.

    client ──GET /api/tts_streaming?format=PcmMessagePack&voice=…  (WebSocket upgrade)
             header kyutai-api-key (or ?auth_id=)   wrong or missing: HTTP 401
           ◀── {"type": "Ready"}             refuse=True: {"type": "Error"}, then close
           ──▶ {"type": "Text", "text": …}   each word (split at spaces), at once:
           ◀── {"type": "Text", "text", "start_s", "stop_s"}
           ◀── {"type": "Audio", "pcm": [f32 …]} × frames_per_word   (a sine, 24 kHz)
           ──▶ {"type": "Eos"}               ──▶ the server closes the socket

Every message is one binary frame holding a msgpack map, as moshi-server writes them
(``rmp_serde`` with struct maps; ``pcm`` as msgpack float32). The fake builds its
frames from plain maps rather than the client's Structs, so a schema mistake in
``server/backends/kyutai/tts.py`` cannot hide behind a shared definition.

Failure modes, set before the client connects: ``refuse`` (no free channel, the
capacity error), ``drop_after_words`` (the TCP connection is cut after that many
words were spoken), ``stall`` (takes the words, never answers nor closes).

Every test gets the ``fake_kyutai_tts`` fixture (``tests/conftest.py`` lists this module
in ``pytest_plugins``), or uses ``FakeKyutaiTTS`` directly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import WSMsgType, web

from .loopback import build_info, serve

SAMPLE_RATE = 24000
FRAME = 1920
"""Samples in one Audio message: 80 ms, one Mimi frame."""


@dataclass
class Connection:
    """What one client did, for the test to inspect."""

    query: dict[str, str]
    headers: dict[str, str]
    received: list[dict[str, Any]] = field(default_factory=list)
    """Every client message, decoded, in order."""
    violations: list[str] = field(default_factory=list)
    """Frames moshi-server would not accept (text frames, unknown types, bad msgpack)."""
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the handler is done, however it ended."""

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.received if m.get("type") == "Text"]


@dataclass
class FakeKyutaiTTS:
    api_key: str = "public_token"
    frames_per_word: int = 3
    refuse: bool = False
    drop_after_words: int | None = None
    stall: bool = False
    connections: list[Connection] = field(default_factory=list)
    rejected: int = 0
    """Upgrades refused with HTTP 401."""

    def __post_init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def samples_per_word(self) -> int:
        return self.frames_per_word * FRAME

    async def start(self) -> str:
        """Listen on 127.0.0.1, a free port; returns the base URL (``ws://…``)."""
        if self._runner is not None:
            raise RuntimeError(f"FakeKyutaiTTS is already serving at {self.url}")
        app = web.Application()
        app.router.add_get("/api/tts_streaming", self._tts_streaming)
        app.router.add_get("/api/build_info", build_info)
        self._runner, address = await serve(app)
        self.url = f"ws://{address}"
        return self.url

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)  # going away
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ── the protocol ─────────────────────────────────────────────────────────

    async def _tts_streaming(self, request: web.Request) -> web.StreamResponse:
        # moshi-server takes the header, else ?auth_id= (browsers cannot set headers).
        key = request.headers.get("kyutai-api-key", request.query.get("auth_id"))
        if key != self.api_key:
            self.rejected += 1
            return web.Response(status=401)
        connection = Connection(dict(request.query), dict(request.headers))
        self.connections.append(connection)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._converse(request, ws, connection)
        finally:
            self._sockets.discard(ws)
            connection.ended.set()
        return ws

    async def _converse(
        self, request: web.Request, ws: web.WebSocketResponse, connection: Connection
    ) -> None:
        if self.refuse:
            await ws.send_bytes(_pack({"type": "Error", "message": "no free channels"}))
            await ws.close()
            return
        await ws.send_bytes(_pack({"type": "Ready"}))
        spoken = 0
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                connection.violations.append(f"a {message.type.name} frame")
                continue
            try:
                decoded = msgspec.msgpack.decode(message.data)
            except msgspec.DecodeError as exc:
                connection.violations.append(f"not msgpack: {exc}")
                continue
            connection.received.append(decoded)
            match decoded:
                case {"type": "Text", "text": str(text)}:
                    if self.stall:
                        continue
                    for word in text.split(" "):
                        if not word:
                            continue
                        if spoken == self.drop_after_words:
                            assert request.transport is not None
                            request.transport.abort()
                            return
                        await self._speak(ws, word, spoken)
                        spoken += 1
                case {"type": "Eos"}:
                    if not self.stall:
                        await ws.close()
                        return
                case _:
                    connection.violations.append(f"unknown message {decoded!r}")
        connection.closed_by_client.set()

    async def _speak(self, ws: web.WebSocketResponse, word: str, index: int) -> None:
        start = index * self.samples_per_word / SAMPLE_RATE
        stop = (index + 1) * self.samples_per_word / SAMPLE_RATE
        await ws.send_bytes(_pack({"type": "Text", "text": word,
                                   "start_s": start, "stop_s": stop}))
        samples = tone(index, self.samples_per_word)
        for offset in range(0, len(samples), FRAME):
            await ws.send_bytes(_audio(samples[offset:offset + FRAME]))


def tone(index: int, length: int) -> np.ndarray:
    """The audio of word ``index``: a sine at 0.5, its pitch rising with the index."""
    t = np.arange(length) / SAMPLE_RATE
    return (0.5 * np.sin(2 * math.pi * (220.0 + 20.0 * index) * t)).astype(np.float32)


def _pack(message: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(message)


def _audio(samples: np.ndarray) -> bytes:
    """``{"type": "Audio", "pcm": [...]}`` with each sample a msgpack float32
    (0xca + big-endian), as rmp_serde writes a ``Vec<f32>``."""
    items = np.empty(len(samples), dtype=[("marker", "u1"), ("value", ">f4")])
    items["marker"] = 0xCA
    items["value"] = samples
    pcm = msgspec.Raw(_array_header(len(samples)) + items.tobytes())
    return msgspec.msgpack.encode({"type": "Audio", "pcm": pcm})


def _array_header(length: int) -> bytes:
    """The shortest msgpack array header, as rmp_serde picks it."""
    if length < 16:
        return bytes([0x90 | length])
    if length < 1 << 16:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


@pytest.fixture(name="fake_kyutai_tts")
async def fake_kyutai_tts_fixture() -> AsyncIterator[FakeKyutaiTTS]:
    """``fake_kyutai_tts``: a started ``FakeKyutaiTTS`` accepting ``public_token`` at
    ``fake_kyutai_tts.url``."""
    fake = FakeKyutaiTTS()
    await fake.start()
    yield fake
    await fake.close()
