"""One conversation with Kyutai STT: audio in, transcript events out (``KyutaiSTTStream``).

    send_audio ──▶ Audio frames ─┐                    ┌─▶ queue ──▶ async for: Word, EndWord,
    flush ──▶ Marker, silence ───┴─▶ socket ──reader──┤              Pause, Flushed
                                                      └─▶ markers echoed: flush returns

``KyutaiSTT.open`` (``stt.py``) connects and hands the socket over; what the messages
mean and what Unmute taught about them is told there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt

from ...audio.pcm import Samples
from ..errors import BackendUnavailable
from ..speech import EndWord, Event, Flushed, Pause, Word
from .stt_wire import (
    FRAME_SAMPLES,
    FRAME_SEC,
    EndWordMessage,
    Error,
    Marker,
    Ready,
    ServerMessage,
    Step,
    WordMessage,
    decode,
    encode,
    encode_audio,
)

log = logging.getLogger(__name__)

PAUSE_HEAD = 2
"""The entry of ``Step.prs`` Unmute reads as the pause probability."""


class Client(Protocol):
    """What a stream reads from its ``KyutaiSTT``, at each use."""

    url: str
    timeout: float
    delay_sec: float
    max_flush_sec: float
    settle_steps: int

    def _forget(self, stream: KyutaiSTTStream) -> None: ...


class _End(msgspec.Struct, frozen=True):
    failure: BackendUnavailable | None


class KyutaiSTTStream:
    """One conversation's audio in, its transcript out; from ``KyutaiSTT.open``
    (an ``STTStream``).

    Iterate it for events (one consumer; it ends after ``close``, raises
    ``BackendUnavailable`` when the server fails). A reader task, started by
    ``start``, takes the server's messages off the socket as they come, so ``flush``
    works while nobody iterates; consume the events or they pile up.
    """

    def __init__(self, stt: Client, ws: aiohttp.ClientWebSocketResponse[Any]) -> None:
        self._stt = stt
        self._ws = ws
        self._where = f"the speech-to-text server at {stt.url}"
        self._events: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._pending: Samples = np.zeros(0, dtype=np.float32)
        self._markers: dict[int, asyncio.Future[None]] = {}
        self._marker_ids = itertools.count(1)
        self._stepped = asyncio.Event()
        self._failure: BackendUnavailable | None = None
        self._closing = False
        self.frames_sent = 0
        self.steps_received = 0
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading the server's messages (once, before anything else)."""
        if self._reader is None:
            self._reader = asyncio.create_task(
                self._read(), name=f"kyutai-stt reader {self._stt.url}")

    @property
    def audio_sent_sec(self) -> float:
        """Audio sent so far, silence from flushes included."""
        return self.frames_sent * FRAME_SEC

    # ── audio in ─────────────────────────────────────────────────────────────

    async def send_audio(self, pcm: npt.ArrayLike) -> None:
        """Send mono samples at 24 kHz in 1920-sample frames; a partial frame waits
        for the next call (or ``flush``). Raises ``ValueError`` for non-mono audio,
        ``BackendUnavailable`` when the server is gone."""
        samples = np.asarray(pcm, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono audio (one dimension), got shape {samples.shape}")
        self._check_open()
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        whole = len(samples) - len(samples) % FRAME_SAMPLES
        for start in range(0, whole, FRAME_SAMPLES):
            await self._send_frame(samples[start:start + FRAME_SAMPLES])
        self._pending = samples[whole:].copy()

    async def flush(self) -> None:
        """Get the words of all audio sent so far out of the server, as Unmute does
        at the end of a turn: the partial frame zero-padded, a marker, then silence
        until the marker comes back. The words arrive as events before ``Flushed``.

        Raises ``BackendUnavailable`` if the marker does not return within
        ``timeout``, or ``max_flush_sec`` of silence after it."""
        self._check_open()
        if self._pending.size:
            padded = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            padded[:len(self._pending)] = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            await self._send_frame(padded)
        marker_id = next(self._marker_ids)
        echoed = self._markers[marker_id] = asyncio.get_running_loop().create_future()
        silence = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        most = math.ceil(self._stt.max_flush_sec / FRAME_SEC)
        sent = 0
        try:
            async with asyncio.timeout(self._stt.timeout):
                await self._send(encode(Marker(marker_id)))
                # Unmute's amount: the server's delay and a frame to spare.
                for _ in range(math.ceil(self._stt.delay_sec / FRAME_SEC) + 1):
                    await self._send_frame(silence)
                    sent += 1
                while not echoed.done():
                    self._stepped.clear()
                    if self.steps_received + 1 >= self.frames_sent:
                        # Caught up, marker still out: the delay is longer than assumed.
                        if sent >= most:
                            raise BackendUnavailable(
                                f"{self._where} did not return a flush marker after "
                                f"{sent * FRAME_SEC:.2f} s of silence; see its log")
                        await self._send_frame(silence)
                        sent += 1
                    stepped = asyncio.ensure_future(self._stepped.wait())
                    try:
                        await asyncio.wait((echoed, stepped),
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stepped.cancel()
                echoed.result()
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{self._where} did not finish a flush within {self._stt.timeout:g} s; "
                f"check that it is not overloaded") from exc
        finally:
            self._markers.pop(marker_id, None)

    async def _send_frame(self, frame: Samples) -> None:
        await self._send(encode_audio(frame))
        self.frames_sent += 1

    async def _send(self, data: bytes) -> None:
        self._check_open()
        try:
            async with asyncio.timeout(self._stt.timeout):
                await self._ws.send_bytes(data)
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"{self._where} stopped taking audio for {self._stt.timeout:g} s; check "
                f"that it is not overloaded") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._failure or BackendUnavailable(
                f"the connection to {self._where} broke off ({exc}); see its log") from exc

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise RuntimeError(f"the stream to {self._where} is closed")

    # ── events out ───────────────────────────────────────────────────────────

    def __aiter__(self) -> KyutaiSTTStream:
        return self

    async def __anext__(self) -> Event:
        item = await self._events.get()
        if isinstance(item, _End):
            self._events.put_nowait(item)  # every later read ends the same way
            if item.failure is not None:
                raise item.failure
            raise StopAsyncIteration
        return item

    async def _read(self) -> None:
        """Takes messages off the socket until it closes; the connection's fate
        ends the event stream. A dead peer ends it through the heartbeat."""
        failure: BackendUnavailable | None = None
        try:
            while failure is None:
                message = await self._ws.receive()
                match message.type:
                    case aiohttp.WSMsgType.BINARY:
                        failure = self._dispatch(decode(message.data))
                    case aiohttp.WSMsgType.ERROR:
                        failure = BackendUnavailable(
                            f"the connection to {self._where} broke off ({message.data}); "
                            f"see its log")
                    case (aiohttp.WSMsgType.CLOSE | aiohttp.WSMsgType.CLOSING
                          | aiohttp.WSMsgType.CLOSED):
                        if not self._closing:
                            failure = self._closed_mid_stream()
                        break
        except msgspec.DecodeError as exc:
            failure = BackendUnavailable(
                f"{self._where} sent a message outside Kyutai's STT protocol ({exc}); "
                f"check that it runs a compatible moshi-server")
        except Exception as exc:  # the task's edge: nobody else would ever see it
            log.exception("reading from %s failed", self._where)
            failure = BackendUnavailable(f"reading from {self._where} failed ({exc!r})")
        finally:
            if failure is not None and not self._closing:
                log.warning("%s", failure.message)
                self._failure = failure
            for echoed in self._markers.values():
                if not echoed.done():
                    if self._failure is not None:
                        echoed.set_exception(self._failure)
                    else:
                        echoed.set_result(None)
            self._stepped.set()
            self._events.put_nowait(_End(self._failure))
        if failure is not None and not self._ws.closed:
            await self._ws.close()

    def _closed_mid_stream(self) -> BackendUnavailable:
        code = self._ws.close_code
        if code in (None, aiohttp.WSCloseCode.ABNORMAL_CLOSURE):
            return BackendUnavailable(
                f"the connection to {self._where} broke off mid-stream; see its log")
        return BackendUnavailable(
            f"{self._where} closed the connection mid-stream (code {code}); see its log")

    def _dispatch(self, message: ServerMessage) -> BackendUnavailable | None:
        match message:
            case WordMessage(text=text, start_time=start_time):
                self._events.put_nowait(Word(text, start_time))
            case EndWordMessage(stop_time=stop_time):
                self._events.put_nowait(EndWord(stop_time))
            case Step(prs=prs):
                self.steps_received += 1
                self._stepped.set()
                if self.steps_received > self._stt.settle_steps and len(prs) > PAUSE_HEAD:
                    time = self.steps_received * FRAME_SEC - self._stt.delay_sec
                    self._events.put_nowait(Pause(prs[PAUSE_HEAD], time))
            case Marker(id=marker_id):
                echoed = self._markers.get(marker_id)
                if echoed is not None and not echoed.done():
                    echoed.set_result(None)
                self._events.put_nowait(Flushed(marker_id))
            case Error(message=reason):
                return BackendUnavailable(f"{self._where} reported an error: {reason}")
            case Ready():
                pass
        return None

    # ── the end ──────────────────────────────────────────────────────────────

    async def close(self) -> None:
        """Close the connection; the events end once the queued ones are read.
        A flush waiting for its marker returns."""
        if not self._closing:
            self._closing = True
            self._stt._forget(self)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await self._ws.close()  # bounded by ClientWSTimeout.ws_close
        if self._reader is None:  # never started: nothing will end the events
            self._events.put_nowait(_End(self._failure))
            return
        try:
            async with asyncio.timeout(self._stt.timeout):
                await asyncio.shield(self._reader)
        except TimeoutError:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def __aenter__(self) -> KyutaiSTTStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
