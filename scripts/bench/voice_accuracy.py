"""The voice part's accuracy phase: the embedded speech-to-text's word error rate on
the test speech, and its CPU per second of audio (no server: the worker's own
recogniser, in this process).

    SENTENCES × VOICES ──▶ stt_worker._Recogniser, 80 ms pieces as a stream, 0.5 s of
    (piper Joe; Joe 20 % slower, half   silence before and 1 s after ──▶ words
    as loud, with noise; eSpeak NG)     WER = word edits / reference words (lower
                                        case, punctuation and "(2)" variants dropped)

The speech is synthesized, as in the tests: piper's Joe is what the embedded STT
hears best, eSpeak NG's robotic voice what it hears worst.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from server.backends.embedded import stt_worker
from server.backends.embedded.tts import EmbeddedTTS, _Piper, resample

SENTENCES = (
    "What is your name?", "Tell me a story about the sea please.",
    "I would like to know what time it is.", "Can you help me find the museum?",
    "Where is the nearest train station?", "Please turn off the lights in the kitchen.",
    "How old is the lighthouse on the hill?", "My favorite color is green.",
    "Do you know any good jokes?", "What should I cook for dinner tonight?",
    "The weather is very cold this morning.", "I need to buy some bread and milk.",
    "Could you speak a little more slowly?", "Thank you very much for your help.",
    "Let us play a game of trivia.", "How far away is the moon?",
    "I am going to the market tomorrow.", "Which painting is the most famous here?",
    "Tell me something about ancient Rome.", "Goodbye, see you later.",
)
VOICES = ("joe", "joe slow, quiet, noisy", "espeak en-us")
RATE = 24_000
PIECE = 1920
"""Samples per piece fed to the recogniser (80 ms, one client append)."""


@dataclass(frozen=True)
class AccuracyFigures:
    wer: float
    by_voice: dict[str, float]
    cpu_per_audio_second: float
    """CPU seconds the recogniser used per second of audio (speech and silence)."""
    utterances: int


def measure_accuracy() -> AccuracyFigures:
    items = _speech()
    decoders = stt_worker._Decoders()
    edits = {voice: 0 for voice in VOICES}
    words = {voice: 0 for voice in VOICES}
    cpu = audio_seconds = 0.0
    for voice, text, speech in items:
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), speech,
                                np.zeros(RATE, np.float32)])
        recogniser = stt_worker._Recogniser(decoders)
        started = time.process_time()
        heard = [e for start in range(0, len(audio), PIECE)
                 for e in recogniser.hear(audio[start:start + PIECE])]
        heard += recogniser.flush()
        cpu += time.process_time() - started
        recogniser.close()
        audio_seconds += len(audio) / RATE
        said = [e.text.split("(")[0] for e in heard if isinstance(e, stt_worker.HeardWord)]
        reference = _words(text)
        edits[voice] += edit_distance(reference, said)
        words[voice] += len(reference)
    return AccuracyFigures(
        wer=sum(edits.values()) / sum(words.values()),
        by_voice={voice: edits[voice] / words[voice] for voice in VOICES},
        cpu_per_audio_second=cpu / audio_seconds, utterances=len(items))


def _speech() -> list[tuple[str, str, np.ndarray]]:
    from piper.config import SynthesisConfig

    tts = EmbeddedTTS()
    noise = np.random.default_rng(1)
    items = []
    for text in SENTENCES:
        items.append((VOICES[0], text, tts.synthesize_all(text)))
        piper = tts._engine("piper:")
        assert isinstance(piper, _Piper)
        slow = SynthesisConfig(length_scale=1.2)
        chunks = [c.audio_float_array for c in piper.voice.synthesize(text, syn_config=slow)]
        quiet = resample(np.concatenate(chunks), piper.rate) * 0.5
        items.append((VOICES[1], text,
                      (quiet + noise.normal(0, 0.003, len(quiet))).astype(np.float32)))
        items.append((VOICES[2], text, tts.synthesize_all(text, "espeak:en-us")))
    return items


def _words(text: str) -> list[str]:
    return [w for w in (word.strip(".,?!").lower() for word in text.split()) if w]


def edit_distance(reference: list[str], heard: list[str]) -> int:
    """Word substitutions, insertions and deletions from ``reference`` to ``heard``."""
    row = list(range(len(heard) + 1))
    for i, word in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, other in enumerate(heard, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                           diagonal + (word != other))
    return row[-1]
