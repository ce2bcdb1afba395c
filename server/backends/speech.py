"""What the session asks of a speech-to-text and a text-to-speech backend.

    SpeechToText.open() ─▶ STTStream: send_audio(float32 @ 24 kHz), flush(), close()
                                      async for: Word, EndWord, Pause, Flushed
    TextToSpeech.speak(text chunks, voice) ─▶ async for: SpokenWord, AudioChunk (24 kHz)

Kyutai's servers (``kyutai_stt``, ``kyutai_tts``) and the embedded offline models
(``embedded_stt``, ``embedded_tts``) both implement these; the session and the
turn-taking never know which one they talk to. Every failure of a backend is a
``BackendUnavailable`` whose message says what to do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .kyutai.stt import EndWord, Event, Flushed, Pause, Word
from .kyutai.tts import AudioChunk, SpokenWord, TtsEvent

__all__ = [
    "AudioChunk", "EndWord", "Event", "Flushed", "Pause", "SAMPLE_RATE", "STTStream",
    "SpeechToText", "SpokenWord", "TextToSpeech", "TtsEvent", "Word",
]

SAMPLE_RATE = 24_000
"""The session's audio rate, both ways: the Realtime API's pcm16 and Mimi's."""

Samples = npt.NDArray[np.float32]


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

    async def open(self) -> STTStream: ...


class TextToSpeech(Protocol):
    @property
    def name(self) -> str: ...

    def voice_for(self, source: Mapping[str, Any]) -> str | None:
        """The voice this backend speaks a character's ``VOICE_SOURCE`` with."""

    def speak(self, text_chunks: AsyncIterator[str],
              voice: str | None) -> AsyncGenerator[TtsEvent, None]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
