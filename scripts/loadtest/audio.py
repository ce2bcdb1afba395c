"""The speech every streaming session of the load test sends, in a loop.

    PHRASE, INTERRUPTION ─ EmbeddedTTS (piper, in this process)
        ─▶ <temp>/troupe-loadtest/<hash>.wav  (made once per machine, reused; never downloaded)
    WAVs ─ mono, 24 kHz pcm16 ─▶ one cycle of utterances and silences
        ─▶ input_audio_buffer.append events, 80 ms each, encoded once and shared

A cycle is made of blocks, as people talk to a character that can be interrupted::

    question ·· reply ─────X  interruption ·· reply, heard to the end ──── margin
                       ╰ offset ╯
    (without interruptions: one block, the question and its whole reply)

Each block asks the question (``PHRASE``); with interruptions, the person speaks
over the character's reply (``INTERRUPTION``), starting ``offset`` seconds after the
reply's first audio is expected, and hears the reply to that to the end; then comes
``MARGIN_SEC`` of silence. The server hears the interruption while it is still
sending the reply, cancels it (``response.done`` cancelled) and answers the new
turn. The offsets are drawn per run, one per block from successive parts of
``OFFSETS_SEC``, so that sessions, which start at random points of the cycle,
interrupt at different moments of a reply. Without interruptions a reply is never
cut short: the silence after each utterance is long enough for the whole of it.

The words the fake speech-to-text "hears", and when, come from the same cycle
(``Cycle.stt_script``): each utterance's words spread evenly over its voiced part,
found by energy. A reply's first audio is expected ``REPLY_DELAY_SEC`` after the end
of the speech it answers (the STT's delay, two frames); later under load, which
moves an interruption towards the start of the reply it cuts.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from scripts.client import read_speech

SAMPLE_RATE = 24_000
CHUNK_SAMPLES = 1920
CHUNK_SEC = CHUNK_SAMPLES / SAMPLE_RATE
"""One append (and one reply frame): 80 ms, the rate a microphone client sends at."""

PHRASE = "Hello there. Could you tell me what the weather will be like tomorrow?"
INTERRUPTION = "Wait, what about the weekend?"
"""What a person says over the character's reply."""
REPLY = ("Sure thing. Tomorrow looks bright and mild in the morning, "
         "with a little rain later on.")
"""What the fake language model answers, every time."""
TTS_FRAMES_PER_WORD = 3
"""Reply audio per word from the fake TTS (80 ms frames): 240 ms a word."""
STT_DELAY_SEC = 0.48
"""The fake STT's answer delay (6 steps, as Kyutai's stt-1b-en_fr)."""
REPLY_DELAY_SEC = STT_DELAY_SEC + 2 * CHUNK_SEC
"""From the end of speech to the reply's first audio, as the cycle expects it."""
MARGIN_SEC = 1.5
"""Silence kept between the end of a reply and the next utterance."""
INTERRUPTIONS_PER_CYCLE = 2
OFFSETS_SEC = (0.3, 2.4)
"""Where interruptions start, seconds after a reply's first audio is expected: from
early in the reply to late enough that the server, which hears speech
``STT_DELAY_SEC`` after it and sends a reply ``--audio-lead`` ahead of real time, is
still sending it (the fake reply lasts ``reply_seconds()``, 3.84 s)."""
CACHE = Path(tempfile.gettempdir()) / "troupe-loadtest"


@dataclass(frozen=True)
class Speech:
    """One recorded utterance: mono 24 kHz pcm16, its voiced part, its words."""

    pcm: np.ndarray
    start: float
    end: float
    """Seconds into ``pcm`` where the voiced part begins and ends."""
    words: tuple[str, ...]


@dataclass(frozen=True)
class Utterance:
    """One utterance as placed in the cycle."""

    start: float
    end: float
    """Seconds into the cycle where its voiced part begins and ends."""
    words: tuple[str, ...]
    offset: float | None = None
    """For an interruption: seconds after the interrupted reply's expected first audio."""

    def heard(self) -> list[tuple[str, float]]:
        """(word, start second) for the fake STT: evenly over the voiced part."""
        step = (self.end - self.start) / len(self.words)
        return [(word, round(self.start + i * step, 3)) for i, word in enumerate(self.words)]


@dataclass(frozen=True)
class Cycle:
    """The utterances and the silences between them, as append events."""

    appends: tuple[str, ...]
    """JSON text of each ``input_audio_buffer.append``, 80 ms of audio each."""
    utterances: tuple[Utterance, ...]
    first_block: float
    """Seconds from the start of the cycle to the end of its first block (its first
    reply heard to the end, and the margin after it)."""

    @property
    def period(self) -> float:
        return len(self.appends) * CHUNK_SEC

    @property
    def interruptions(self) -> tuple[float, ...]:
        """The offset of each interruption in the cycle (none: sessions never interrupt)."""
        return tuple(u.offset for u in self.utterances if u.offset is not None)

    @functools.cached_property
    def starts(self) -> dict[int, Utterance]:
        """The append that carries the start of each utterance, by index."""
        return {min(len(self.appends) - 1, int(u.start / CHUNK_SEC)): u
                for u in self.utterances}

    @functools.cached_property
    def ends(self) -> dict[int, Utterance]:
        """The append that carries the end of each utterance, by index."""
        return {min(len(self.appends) - 1, int(u.end / CHUNK_SEC)): u for u in self.utterances}

    def stt_script(self) -> dict[str, object]:
        """What ``scripts.loadtest.fakes`` needs to hear this cycle."""
        return {"utterances": [{"words": u.heard(), "end": u.end} for u in self.utterances],
                "period": self.period, "reply": REPLY,
                "frames_per_word": TTS_FRAMES_PER_WORD}


