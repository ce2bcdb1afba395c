"""The conversation's event model (DESIGN.md §2): msgspec Structs, tagged on ``type``.

    client events (session.update, input_audio_buffer.append, …) ─▶ Dialogue
    Dialogue, replies, listening ─▶ server events (beta names) ─▶ the realtime edge

One internal model, in the OpenAI beta protocol's names: the realtime edge
(``server/realtime``) decodes client frames into these, and renames, filters and adds
to the server events per dialect on their way out (GA names, Unmute's closed set).
The conversation package speaks only this model, so it needs nothing of the edge.
Client events ignore fields they do not know (OpenAI clients send many).
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from sandbox import FileError

from ..errors import TroupeError

# ── client → server ──────────────────────────────────────────────────────────


class ClientEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str | None = None


class AudioFormat(msgspec.Struct, kw_only=True):
    """GA format object: ``{"type": "audio/pcm", "rate": 24000}``."""

    type: str | None = None
    rate: int | None = None


class AudioInput(msgspec.Struct, kw_only=True):
    format: AudioFormat | str | None = None
    turn_detection: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET


class AudioOutput(msgspec.Struct, kw_only=True):
    format: AudioFormat | str | None = None
    voice: str | None = None


class AudioConfig(msgspec.Struct, kw_only=True):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class SessionFields(msgspec.Struct, kw_only=True):
    """The ``session`` of a ``session.update``: only what is sent is changed."""

    type: str | None = None
    voice: str | None = None
    instructions: str | dict[str, Any] | None = None
    allow_recording: bool | None = None
    modalities: list[str] | None = None
    output_modalities: list[str] | None = None
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    turn_detection: dict[str, Any] | None | msgspec.UnsetType = msgspec.UNSET
    temperature: float | None = None
    tools: list[dict[str, Any]] | None = None
    audio: AudioConfig | None = None


class SessionUpdate(ClientEvent, tag="session.update"):
    session: SessionFields = msgspec.field(default_factory=SessionFields)


class CharactersReload(ClientEvent, tag="session.characters.reload"):
    directory: str


class CharactersList(ClientEvent, tag="session.characters.list"):
    pass


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    transcript: str | None = None


class Item(msgspec.Struct, kw_only=True):
    """A conversation item as clients send it; only user text messages are taken."""

    type: str = "message"
    role: str = "user"
    id: str | None = None
    content: list[ContentPart] = []


class ItemCreate(ClientEvent, tag="conversation.item.create"):
    item: Item
    previous_item_id: str | None = None


class ResponseCreate(ClientEvent, tag="response.create"):
    response: dict[str, Any] | None = None


class ResponseCancel(ClientEvent, tag="response.cancel"):
    response_id: str | None = None


class AudioAppend(ClientEvent, tag="input_audio_buffer.append"):
    audio: str
    """Base64 audio in the session's input format."""


class AudioCommit(ClientEvent, tag="input_audio_buffer.commit"):
    pass


class AudioClear(ClientEvent, tag="input_audio_buffer.clear"):
    pass


ClientEventUnion = (
    SessionUpdate | CharactersReload | CharactersList | ItemCreate | ResponseCreate
    | ResponseCancel | AudioAppend | AudioCommit | AudioClear
)


# ── server → client ──────────────────────────────────────────────────────────


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(15)}"


class ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str = msgspec.field(default_factory=lambda: new_id("event"))


class ErrorDetails(msgspec.Struct, kw_only=True):
    type: str
    code: str
    message: str
    param: str | None = None
    details: Any = None
    event_id: str | None = None
    """The client event this error answers, when it had one (as OpenAI does)."""


class Error(ServerEvent, tag="error"):
    error: ErrorDetails


def error(exc: TroupeError, event_id: str | None = None) -> Error:
    """The ``error`` event telling the client of ``exc``; ``event_id``: the client
    event it answers."""
    return Error(error=ErrorDetails(
        type=exc.error_type, code=exc.code, message=exc.message, param=exc.param,
        details=exc.details, event_id=event_id,
    ))


class SessionCreated(ServerEvent, tag="session.created"):
    session: Any
    """The conversation puts its ``SessionSettings`` here; the edge renders them in the
    shape of the client's dialect."""
    resume_token: str | msgspec.UnsetType = msgspec.UNSET
    """Ours (README "Resume"): reconnect with ``?resume=`` to carry on."""
    resumed_from: str | msgspec.UnsetType = msgspec.UNSET
    """The id of the session this one carries on."""


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: Any
    resume_token: str | msgspec.UnsetType = msgspec.UNSET


