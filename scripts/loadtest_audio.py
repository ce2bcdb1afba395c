"""The speech every streaming session of ``scripts/loadtest.py`` sends, in a loop.

    PHRASE ─ EmbeddedTTS (piper, in this process) ─▶ <temp>/troupe-loadtest/<hash>.wav
             (made once per machine, reused; never downloaded)
    WAV ─ mono, 24 kHz pcm16 ─▶ one cycle: the utterance, then silence to ``period``
        ─▶ input_audio_buffer.append events, 80 ms each, encoded once and shared

The cycle is long enough for the character's whole reply to be heard before the
next utterance starts, so a reply is never interrupted by the next question (the
server would count a barge-in). The words the fake speech-to-text "hears", and
when, come from the same cycle (``Cycle.heard``): the utterance's words spread
evenly over its voiced part, found by energy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import tempfile
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
REPLY = ("Sure thing. Tomorrow looks bright and mild in the morning, "
         "with a little rain later on.")
"""What the fake language model answers, every time."""
TTS_FRAMES_PER_WORD = 3
"""Reply audio per word from the fake TTS (80 ms frames): 240 ms a word."""
STT_DELAY_SEC = 0.48
"""The fake STT's answer delay (6 steps, as Kyutai's stt-1b-en_fr)."""
MARGIN_SEC = 1.5
"""Silence kept between the end of a reply and the next utterance."""
CACHE = Path(tempfile.gettempdir()) / "troupe-loadtest"


@dataclass(frozen=True)
class Cycle:
    """One utterance and the silence after it, as append events."""

    appends: tuple[str, ...]
    """JSON text of each ``input_audio_buffer.append``, 80 ms of audio each."""
    speech_start: float
    speech_end: float
    """Seconds into the cycle where the voiced part begins and ends."""
    words: tuple[str, ...]

    @property
    def period(self) -> float:
        return len(self.appends) * CHUNK_SEC

    @property
    def last_speech_chunk(self) -> int:
        """Index of the append that carries the end of the utterance."""
        return min(len(self.appends) - 1, int(self.speech_end / CHUNK_SEC))

    def heard(self) -> list[tuple[str, float]]:
        """(word, start second) for the fake STT: evenly over the voiced part."""
        step = (self.speech_end - self.speech_start) / len(self.words)
        return [(word, round(self.speech_start + i * step, 3))
                for i, word in enumerate(self.words)]

    def stt_script(self) -> dict[str, object]:
        """What ``scripts.loadtest_fakes`` needs to hear this cycle."""
        return {"utterances": [{"words": self.heard(), "end": self.speech_end}],
                "period": self.period, "reply": REPLY, "frames_per_word": TTS_FRAMES_PER_WORD}


def synthesized_speech(text: str = PHRASE, cache: Path = CACHE) -> Path:
    """A WAV of ``text`` spoken by the embedded piper voice, made once and cached."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache / f"speech-{digest}.wav"
    if path.exists():
        return path
    from server.embedded_tts import EmbeddedTTS  # piper loads only when a WAV is made

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


def build_cycle(wav: Path, words: tuple[str, ...], audio_lead: float) -> Cycle:
    """The cycle for ``wav`` (any rate and channels soundfile reads; raises
    ``scripts.client.CannotStart`` when it cannot be read). ``words`` is what the
    utterance says."""
    pcm = np.frombuffer(read_speech(str(wav)), dtype="<i2")
    start, end = voiced_span(pcm)
    answered = end + STT_DELAY_SEC + 2 * CHUNK_SEC + reply_seconds() + audio_lead + MARGIN_SEC
    chunks = max(math.ceil(len(pcm) / CHUNK_SAMPLES), math.ceil(answered / CHUNK_SEC))
    padded = np.zeros(chunks * CHUNK_SAMPLES, dtype="<i2")
    padded[:len(pcm)] = pcm
    appends = tuple(
        json.dumps({
            "type": "input_audio_buffer.append", "event_id": f"lt_audio_{index}",
            "audio": base64.b64encode(
                padded[index * CHUNK_SAMPLES:(index + 1) * CHUNK_SAMPLES].tobytes()
            ).decode("ascii"),
        })
        for index in range(chunks)
    )
    return Cycle(appends, start, end, words or ("hello",))


def pcm16_samples_in(base64_text: str) -> int:
    """Samples in a base64 pcm16 payload, without decoding it."""
    padding = base64_text.count("=", max(0, len(base64_text) - 2))
    return (len(base64_text) * 3 // 4 - padding) // 2
