"""A bare WebSocket client that can stop reading, for backpressure tests.

    RawClient.connect() ── TCP (tiny SO_RCVBUF), HTTP upgrade ──▶ server
    send_text() ── one masked text frame, written and drained ──▶
    read_frame() ◀── one server frame, only when asked ──

Library clients read their socket in the background, so a "client that does not
read" cannot be written with them; this one reads nothing until ``read_frame``
is called: what the server sends piles up in the kernel buffers, then in the
server. Frames are masked with an all-zero key (valid, and no per-byte work).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

CLOSE = 0x8
TEXT = 0x1


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """A final, masked client frame carrying ``payload``."""
    size = len(payload)
    if size < 126:
        length = bytes([0x80 | size])
    elif size < 1 << 16:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/v1/realtime?model=raw",
                      receive_buffer: int = 4096) -> RawClient:
        """Open a session; ``receive_buffer`` is the socket's SO_RCVBUF. Raises
        ``ConnectionError`` when the upgrade is refused."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        # A small stream buffer too: asyncio stops reading the socket past 2 × limit.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime\r\n\r\n"
        ).encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"upgrade refused: {head.splitlines()[0]!r}")
        return cls(reader, writer)

    async def send_text(self, text: str | bytes) -> None:
        """Raises ``ConnectionError`` once the server has gone."""
        self.writer.write(frame(text.encode() if isinstance(text, str) else text))
        await self.writer.drain()

    async def send(self, event: dict[str, Any]) -> None:
        await self.send_text(json.dumps(event))

    async def read_frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload). Raises ``asyncio.IncompleteReadError``
        at the end of the stream, ``ConnectionError`` on a reset."""
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        if second & 0x80:  # servers do not mask; unmask anyway
            mask = await self.reader.readexactly(4)
            data = await self.reader.readexactly(size)
            return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return first & 0x0F, await self.reader.readexactly(size)

    async def read_all(self) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Read until the server closes: the events, and the close frame's (code,
        reason), answered; None when the connection ended without one."""
        events: list[dict[str, Any]] = []
        try:
            while True:
                opcode, payload = await self.read_frame()
                if opcode == TEXT:
                    events.append(json.loads(payload))
                elif opcode == CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    try:
                        await self.send_close(payload[:2])
                    except ConnectionError:
                        pass
                    return events, (code, payload[2:].decode(errors="replace"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return events, None

    async def send_close(self, code: bytes = (1000).to_bytes(2, "big")) -> None:
        self.writer.write(frame(code, CLOSE))
        await self.writer.drain()

    def abort(self) -> None:
        """Drop the connection at once (a reset, nothing flushed)."""
        self.writer.transport.abort()