class CharacterSummary(msgspec.Struct):
    name: str
    good: bool | None
    comment: str | None


LoadError = FileError
"""A file a load skipped, exactly as the sandbox reported it: ``file``, ``error_type``,
``message``."""


class CharactersReloaded(ServerEvent, tag="session.characters.reloaded"):
    directory: str
    loaded_count: int
    error_count: int
    total_files: int
    characters: list[CharacterSummary]
    errors: list[LoadError]
    duration_ms: float


class CharactersListed(ServerEvent, tag="session.characters.listed"):
    directory: str
    character_count: int
    characters: list[CharacterSummary]


class MessageItem(msgspec.Struct, kw_only=True):
    """A conversation item as the server reports it (text only for now)."""

    id: str
    role: str
    content: list[dict[str, Any]]
    type: str = "message"
    object: str = "realtime.item"
    status: str = "completed"


class ItemCreated(ServerEvent, tag="conversation.item.created"):
    previous_item_id: str | None
    item: MessageItem



class ResponseInfo(msgspec.Struct, kw_only=True):
    id: str
    status: str
    voice: str
    """Unmute's clients require it: the character speaking."""
    output: list[MessageItem] = []
    object: str = "realtime.response"
    status_details: dict[str, Any] | None = None


class ResponseCreated(ServerEvent, tag="response.created"):
    response: ResponseInfo


class ResponseDone(ServerEvent, tag="response.done"):
    response: ResponseInfo


class TextDelta(ServerEvent, tag="response.text.delta"):
    response_id: str
    item_id: str
    delta: str
    output_index: int = 0
    content_index: int = 0



class TextDone(ServerEvent, tag="response.text.done"):
    response_id: str
    item_id: str
    text: str
    output_index: int = 0
    content_index: int = 0



class TranscriptionDelta(ServerEvent, tag="conversation.item.input_audio_transcription.delta"):
    """Words of the person's speech as the STT hears them (``start_time``: seconds
    into the session's audio, Unmute's extension)."""

    item_id: str
    delta: str
    start_time: float
    content_index: int = 0


class TranscriptionCompleted(
    ServerEvent, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    transcript: str
    usage: dict[str, Any]
    """What OpenAI bills the transcription by; here ``{"type": "duration", "seconds"}``
    of audio heard (both SDK clients require the field)."""
    content_index: int = 0


class AudioCommitted(ServerEvent, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None


class AudioCleared(ServerEvent, tag="input_audio_buffer.cleared"):
    pass


class SpeechStarted(ServerEvent, tag="input_audio_buffer.speech_started"):
    item_id: str
    audio_start_ms: int


class SpeechStopped(ServerEvent, tag="input_audio_buffer.speech_stopped"):
    item_id: str
    audio_end_ms: int


class InterruptedByVad(ServerEvent, tag="unmute.interrupted_by_vad"):
    """Unmute's extension: the person's speech interrupted the reply."""


class AudioDelta(ServerEvent, tag="response.audio.delta"):
    """Base64 audio in the session's output format (pcm16: 24 kHz mono int16 LE)."""

    response_id: str
    item_id: str
    delta: str
    output_index: int = 0
    content_index: int = 0



class AudioDone(ServerEvent, tag="response.audio.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0



class AudioTranscriptDelta(ServerEvent, tag="response.audio_transcript.delta"):
    """The OpenAI dialects' text of a spoken reply (instead of ``response.text.delta``)."""

    response_id: str
    item_id: str
    delta: str
    output_index: int = 0
    content_index: int = 0



class AudioTranscriptDone(ServerEvent, tag="response.audio_transcript.done"):
    response_id: str
    item_id: str
    transcript: str
    output_index: int = 0
    content_index: int = 0



class TextDeltaReady(ServerEvent, tag="unmute.response.text.delta.ready"):
    """Unmute's extension: text of the reply, as it is ready to be spoken."""

    delta: str


class AudioDeltaReady(ServerEvent, tag="unmute.response.audio.delta.ready"):
    """Unmute's extension: how many samples the next ``response.audio.delta`` holds."""

    number_of_samples: int


class AdditionalOutputs(ServerEvent, tag="unmute.additional_outputs"):
    """Unmute's extension: ``args`` holds the ``chat_history`` so far."""

    args: dict[str, Any]


class TextComplete(msgspec.Struct, kw_only=True):
    """Not an event: a reply's mark that its text is all written (its audio may still
    be playing). Unmute's edge sends the last whole word then; no dialect sees it."""

    response_id: str
    item_id: str


Outgoing = ServerEvent | TextComplete
"""What the conversation hands the edge."""
