"""One WebSocket's frames, bounded both ways (README "Limits"): nothing a client does
makes the server wait for it.

    ws frames ─▶ receive() ─ size / binary / JSON / schema checks ─▶ error event
                      │ valid event
                      ▼
                    jobs (Backlog) ─▶ the session's worker
    send(event) ─▶ outbox ─▶ writer ─▶ ws frames
    end(code, reason) ─▶ flush or drop the outbox, close frame, wait for the
                         client's; past close_timeout, reset the connection

- The backlog holds at most ``max_backlog_events`` events and ``max_backlog_bytes``
  of their frames. An event that finds it full is dropped: the first of a run gets
  an ``error`` (``rate_limited``), the others none; more than ``max_dropped_events``
  in a row close the session with 1008 "too many events while behind".
- The outbox holds at most ``max_outbox_bytes`` of events not yet written, and one
  frame may take the socket at most ``send_timeout`` seconds: past either, the
  client is not reading; the session closes with 1008 "client not reading", the
  events still queued dropped.
- More than ``max_invalid_events`` refused frames (not JSON, not an event, too
  large, binary, nested too deep) in ``invalid_window`` seconds: one ``error``
  (``rate_limited``), then a close with 1008 "too many invalid events". Below
  that, each gets its ``invalid_event`` (or ``message_too_large``) error.
- A close waits ``close_timeout`` seconds at most for the client's close frame,
  then resets the connection: what the client never read is freed at once.

The receive loop yields to the event loop after every frame, so a client that
sends as fast as loopback allows delays no other session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web

from .. import metrics
from ..conversation import events
from ..errors import TroupeError
from . import deflate, protocol
from .limits import Backlog, Outbox, SlidingWindow

J = TypeVar("J")

_AUDIO = events.AudioDelta  # and the GA name's subclass
"""Sent without permessage-deflate (``deflate.py``: most of the cost, little gain)."""


class _Uncompressed(str):
    """A frame the writer sends uncompressed."""

    __slots__ = ()


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_backlog_events: int
    max_backlog_bytes: int
    max_dropped_events: int
    max_outbox_bytes: int
    send_timeout: float
    max_invalid_events: int
    invalid_window: float
    close_timeout: float


class Connection(Generic[J]):
    """``jobs`` holds the client's events and what the session queues itself (``J``)."""

    def __init__(self, ws: web.WebSocketResponse, limits: Limits, label: str,
                 log: logging.Logger) -> None:
        self.ws = ws
        self.limits = limits
        self.label = label
        self._log = log
        self.last_heard = time.monotonic()  # the client's last frame (pings do not count)
        self.jobs: Backlog[events.ClientEventUnion | J] = Backlog(
            limits.max_backlog_events, limits.max_backlog_bytes)
        self._outbox = Outbox(limits.max_outbox_bytes)
        self._refused = SlidingWindow(limits.max_invalid_events, limits.invalid_window)
        self._writer: asyncio.Task[None] | None = None
        self._sending_since: float | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False
        self.ended_by_us = False
        """The session closed the connection (``end``), not the client or a drop."""

    async def open(self) -> None:
        """Start writing what is sent."""
        self._writer = asyncio.create_task(self._write(), name=f"{self.label}-writer")

    async def send(self, event: events.ServerEvent) -> None:
        """Queue ``event`` for the client (as its dialect shows it); a client that does
        not read is closed."""
        if self.ws.closed:
            return
        metrics.WEBSOCKET_EVENTS.labels(protocol.tag(type(event)), "out").inc()
        frame = protocol.encode(event)
        if isinstance(event, _AUDIO):
            frame = _Uncompressed(frame)
        if not self._outbox.push(frame):
            self.end(WSCloseCode.POLICY_VIOLATION, "client not reading", flush=False,
                     why=f"{self._outbox.size} bytes of events wait for it (the limit "
                         f"is {self.limits.max_outbox_bytes})")
        elif (since := self._sending_since) is not None and (
                time.monotonic() - since > self.limits.send_timeout):
            self.end(WSCloseCode.POLICY_VIOLATION, "client not reading", flush=False,
                     why=f"a frame has waited {self.limits.send_timeout:g} s for it "
                         "to take data")

    async def _send_error(self, error: TroupeError, event_id: str | None = None) -> None:
        await self.send(events.error(error, event_id))

    def stop(self) -> None:
        """The session ends: no more jobs; if the client left, what it did not read
        goes."""
        if self._closer is None:
            self._outbox.close(drop=True)
        self.jobs.clear()

    async def finish(self) -> None:
        """Wait for the close (if the session closed) and the writer's end; a
        connection that outlives them is cancelled."""
        writer = self._writer
        try:
            if self._closer is not None:
                await asyncio.gather(self._closer, return_exceptions=True)
            # The writer ends by itself once its outbox is closed and the connection
            # over: cancelling it would leave its frame (the session) in a cycle.
            if writer is not None:
                await asyncio.wait({writer}, timeout=self.limits.close_timeout)
        finally:
            if writer is not None and not writer.done():
                writer.cancel()  # a connection that outlived its close
            self._closing = True  # a late end() (the deadline watcher's) does nothing
            # Nothing started here keeps the session (and all it holds) in a cycle
            # until the collector comes round: it goes now.
            self._writer = self._closer = None

    async def receive(self) -> None:
        """Read the client's frames until it leaves or the session closes: events
        onto ``jobs``, refusals answered."""
        limit = self.limits.max_message_bytes
        async for message in self.ws:
            self.last_heard = time.monotonic()
            if message.type is WSMsgType.TEXT:
                if len(message.data) > limit:
                    await self._refuse("oversized", TroupeError(
                        "message_too_large",
                        f"a frame of {len(message.data)} bytes exceeds the limit of {limit}; "
                        "split audio into smaller input_audio_buffer.append events",
                    ))
                else:
                    await self._accept(message.data)
            elif message.type is WSMsgType.BINARY:
                await self._refuse("binary", TroupeError(
                    "invalid_event",
                    "binary frames are not accepted: send JSON text events "
                    "(audio goes base64-encoded in input_audio_buffer.append)",
                ))
            elif message.type is WSMsgType.ERROR:
                self._log.info("%s: connection error: %s", self.label, self.ws.exception())
                return
            if self._closing:
                return  # what the client sends now is read and discarded
            # Frames already buffered are read without a pause: let the others run.
            await asyncio.sleep(0)

    async def _accept(self, data: str) -> None:
        try:
            event = protocol.decode_client(data)
        except protocol.InvalidEvent as exc:
            await self._refuse("invalid", TroupeError("invalid_event", str(exc),
                                                      param=exc.param), exc.event_id)
            return
        event_type = type(event).__struct_config__.tag
        metrics.WEBSOCKET_EVENTS.labels(event_type, "in").inc()
        if self.jobs.offer(event, len(data)):
            return
        if self.jobs.dropped == 1:
            await self._send_error(TroupeError(
                "rate_limited",
                f"this session is {len(self.jobs)} events behind; this {event_type} and "
                "the events after it are dropped until it catches up: wait for answers "
                f"before sending more (after {self.limits.max_dropped_events} dropped, it "
                "closes)",
                details={"backlog_events": len(self.jobs), "backlog_bytes": self.jobs.size},
            ), event.event_id)
        elif self.jobs.dropped > self.limits.max_dropped_events:
            self.end(WSCloseCode.POLICY_VIOLATION, "too many events while behind",
                     why=f"{self.jobs.dropped} events dropped in a row")

    async def _refuse(self, kind: str, error: TroupeError, event_id: str | None = None) -> None:
        """A frame that is no event: its error, unless they come too often."""
        metrics.WEBSOCKET_EVENTS.labels(kind, "in").inc()
        if not self._refused.hit(time.monotonic()):
            await self._send_error(error, event_id)
            return
        most, window = self.limits.max_invalid_events, self.limits.invalid_window
        await self._send_error(TroupeError(
            "rate_limited",
            f"more than {most} invalid frames within {window:g} s "
            f"(the last: {error.message}); the session closes",
        ), event_id)
        self.end(WSCloseCode.POLICY_VIOLATION, "too many invalid events",
                 why=f"more than {most} in {window:g} s")

    async def _write(self) -> None:
        """Write the outbox to the socket, in order; ``_sending_since`` says since
        when the frame being written waits for the client to take data (``send``
        gives up on a client past ``send_timeout``). Never cancelled while the
        connection lives: aiohttp's writes wait on one shared drain future, and a
        cancelled wait cancels it, failing the close frame's wait after it."""
        while (frame := await self._outbox.get()) is not None:
            self._sending_since = time.monotonic()
            try:
                await deflate.send_str(self.ws, frame,
                                       compress=not isinstance(frame, _Uncompressed))
            except ConnectionError:
                self._outbox.close(drop=True)  # the client is gone; the receive loop ends
                return
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
                # aiohttp's shared drain future was cancelled under us (a close that
                # timed out): the connection is over.
                self._outbox.close(drop=True)
                return
            finally:
                self._sending_since = None

    def end(self, code: int, reason: str, why: str = "", *, flush: bool = True) -> None:
        """Close the session, from a task of its own (the first call only counts):
        the events queued are sent first when ``flush``, else dropped. ``reason``
        goes in the close frame (at most 123 bytes), ``why`` only to the log."""
        if not self._closing:
            self._closing = True
            self.ended_by_us = True
            self._log.info("%s: closing with %d, %s: %s", self.label, code, reason, why)
            self._closer = asyncio.create_task(self._close(code, reason, flush),
                                               name=f"{self.label}-closer")

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        """Send what is queued (``flush``) or drop it, then the close frame, and
        wait for the client's; past ``close_timeout``, reset the connection."""
        self._outbox.close(drop=not flush)  # the writer ends after its current frame
        try:
            async with asyncio.timeout(self.limits.close_timeout):
                if flush and self._writer is not None:
                    await asyncio.wait({self._writer})
                await self.ws.close(code=code, message=reason.encode())
            if self.ws.exception() is None and self.ws.close_code not in (
                    None, WSCloseCode.ABNORMAL_CLOSURE):
                return  # the client answered: all it was sent, it read
        except TimeoutError:
            pass
        # The client does not read, so asyncio's transport.close() would keep what it
        # holds until it does; a reset frees it now (aiohttp exposes the socket only).
        self._log.info("%s: no close handshake within %g s; resetting", self.label,
                       self.limits.close_timeout)
        sock = self.ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)

