"""The person's side of a turn, push-to-talk: audio in, transcript out.

    input_audio_buffer.append (pcm16 24 kHz, base64) ─▶ STTStream.send_audio
    STT Word events ─▶ conversation.item.input_audio_transcription.delta
    input_audio_buffer.commit ─▶ flush ─▶ the transcript, which becomes a user message

Automatic turn detection (ending the turn on a pause, barge-in) is not built yet:
the client commits, as with ``turn_detection: null``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable

from . import protocol
from .errors import TroupeError
from .kyutai_stt import Flushed, KyutaiSTT, STTStream, Word, pcm16_to_float
from .llm import BackendUnavailable

Send = Callable[[protocol.ServerEvent], Awaitable[None]]


class Listening:
    """One utterance being transcribed; ``commit`` ends it."""

    def __init__(self, stream: STTStream, send: Send) -> None:
        self.item_id = protocol.new_id("item")
        self._stream = stream
        self._send = send
        self._words: list[str] = []
        self._flushed = asyncio.Event()
        self._failure: BackendUnavailable | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, stt: KyutaiSTT, send: Send) -> Listening:
        return cls(await stt.open(), send)

    async def append(self, audio: str) -> None:
        """Send base64 pcm16 audio on. Raises ``TroupeError`` for bad audio and
        ``BackendUnavailable`` when the STT failed."""
        if self._failure is not None:
            raise self._failure
        try:
            pcm = pcm16_to_float(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise TroupeError(
                "invalid_event", f"audio must be base64 pcm16 (24 kHz mono): {exc}",
                param="audio",
            ) from None
        await self._stream.send_audio(pcm)

    async def commit(self) -> str:
        """Flush the STT and return the whole transcript. Raises ``BackendUnavailable``."""
        await self._stream.flush()
        await self._flushed.wait()
        if self._failure is not None:
            raise self._failure
        return " ".join(self._words)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._stream.close()

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                match event:
                    case Word(text=text, start_time=start) if text:
                        delta = text if not self._words else " " + text
                        self._words.append(text)
                        await self._send(protocol.TranscriptionDelta(
                            item_id=self.item_id, delta=delta, start_time=start))
                    case Flushed():
                        self._flushed.set()
        except BackendUnavailable as exc:
            self._failure = exc
        finally:
            self._flushed.set()
