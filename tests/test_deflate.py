"""Audio leaves uncompressed where the client negotiated permessage-deflate, other
events compressed (server/realtime/deflate.py), read as RSV1 bits on the wire by a
client that offers the extension as browsers and the ``websockets`` library do."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import zlib
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import MakeServer

from server.realtime import deflate
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, text


class DeflateClient:
    """A WebSocket client that offers permessage-deflate and reports, per frame,
    whether it came compressed (RSV1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 negotiated: bool) -> None:
        self.reader, self.writer, self.negotiated = reader, writer, negotiated
        self._inflate = zlib.decompressobj(-15)

    @classmethod
    async def connect(cls, port: int, path: str) -> DeflateClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        assert head.startswith("http/1.1 101"), head
        return cls(reader, writer, "permessage-deflate" in head)

    async def frame(self) -> tuple[bool, str]:
        """The next text frame: (compressed, its text)."""
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await self.reader.readexactly(size)
        compressed = bool(first & 0x40)
        if compressed:
            payload = self._inflate.decompress(payload + b"\x00\x00\xff\xff")
        return compressed, payload.decode()

    def send(self, event: dict[str, Any]) -> None:
        """One masked (all-zero key), uncompressed text frame."""
        payload = json.dumps(event).encode()
        size = len(payload)
        length = (bytes([0x80 | size]) if size < 126
                  else bytes([0x80 | 126]) + size.to_bytes(2, "big"))
        self.writer.write(bytes([0x81]) + length + b"\0\0\0\0" + payload)

    def close(self) -> None:
        self.writer.close()


async def test_audio_goes_uncompressed_and_the_rest_compressed_on_one_connection() -> None:
    audio = json.dumps({"type": "response.output_audio.delta",
                        "delta": base64.b64encode(os.urandom(3840)).decode()})
    events = [json.dumps({"type": "response.output_text.delta", "delta": "Ahoy " * 40}),
              audio, json.dumps({"type": "response.done", "note": "x" * 300}), audio]

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        for event in events:
            await deflate.send_str(ws, event,
                                   compress=json.loads(event)["type"].find("audio") < 0)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        client = await DeflateClient.connect(server.port, "/ws")
        received: list[tuple[bool, Any]] = [await client.frame() for _ in events]
        client.close()

    assert client.negotiated
    assert [text for _, text in received] == events  # in order, all readable
    assert [compressed for compressed, _ in received] == [True, False, True, False]


async def test_a_spoken_reply_sends_its_audio_uncompressed_to_a_deflate_client(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
) -> None:
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    fake_openai.script(text("Fair", " winds", " ahead."))
    client = await DeflateClient.connect(server.port, "/v1/realtime?model=deflate")
    try:
        seen = [await client.frame()]  # session.created
        client.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Hello"}]}})
        client.send({"type": "response.create"})
        while json.loads(seen[-1][1])["type"] != "response.done":
            seen.append(await client.frame())
    finally:
        client.close()

    kinds = {(json.loads(text)["type"], compressed) for compressed, text in seen}
    assert ("response.output_audio.delta", False) in kinds
    assert not any(kind.endswith("audio.delta") and compressed for kind, compressed in kinds)
    assert ("response.done", True) in kinds and ("session.created", True) in kinds
