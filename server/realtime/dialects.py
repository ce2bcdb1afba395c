"""The three client families (DESIGN.md §2), and the edge that speaks to each.

    connect ── ?model= ──┬── OpenAI-Beta: realtime=v1 ──▶ BETA   (flat session fields)
                         └── otherwise ─────────────────▶ GA     (session.audio.* objects)
            ── no model ────────────────────────────────▶ UNMUTE (closed set of events)

    conversation events (beta names) ──Edge.out()──▶ the events this client is sent
        GA:     renamed (protocol.to_ga); Unmute's bookkeeping dropped
        BETA:   as they are; Unmute's bookkeeping dropped
        UNMUTE: only its closed set; a reply's text as whole words, each piece also as
                unmute.response.text.delta.ready; the transcript of a spoken reply as
                its text
    session.created / session.updated carry the settings, rendered for the dialect

The dialect is looked at here only: the conversation emits one model of events and
asks the dialect two things, ``greets`` (the character speaks first) and
``audio_format`` (the default of both directions). ``voice_source`` and ``voice_path``
(``server/conversation/voices.py``) are re-exported for ``/v1/voices``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from ..conversation import events
from ..conversation.events import Outgoing, ServerEvent, TextComplete
from ..conversation.settings import GA_FORMATS, SessionSettings

# Re-exported: /v1/voices and its tests show voices through the dialects.
from ..conversation.voices import voice_path as voice_path
from ..conversation.voices import voice_source as voice_source
from . import protocol


class Dialect(enum.Enum):
    GA = "ga"
    BETA = "beta"
    UNMUTE = "unmute"

    @property
    def greets(self) -> bool:
        """Unmute's character speaks first, after the first ``session.update``."""
        return self is Dialect.UNMUTE

    @property
    def audio_format(self) -> str:
        """The audio format of both directions until the client sets another."""
        return "opus" if self is Dialect.UNMUTE else "pcm16"


def detect(query: Mapping[str, str], headers: Mapping[str, str]) -> Dialect:
    if "model" not in query:
        return Dialect.UNMUTE
    if "realtime=v1" in headers.get("OpenAI-Beta", ""):
        return Dialect.BETA
    return Dialect.GA


_UNMUTE_ONLY_TYPES: frozenset[type[ServerEvent]] = frozenset({
    events.AdditionalOutputs, events.TextDeltaReady, events.AudioDeltaReady,
})
"""Unmute's bookkeeping extensions: they mean nothing to OpenAI's clients."""

_UNMUTE_TYPES: frozenset[type[ServerEvent]] = _UNMUTE_ONLY_TYPES | {
    events.Error, events.SessionUpdated, events.ResponseCreated, events.TextDelta,
    events.TextDone, events.AudioDelta, events.AudioDone, events.TranscriptionDelta,
    events.SpeechStarted, events.SpeechStopped, events.InterruptedByVad,
    events.CharactersReloaded, events.CharactersListed,
}
"""The closed union Unmute's client validates every event against, and ours."""

_UNMUTE_ONLY = frozenset(protocol.tag(event) for event in _UNMUTE_ONLY_TYPES)
_UNMUTE_EVENTS = frozenset(protocol.tag(event) for event in _UNMUTE_TYPES)


def accepts(dialect: Dialect, event_type: str) -> bool:
    """Whether a client of ``dialect`` may be sent an event of ``event_type``: Unmute's
    client validates every event against a closed union and breaks on others; its
    bookkeeping extensions mean nothing to OpenAI's clients."""
    if dialect is Dialect.UNMUTE:
        return event_type in _UNMUTE_EVENTS
    return event_type not in _UNMUTE_ONLY


