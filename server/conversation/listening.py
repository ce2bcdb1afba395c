"""The person's side of the conversation: audio in, transcript and turns out.

    input_audio_buffer.append (pcm16 24 kHz, base64) ─▶ STTStream.send_audio
    STT Word ─▶ conversation.item.input_audio_transcription.delta, TurnTaking.word()
    STT Pause ─▶ TurnTaking.pause() ─▶ END_TURN / INTERRUPT / SPEECH_STARTED ─▶ on_turn
    STT EndWord ─▶ TurnTaking.words_ended() ─▶ PAUSED (a draft of the reply) ─▶ on_turn
    input_audio_buffer.commit ─▶ flush ─▶ the utterance so far (push-to-talk)

One STT stream lasts as long as the session sends audio; ``take`` cuts it into the
person's utterances.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..audio.opus import OpusDecoder
from ..audio.pcm import SAMPLE_RATE, pcm16_to_float
from ..backends.errors import BackendUnavailable
from ..backends.speech import EndWord, Flushed, Pause, SpeechToText, STTStream, Word
from ..errors import TroupeError
from . import events
from .turns import Action, TurnTaking

log = logging.getLogger(__name__)

MAX_APPEND_SECONDS = 20
"""Audio one ``input_audio_buffer.append`` may carry."""
COMMIT_TIMEOUT = 30.0
"""Seconds a commit waits for the STT to finish the utterance."""

Send = Callable[[events.Outgoing], Awaitable[None]]
OnTurn = Callable[[Action, float], Awaitable[None]]


@dataclass(frozen=True)
class Utterance:
    item_id: str
    transcript: str
    seconds: float
    """Audio received for it."""


class Listening:
    """The session's audio going through the STT; ``turns`` (None: push-to-talk)
    decides when the person has finished or interrupts, reported to ``on_turn``
    with the audio time in seconds."""

    def __init__(self, stream: STTStream, send: Send, turns: TurnTaking | None,
                 on_turn: OnTurn, opus: OpusDecoder | None = None) -> None:
        self.item_id = events.new_id("item")
        self.audio_format = "opus" if opus is not None else "pcm16"
        self._opus = opus
        self.turns = turns
        self._stream = stream
        self._send = send
        self._on_turn = on_turn
        self._words: list[str] = []
        self._samples = 0
        self._flushed = asyncio.Event()
        self._failure: BackendUnavailable | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, stt: SpeechToText, send: Send, turns: TurnTaking | None,
                   on_turn: OnTurn, opus: OpusDecoder | None = None) -> Listening:
        """A stream opened and read. ``opus``: the session's decoder of its one Ogg
        Opus input stream (kept across utterances: the stream's header pages come
        only once)."""
        listening = cls(await stt.open(), send, turns, on_turn, opus)
        listening._reader = asyncio.create_task(listening._read())
        return listening

    async def append(self, audio: str) -> None:
        """Send base64 audio (pcm16 24 kHz mono, or the next bytes of an Ogg Opus
        stream) on. Raises ``TroupeError`` for bad audio and ``BackendUnavailable``
        when the STT failed."""
        if self._failure is not None:
            raise self._failure
        try:
            data = base64.b64decode(audio, validate=True)
            pcm = self._opus.decode(data) if self._opus is not None else pcm16_to_float(data)
        except (binascii.Error, ValueError) as exc:
            what = ("the next bytes of an Ogg Opus stream, base64" if self._opus is not None
                    else "base64 pcm16 (24 kHz mono)")
            raise TroupeError("invalid_event", f"audio must be {what}: {exc}",
                              param="audio") from None
        if len(pcm) > MAX_APPEND_SECONDS * SAMPLE_RATE:
            raise TroupeError(
                "message_too_large",
                f"one append carried {len(pcm) / SAMPLE_RATE:.0f} s of audio; send at most "
                f"{MAX_APPEND_SECONDS} s per input_audio_buffer.append (80 ms is usual)",
                param="audio")
        if len(pcm):
            self._samples += len(pcm)
            await self._stream.send_audio(pcm)

    async def commit(self) -> Utterance:
        """Flush the STT and ``take`` the utterance. Raises ``BackendUnavailable``."""
        self._flushed.clear()
        await self._stream.flush()
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                await self._flushed.wait()
        except TimeoutError:
            raise BackendUnavailable(
                f"the speech-to-text did not finish transcribing within {COMMIT_TIMEOUT:g} s; "
                f"it may be overloaded") from None
        if self._failure is not None:
            raise self._failure
        return self.take()

    @property
    def transcript(self) -> str:
        """The current utterance's words so far."""
        return " ".join(self._words)

    def take(self) -> Utterance:
        """The current utterance; the next one starts."""
        taken = Utterance(self.item_id, self.transcript,
                          round(self._samples / SAMPLE_RATE, 3))
        self.item_id, self._words, self._samples = events.new_id("item"), [], 0
        return taken

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._stream.close()

    async def _read(self) -> None:
        try:
            async for event in self._stream:
                match event:
                    case Word(text=text, start_time=start) if text:
                        if self.turns is not None and (action := self.turns.word(start)):
                            await self._on_turn(action, start)
                        delta = text if not self._words else " " + text
                        self._words.append(text)
                        await self._send(events.TranscriptionDelta(
                            item_id=self.item_id, delta=delta, start_time=start))
                    case EndWord(stop_time=stop) if self.turns is not None:
                        if action := self.turns.words_ended(stop):
                            await self._on_turn(action, stop)
                    case Pause(probability=probability, time=time) if self.turns is not None:
                        if action := self.turns.pause(probability, time):
                            await self._on_turn(action, time)
                    case Flushed():
                        self._flushed.set()
        except BackendUnavailable as exc:
            self._failure = exc
        except Exception as exc:  # a defect: the session hears of it at the next append
            log.exception("reading the speech-to-text failed")
            self._failure = BackendUnavailable(
                f"reading the speech-to-text failed ({type(exc).__name__}); the server "
                f"logged why")
        finally:
            self._flushed.set()
