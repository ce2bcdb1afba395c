"""The person's side of a session: its audio, the speech-to-text stream, the turns.

    Hear(audio) ─▶ Hearing.append ─▶ [opens a Listening: STT stream + TurnTaking] ─▶ STT
       STT failed: said once, audio dropped for STT_RETRY s, then a new stream
       no STT configured: said once per buffer (until commit or clear)
    the STT reader ─▶ on_turn(action, at): SPEECH_STARTED / INTERRUPT at once,
       END_TURN / NUDGE / PAUSED / GOES_ON queued behind the client's events, then
       checked that they still hold (``holds``)
    Commit ─▶ the utterance so far;  ClearAudio / StopListening ─▶ the stream closes

One Ogg Opus decoder per session (its stream's header pages come once), kept across
the utterances and streams; one STT stream in turn-taking mode lasts as long as audio
comes, one per utterance in push-to-talk (``turn_detection: null``).
"""

from __future__ import annotations

import logging
import time

from ..audio.opus import OpusDecoder
from ..backends.errors import BackendUnavailable
from ..backends.speech import SpeechToText
from ..errors import ServerSideError, TroupeError
from .listening import Listening, OnTurn, Send, Utterance
from .settings import SessionSettings
from .turns import State, TurnTaking

log = logging.getLogger(__name__)

STT_RETRY = 2.0
"""Seconds after a speech-to-text failure before a new stream is tried."""


class Hearing:
    def __init__(self, stt: SpeechToText | None, send: Send, on_turn: OnTurn,
                 nudge_after: float | None, *, drafts: bool = False,
                 pause_hold: float | None = None) -> None:
        self.stt = stt
        self._drafts = drafts
        self._pause_hold = pause_hold
        """None: the STT's own."""
        self._send = send
        self._on_turn = on_turn
        self._nudge_after = nudge_after
        self.listening: Listening | None = None
        self._opus: OpusDecoder | None = None
        self._refused = False
        self._retry_at = 0.0

    @property
    def expects_reply(self) -> bool:
        """No turn-taking, or one that waits for the character (the person may have
        gone on speaking since it decided)."""
        turns = self.listening.turns if self.listening is not None else None
        return turns is None or turns.state is State.REPLYING

    def reply_started(self) -> None:
        """The character speaks: from now on the person's speech is a barge-in."""
        if self.listening is not None and self.listening.turns is not None:
            self.listening.turns.reply_started()

    def reply_ended(self) -> None:
        """The character stopped (or will not answer): a silence may call for it."""
        if self.listening is not None and self.listening.turns is not None:
            self.listening.turns.reply_ended()

    def holds(self, listening: Listening, *, state: State = State.REPLYING) -> bool:
        """Whether a queued ``END_TURN`` / ``NUDGE`` of ``listening`` still holds: the
        stream was not replaced or cleared meanwhile, and the person did not go on
        speaking (then the next end of turn has it all). A ``PAUSED`` / ``GOES_ON``
        holds while the person's turn (``State.HEARING``) goes on."""
        return (self.listening is listening and listening.turns is not None
                and listening.turns.state is state)

    async def append(self, audio: str, settings: SessionSettings, replying: bool) -> None:
        """Raises ``TroupeError`` for bad audio, ``ServerSideError`` once for an STT
        that is missing or failed."""
        if self.stt is None:
            # Said once per buffer, not for each of a microphone's 12 appends a second.
            if self._refused:
                return
            self._refused = True
            raise ServerSideError(
                "backend_unavailable",
                "no speech-to-text is configured; start the server with --stt, "
                "or send text with conversation.item.create (further audio is dropped "
                "until input_audio_buffer.commit or clear)",
            )
        if time.monotonic() < self._retry_at:
            return  # the failure was reported; audio is dropped until the retry
        opus = self._decoder(settings)
        if self.listening is not None and self.listening.audio_format != (
                "opus" if opus is not None else "pcm16"):
            await self.stop()  # the format changed: a new stream
        try:
            if self.listening is None:
                turns = TurnTaking(
                    pause_hold=(self.stt.pause_hold if self._pause_hold is None
                                else self._pause_hold),
                    speech_starts_turn=self.stt.speech_starts_turn,
                    nudge_after=self._nudge_after,
                    drafts=self._drafts,
                ) if settings.turn_detection is not None else None
                self.listening = await Listening.open(self.stt, self._send, turns,
                                                      self._on_turn, opus)
                if turns is not None and replying:
                    turns.reply_started()
            await self.listening.append(audio)
        except BackendUnavailable as exc:
            # Said once; the next audio after STT_RETRY seconds opens a new stream.
            await self.stop()
            self._retry_at = time.monotonic() + STT_RETRY
            raise ServerSideError(exc.code, f"{exc.message} (audio is dropped for "
                                            f"{STT_RETRY:g} s, then a new stream opens)") from None

    async def commit(self) -> Utterance:
        """The utterance heard so far. Raises ``TroupeError`` when there is none,
        ``BackendUnavailable`` when the STT failed."""
        self._refused = False
        listening = self.listening
        if listening is None:
            raise TroupeError("invalid_event", "the input audio buffer is empty; "
                              "send input_audio_buffer.append first")
        if listening.turns is not None:
            return await listening.commit()
        self.listening = None  # push-to-talk: one stream per utterance
        try:
            return await listening.commit()
        finally:
            await listening.close()

    async def clear(self) -> None:
        self._refused = False
        await self.stop()

    async def stop(self) -> None:
        listening, self.listening = self.listening, None
        if listening is not None:
            await listening.close()

    def _decoder(self, settings: SessionSettings) -> OpusDecoder | None:
        """The session's one Ogg Opus input stream, decoded across utterances."""
        if settings.input_audio_format != "opus":
            return None
        if self._opus is None:
            self._opus = OpusDecoder()
        return self._opus