class Edge:
    """One connection's view of the conversation's events: ``out`` turns each into
    what this client is sent (none, one, or a few), in order."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._words = Words()
        """Unmute's: the reply's text not yet a whole word."""

    def out(self, event: Outgoing) -> list[ServerEvent]:
        match event:  # the few the edge completes; audio deltas go straight past
            case TextComplete(response_id=response_id, item_id=item_id):
                return self._words_of(response_id, item_id, None)
            case events.SessionCreated(session=SessionSettings() as settings):
                event = events.SessionCreated(
                    event_id=event.event_id, session=render(self.dialect, settings),
                    resume_token=event.resume_token, resumed_from=event.resumed_from)
            case events.SessionUpdated(session=SessionSettings() as settings):
                event = events.SessionUpdated(
                    event_id=event.event_id, session=render(self.dialect, settings),
                    resume_token=event.resume_token)
            case events.ResponseCreated() | events.ResponseDone():
                self._words.flush()  # a cancelled reply's last piece is not the next's
        if self.dialect is Dialect.UNMUTE:
            return self._unmute(event)
        if self.dialect is Dialect.GA:
            event = protocol.to_ga(event)
        return [] if type(event) in _UNMUTE_ONLY_TYPES else [event]

    def _unmute(self, event: ServerEvent) -> list[ServerEvent]:
        match event:
            case events.TextDelta() | events.AudioTranscriptDelta():
                return [events.TextDeltaReady(delta=event.delta),
                        *self._words_of(event.response_id, event.item_id, event.delta)]
            case events.AudioTranscriptDone():
                return [events.TextDone(response_id=event.response_id,
                                        item_id=event.item_id, text=event.transcript)]
        return [event] if type(event) in _UNMUTE_TYPES else []

    def _words_of(self, response_id: str, item_id: str,
                  piece: str | None) -> list[ServerEvent]:
        """Unmute's clients show each ``response.text.delta`` as one word (``Words``):
        the words ``piece`` completes, or with ``None`` the last one."""
        if self.dialect is not Dialect.UNMUTE:
            return []
        words = self._words.feed(piece) if piece is not None else self._words.flush()
        return [events.TextDelta(response_id=response_id, item_id=item_id, delta=word)
                for word in words]


class Words:
    """The model's text cut into whole words, for Unmute's clients: they show each
    ``response.text.delta`` as one word and put the spaces between them (Unmute sends
    the words its TTS speaks), so a piece such as ``" d"`` then ``"ont"`` would read
    "d ont". ``feed`` returns the words a piece completes; ``flush``, the last one."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, piece: str) -> list[str]:
        *done, self._pending = _SPACE.split(self._pending + piece)
        return [word for word in done if word]

    def flush(self) -> list[str]:
        word, self._pending = self._pending, ""
        return [word] if word else []


_SPACE = re.compile(r"\s+")


def render(dialect: Dialect, settings: SessionSettings) -> dict[str, Any]:
    """The ``session`` object of ``session.created`` / ``session.updated``."""
    if dialect is Dialect.UNMUTE:
        return {
            "voice": settings.voice,
            "instructions": settings.instructions,
            "allow_recording": settings.allow_recording,
        }
    common = {
        "id": settings.session_id,
        "object": "realtime.session",
        "model": settings.model,
        "instructions": settings.instructions if isinstance(settings.instructions, str) else "",
        "tools": settings.tools,
        "tool_choice": "auto",
    }
    if dialect is Dialect.BETA:
        # The beta SDK validates ``model`` against OpenAI's own model names; the name
        # a client passed us in ``?model=`` is not one, so the beta session omits it.
        return common | {
            "model": None,
            "modalities": settings.modalities,
            "voice": settings.voice,
            "input_audio_format": settings.input_audio_format,
            "output_audio_format": settings.output_audio_format,
            "turn_detection": settings.turn_detection,
            "temperature": settings.temperature,
            "input_audio_transcription": None,
            "max_response_output_tokens": "inf",
        }
    return common | {
        "type": "realtime",
        "output_modalities": settings.modalities,
        "audio": {
            "input": {
                "format": _ga_format(settings.input_audio_format),
                "turn_detection": settings.turn_detection,
            },
            "output": {
                "format": _ga_format(settings.output_audio_format),
                "voice": settings.voice,
            },
        },
        "max_output_tokens": "inf",
    }


def _ga_format(name: str) -> dict[str, Any]:
    shape: dict[str, Any] = {"type": GA_FORMATS[name]}
    if name == "pcm16":
        shape["rate"] = 24000
    return shape
