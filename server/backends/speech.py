"""What the session asks of a speech-to-text and a text-to-speech backend, and the
events they yield.

    SpeechToText.open() ─▶ STTStream: send_audio(float32 @ 24 kHz), flush(), close()
                                      async for: Word, EndWord, Pause, Flushed
    TextToSpeech.speak(text chunks, voice) ─▶ async for: SpokenWord, AudioChunk (24 kHz)

Kyutai's servers (``kyutai/``) and the embedded offline models (``embedded/``) both
implement these; the session and the turn-taking never know which one they talk to.
Every failure of a backend is a ``BackendUnavailable`` (``errors``) whose message
says what to do. Audio is ``audio.pcm.Samples`` at ``audio.pcm.SAMPLE_RATE``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "AudioChunk", "EndWord", "Event", "Flushed", "Pause", "STTStream", "SpeechToText",
    "SpokenWord", "TextToSpeech", "TtsEvent", "Word",
]


# ── what a speech-to-text stream yields ──────────────────────────────────────


class Word(msgspec.Struct, frozen=True):
    """A recognised word (the first of a stream may be empty text)."""

    text: str
    start_time: float
    """Seconds into the stream's audio."""


class EndWord(msgspec.Struct, frozen=True):
    """The last word ended, ``stop_time`` seconds into the stream's audio."""

    stop_time: float


class Pause(msgspec.Struct, frozen=True):
    """How likely the speaker has finished, for the audio at ``time`` seconds."""

    probability: float
    time: float


class Flushed(msgspec.Struct, frozen=True):
    """Every word of the audio sent before ``flush`` has come before this."""

    id: int


Event = Word | EndWord | Pause | Flushed


# ── what text-to-speech yields ───────────────────────────────────────────────


class SpokenWord(msgspec.Struct, frozen=True):
    """A word of the reply, and where it lies in the audio (seconds)."""

    text: str
    start_s: float
    stop_s: float


class AudioChunk(msgspec.Struct, frozen=True):
    pcm: npt.NDArray[np.float32]
    """Mono samples in [-1, 1] at ``audio.pcm.SAMPLE_RATE``."""


TtsEvent = SpokenWord | AudioChunk


# ── the interfaces ───────────────────────────────────────────────────────────


class STTStream(Protocol):
    """One person's audio, transcribed as it arrives."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def send_audio(self, pcm: npt.ArrayLike) -> None:
        """Mono float samples at ``SAMPLE_RATE``."""

    async def flush(self) -> None:
        """Everything sent so far is transcribed, then ``Flushed`` is yielded."""

    async def close(self) -> None: ...


class SpeechToText(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def pause_hold(self) -> float:
        """Seconds the pause estimate must stay above the threshold to end a turn
        (0 where the estimate already means "finished", as Kyutai's pause heads do)."""

    @property
    def speech_starts_turn(self) -> bool:
        """Whether a low pause estimate alone (a voice activity detector) means the
        person is speaking, before any word is recognised."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def open(self) -> STTStream:
        """A new stream, ready for audio. Raises ``BackendUnavailable``."""


class TextToSpeech(Protocol):
    @property
    def name(self) -> str: ...

    def voice_for(self, source: Mapping[str, Any]) -> str | None:
        """The voice this backend speaks a character's ``VOICE_SOURCE`` with."""

    def speak(self, text_chunks: AsyncIterator[str],
              voice: str | None) -> AsyncGenerator[TtsEvent, None]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