def synthesized_speech(text: str = PHRASE, cache: Path = CACHE) -> Path:
    """A WAV of ``text`` spoken by the embedded piper voice, made once and cached."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache / f"speech-{digest}.wav"
    if path.exists():
        return path
    from server.backends.embedded.tts import EmbeddedTTS  # piper loads only when a WAV is made

    samples = EmbeddedTTS().synthesize_all(text)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.wav")
    soundfile.write(partial, samples, SAMPLE_RATE, subtype="PCM_16")
    partial.replace(path)  # a concurrent run never reads half a file
    return path


def words_of(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[A-Za-z0-9']+", text))


def voiced_span(pcm: np.ndarray, threshold: float = 0.02) -> tuple[float, float]:
    """(start, end) seconds of the part of ``pcm`` (int16) louder than ``threshold``
    of full scale, measured in 20 ms windows; the whole file when nothing is."""
    window = SAMPLE_RATE // 50
    usable = len(pcm) - len(pcm) % window
    if usable == 0:
        return 0.0, len(pcm) / SAMPLE_RATE
    frames = pcm[:usable].astype(np.float64).reshape(-1, window) / 32768
    loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) > threshold)
    if loud.size == 0:
        return 0.0, len(pcm) / SAMPLE_RATE
    return loud[0] * window / SAMPLE_RATE, (loud[-1] + 1) * window / SAMPLE_RATE


def reply_seconds(reply: str = REPLY, frames_per_word: int = TTS_FRAMES_PER_WORD) -> float:
    return len(reply.split()) * frames_per_word * CHUNK_SEC


def load_speech(wav: Path, words: tuple[str, ...]) -> Speech:
    """The utterance in ``wav`` (any rate and channels soundfile reads; raises
    ``scripts.client.CannotStart`` when it cannot be read), which says ``words``."""
    pcm = np.frombuffer(read_speech(str(wav)), dtype="<i2")
    start, end = voiced_span(pcm)
    return Speech(pcm, float(start), float(end), words or ("hello",))


def interruption_offsets(rng: random.Random, count: int = INTERRUPTIONS_PER_CYCLE,
                         span: tuple[float, float] = OFFSETS_SEC) -> list[float]:
    """``count`` offsets, one drawn from each of ``count`` equal parts of ``span``
    (early, late, …), in a random order; rounded to 10 ms."""
    low, high = span
    width = (high - low) / count
    offsets = [round(rng.uniform(low + i * width, low + (i + 1) * width), 2)
               for i in range(count)]
    rng.shuffle(offsets)
    return offsets


def build_cycle(question: Speech, audio_lead: float, interruption: Speech | None = None,
                offsets: Sequence[float] = ()) -> Cycle:
    """The cycle: one block per offset (the question, then ``interruption`` spoken
    ``offset`` s into its reply), or one block of the question alone when there are
    no offsets."""
    blocks: list[float | None] = list(offsets) if interruption is not None else []
    placed: list[tuple[float, Speech]] = []
    utterances: list[Utterance] = []
    at = 0.0
    first_block: float | None = None
    for offset in blocks or [None]:
        placed.append((at, question))
        utterances.append(Utterance(at + question.start, at + question.end, question.words))
        reply = at + question.end + REPLY_DELAY_SEC
        if offset is not None and interruption is not None:
            spoken = reply + offset - interruption.start
            placed.append((spoken, interruption))
            utterances.append(Utterance(spoken + interruption.start, spoken + interruption.end,
                                        interruption.words, offset))
            reply = spoken + interruption.end + REPLY_DELAY_SEC
        heard = reply + reply_seconds() + audio_lead + MARGIN_SEC
        recorded = max(start + len(speech.pcm) / SAMPLE_RATE for start, speech in placed)
        at = math.ceil(max(heard, recorded) / CHUNK_SEC - 1e-9) * CHUNK_SEC
        first_block = at if first_block is None else first_block
    chunks = round(at / CHUNK_SEC)
    mixed = np.zeros(chunks * CHUNK_SAMPLES, dtype=np.int32)
    for start, speech in placed:
        first = round(start * SAMPLE_RATE)
        mixed[first:first + len(speech.pcm)] += speech.pcm
    padded = np.clip(mixed, -32768, 32767).astype("<i2")
    appends = tuple(
        json.dumps({
            "type": "input_audio_buffer.append", "event_id": f"lt_audio_{index}",
            "audio": base64.b64encode(
                padded[index * CHUNK_SAMPLES:(index + 1) * CHUNK_SAMPLES].tobytes()
            ).decode("ascii"),
        })
        for index in range(chunks)
    )
    return Cycle(appends, tuple(utterances), first_block or at)


def pcm16_samples_in(base64_text: str) -> int:
    """Samples in a base64 pcm16 payload, without decoding it."""
    padding = base64_text.count("=", max(0, len(base64_text) - 2))
    return (len(base64_text) * 3 // 4 - padding) // 2
