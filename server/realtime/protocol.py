"""The wire: client text frames in, server events out as JSON (DESIGN.md §2).

    client text frame ──decode_client()──▶ events.ClientEventUnion (session.update, …)
    events.ServerEvent ──to_ga() (GA dialect)──▶ encode() ──▶ JSON text frame

The event Structs are the conversation's model (``server/conversation/events.py``);
this module adds what only the wire needs: decoding with errors that say what to fix,
the GA protocol's names, and encoding. A field we know with the wrong type is an
``invalid_event`` error naming it, and so is JSON nested more than ``MAX_DEPTH`` deep
anywhere in a frame (decoding, and whatever later walks a free-form field such as
``tools``, recurses once a level). Dialect-specific shapes are built in ``dialects.py``.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import numpy as np

from ..conversation.events import (
    AudioDelta,
    AudioDone,
    AudioTranscriptDelta,
    AudioTranscriptDone,
    ClientEventUnion,
    ItemCreated,
    ResponseDone,
    TextDelta,
    TextDone,
)

# Re-exported: what the server and its tests name through the wire module.
from ..conversation.events import ServerEvent as ServerEvent
from ..conversation.events import new_id as new_id


def tag(event_type: type[msgspec.Struct]) -> str:
    """The ``type`` an event Struct is sent and received with."""
    name = event_type.__struct_config__.tag
    if not isinstance(name, str):
        raise TypeError(f"{event_type.__name__} is not a tagged event")
    return name


CLIENT_EVENT_TYPES = tuple(tag(event) for event in typing.get_args(ClientEventUnion))
"""Every client event type, in the order of the union."""



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


# ── the GA names ─────────────────────────────────────────────────────────────


class ItemAdded(ItemCreated, tag="conversation.item.added"):
    """GA name of ``conversation.item.created``."""

class OutputTextDelta(TextDelta, tag="response.output_text.delta"):
    """GA name of ``response.text.delta``."""

class OutputTextDone(TextDone, tag="response.output_text.done"):
    """GA name of ``response.text.done``."""

class OutputAudioDelta(AudioDelta, tag="response.output_audio.delta"):
    """GA name of ``response.audio.delta``."""

class OutputAudioDone(AudioDone, tag="response.output_audio.done"):
    """GA name of ``response.audio.done``."""

class OutputAudioTranscriptDelta(AudioTranscriptDelta,
                                 tag="response.output_audio_transcript.delta"):
    """GA name of ``response.audio_transcript.delta``."""

class OutputAudioTranscriptDone(AudioTranscriptDone, tag="response.output_audio_transcript.done"):
    """GA name of ``response.audio_transcript.done``."""


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
