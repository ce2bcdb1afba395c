"""The WebSocket event schema (DESIGN.md §2): msgspec Structs, tagged on ``type``.

    client text frame ──decode_client()──▶ ClientEvent (session.update, …)
    ServerEvent ──encode()──▶ JSON text frame

Client events ignore fields they do not know (OpenAI clients send many); a field we
do know with the wrong type is an ``invalid_event`` error naming it, and so is JSON
nested more than ``MAX_DEPTH`` deep anywhere in a frame (decoding, and whatever
later walks a free-form field such as ``tools``, recurses once a level).
Dialect-specific shapes (the ``session`` object) are built in ``dialects.py``.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import numpy as np

from sandbox import FileError

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
CLIENT_EVENT_TYPES = (
    "session.update", "session.characters.reload", "session.characters.list",
    "conversation.item.create", "response.create", "response.cancel",
    "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
)


class _Header(msgspec.Struct):
    """Just enough of an event to explain why the full decode failed."""

    type: Any = None
    event_id: Any = None


_client_decoder = msgspec.json.Decoder(ClientEventUnion)
_header_decoder = msgspec.json.Decoder(_Header)

MAX_DEPTH = 64
"""Objects and arrays a client frame may nest, the event itself counted (an OpenAI
tool's JSON schema takes two a level). Deeper is refused before decoding: msgspec
raises ``RecursionError`` near 1 000, and code that walks a free-form field later
(rendering ``session.tools``) would fail far sooner, deep in the stack."""


class InvalidEvent(ValueError):
    """A client frame that is not a valid event; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, event_id: str | None = None):
        super().__init__(message)
        self.param = param
        self.event_id = event_id


def decode_client(data: str | bytes) -> ClientEventUnion:
    """Decode one client frame. Raises ``InvalidEvent`` with a message that says what
    to fix."""
    if _nesting(data) > MAX_DEPTH:
        raise InvalidEvent(f"the frame nests objects and arrays more than {MAX_DEPTH} deep; "
                           "send flatter JSON")
    try:
        event: ClientEventUnion = _client_decoder.decode(data)
        return event
    except msgspec.DecodeError as exc:
        error = exc
    try:
        header = _header_decoder.decode(data)
    except msgspec.DecodeError:
        raise InvalidEvent(f"the frame is not a JSON object: {error}") from None
    event_id = header.event_id if isinstance(header.event_id, str) else None
    if not isinstance(header.type, str):
        raise InvalidEvent("every event needs a string 'type'", "type", event_id)
    if header.type not in CLIENT_EVENT_TYPES:
        raise InvalidEvent(
            f"unknown event type {header.type!r}; this server accepts "
            + ", ".join(CLIENT_EVENT_TYPES),
            "type",
            event_id,
        )
    message = str(error)
    param = message.rpartition("`$.")[2].rstrip("`") if "`$." in message else None
    raise InvalidEvent(f"invalid {header.type}: {message}", param, event_id) from None


def _nesting(data: str | bytes) -> int:
    """How deeply the JSON ``data`` nests objects and arrays (an upper bound when it
    is not JSON). Counted on the text before any decoder recurses into it, in a few
    passes of C: escaped backslashes and quotes go, then numpy counts the brackets
    outside strings (after an even number of quotes)."""
    opening = (data.count("[") + data.count("{") if isinstance(data, str)
               else data.count(b"[") + data.count(b"{"))
    if opening <= MAX_DEPTH:
        return opening  # audio appends (base64 has no brackets) stop here
    text = data.encode() if isinstance(data, str) else data
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    chars = np.frombuffer(text, dtype=np.uint8)
    outside = (np.cumsum(chars == ord('"'), dtype=np.int32) & 1) == 0
    steps = np.where(outside, _BRACKET_STEP[chars], 0).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[list(b"[{")] = 1
_BRACKET_STEP[list(b"]}")] = -1


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


class SessionCreated(ServerEvent, tag="session.created"):
    session: Any


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: Any


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


class ItemAdded(ItemCreated, tag="conversation.item.added"):
    """GA name of ``conversation.item.created``."""


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


class OutputTextDelta(TextDelta, tag="response.output_text.delta"):
    """GA name of ``response.text.delta``."""


class TextDone(ServerEvent, tag="response.text.done"):
    response_id: str
    item_id: str
    text: str
    output_index: int = 0
    content_index: int = 0


class OutputTextDone(TextDone, tag="response.output_text.done"):
    """GA name of ``response.text.done``."""


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


class OutputAudioDelta(AudioDelta, tag="response.output_audio.delta"):
    """GA name of ``response.audio.delta``."""


class AudioDone(ServerEvent, tag="response.audio.done"):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class OutputAudioDone(AudioDone, tag="response.output_audio.done"):
    """GA name of ``response.audio.done``."""


class AudioTranscriptDelta(ServerEvent, tag="response.audio_transcript.delta"):
    """The OpenAI dialects' text of a spoken reply (instead of ``response.text.delta``)."""

    response_id: str
    item_id: str
    delta: str
    output_index: int = 0
    content_index: int = 0


class OutputAudioTranscriptDelta(AudioTranscriptDelta,
                                 tag="response.output_audio_transcript.delta"):
    """GA name of ``response.audio_transcript.delta``."""


class AudioTranscriptDone(ServerEvent, tag="response.audio_transcript.done"):
    response_id: str
    item_id: str
    transcript: str
    output_index: int = 0
    content_index: int = 0


class OutputAudioTranscriptDone(AudioTranscriptDone, tag="response.output_audio_transcript.done"):
    """GA name of ``response.audio_transcript.done``."""


class TextDeltaReady(ServerEvent, tag="unmute.response.text.delta.ready"):
    """Unmute's extension: text of the reply, as it is ready to be spoken."""

    delta: str


class AudioDeltaReady(ServerEvent, tag="unmute.response.audio.delta.ready"):
    """Unmute's extension: how many samples the next ``response.audio.delta`` holds."""

    number_of_samples: int


class AdditionalOutputs(ServerEvent, tag="unmute.additional_outputs"):
    """Unmute's extension: ``args`` holds the ``chat_history`` so far."""

    args: dict[str, Any]


_GA_NAMES: dict[type[ServerEvent], type[ServerEvent]] = {
    ItemCreated: ItemAdded,
    TextDelta: OutputTextDelta,
    TextDone: OutputTextDone,
    AudioDelta: OutputAudioDelta,
    AudioDone: OutputAudioDone,
    AudioTranscriptDelta: OutputAudioTranscriptDelta,
    AudioTranscriptDone: OutputAudioTranscriptDone,
}
_GA_CONTENT_TYPES = {"text": "output_text", "audio": "output_audio"}


def to_ga(event: ServerEvent) -> ServerEvent:
    """``event`` as the GA protocol names it: other event types for text and items,
    ``output_text`` / ``output_audio`` for the assistant's content parts."""
    if isinstance(event, ResponseDone):
        output = [
            msgspec.structs.replace(item, content=[
                {**part, "type": _GA_CONTENT_TYPES.get(part["type"], part["type"])}
                for part in item.content
            ])
            for item in event.response.output
        ]
        return msgspec.structs.replace(
            event, response=msgspec.structs.replace(event.response, output=output))
    ga_type = _GA_NAMES.get(type(event))
    if ga_type is None:
        return event
    return ga_type(**msgspec.structs.asdict(event))


_encoder = msgspec.json.Encoder()


def encode(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()
