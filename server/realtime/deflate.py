"""Frames sent without ``permessage-deflate`` where the client negotiated it.

Browsers and the ``websockets`` library (the ``openai`` SDK's transport) offer the
extension, and then every frame is compressed unless the sender says otherwise (RFC
7692 §6: the RSV1 bit is per message). Audio deltas are base64 of noise-like samples:
deflate saves ~20 % of them at ~450 µs of the event loop per 80 ms delta, which at
100 sessions is most of a core. So audio goes uncompressed, everything else as
negotiated.

aiohttp (3.14) can give a frame its own compression level but not none: ``compress=0``
is falsy and falls back to the connection's. Its writer decides from ``compress`` when
a frame starts, so the level is set to 0 for the frame and restored after. Safe
because one task (the session's writer) sends the connection's data frames; control
frames are never compressed. ``tests/test_deflate.py`` reads the RSV1 bits on the
wire, so an aiohttp that renames the attribute fails it.
"""

from __future__ import annotations

from aiohttp import web


async def send_str(ws: web.WebSocketResponse, frame: str, *, compress: bool) -> None:
    """``ws.send_str(frame)``, uncompressed unless ``compress``."""
    writer = getattr(ws, "_writer", None)
    level = getattr(writer, "compress", 0)
    if compress or not level:
        await ws.send_str(frame)
        return
    writer.compress = 0  # type: ignore[union-attr]
    try:
        await ws.send_str(frame)
    finally:
        writer.compress = level  # type: ignore[union-attr]
