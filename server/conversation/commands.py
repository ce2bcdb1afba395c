"""What the dialogue asks the session to do (``dialogue.py``), one command at a time.

Each command may answer: the session sends its result back into the steps that
yielded it (``Steps``). Those that answer say so; the others answer None.

    Send(event)                  the event to the client, through its dialect's edge
    Load(directory) ─▶ Loaded    a new set, swapped in      Prompt(name) ─▶ its prompt
    ListCharacters ─▶ the event  Warm(prompt)               StartReply(reply) ─▶ started?
    CancelReply ─▶ was there one  StopReply ─▶ a handle ─▶ AwaitReply(handle)   Part
    Hear(audio)  Commit ─▶ Utterance  ClearAudio  StopListening  Listen
    DraftReply(reply)  DropDraft                   (preemptive generation)
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from . import events
from .history import Conversation


@dataclass(frozen=True)
class Reply:
    """One reply of ``character``, to the history as it stands (the reply adds to it)."""

    number: int
    character: str
    system_prompt: str
    history: Conversation
    temperature: float
    spoken: bool
    """Audio is among the output modalities (spoken when a TTS is configured)."""
    voice_source: dict[str, Any]
    turn: bool
    """It answers the person's turn (or a silence): it starts only if the turn-taking
    still expects it (they may have gone on speaking meanwhile)."""


@dataclass(frozen=True)
class Send:
    event: events.Outgoing


@dataclass(frozen=True)
class Load:
    """Load ``directory`` into a new sandbox and swap it in; answers ``Loaded``."""

    directory: str


@dataclass(frozen=True)
class ListCharacters:
    """Ask the set's sandbox; answers the ``session.characters.listed`` event."""


@dataclass(frozen=True)
class Prompt:
    """Build ``character``'s system prompt in the sandbox; answers it."""

    character: str


@dataclass(frozen=True)
class Warm:
    """Let the model's backend prepare for ``system_prompt`` (a prefix cache)."""

    system_prompt: str


@dataclass(frozen=True)
class StartReply:
    """Start ``reply`` in the background; answers whether it started."""

    reply: Reply


@dataclass(frozen=True)
class DraftReply:
    """Start the model's completion for ``reply`` before the turn is certain; a reply
    started later with the same request uses it (``backends/drafts.py``)."""

    reply: Reply


@dataclass(frozen=True)
class DropDraft:
    """The person went on: stop the draft's completion."""


@dataclass(frozen=True)
class CancelReply:
    """Cancel the reply in progress and wait for its end (its ``response.done``);
    answers whether there was one."""


@dataclass(frozen=True)
class StopReply:
    """Cancel the reply in progress now, without waiting; answers a handle for
    ``AwaitReply`` (None: there was none)."""


@dataclass(frozen=True)
class AwaitReply:
    """Wait until the reply ``StopReply`` stopped has ended."""

    handle: object


@dataclass(frozen=True)
class Part:
    """Close the session normally (1000) once the client played what it had queued."""


@dataclass(frozen=True)
class Hear:
    """Send ``audio`` (base64, the session's input format) to the speech-to-text."""

    audio: str


@dataclass(frozen=True)
class Commit:
    """Finish the utterance heard so far (push-to-talk); answers the ``Utterance``."""


@dataclass(frozen=True)
class ClearAudio:
    """Drop the audio heard so far and its stream."""


@dataclass(frozen=True)
class StopListening:
    """Close the speech-to-text stream; the next audio opens one in the new mode."""


@dataclass(frozen=True)
class Listen:
    """The character does not answer this turn: the turn-taking listens again."""


Command = (Send | Load | ListCharacters | Prompt | Warm | StartReply | DraftReply
           | DropDraft | CancelReply | StopReply | AwaitReply | Part | Hear | Commit
           | ClearAudio | StopListening | Listen)
Steps = Generator[Command, Any, None]
"""Commands, each sent its result back in."""
