"""The three client families (DESIGN.md §2) and the session settings they see.

    connect ── ?model= ──┬── OpenAI-Beta: realtime=v1 ──▶ BETA   (flat session fields)
                         └── otherwise ─────────────────▶ GA     (session.audio.* objects)
            ── no model ────────────────────────────────▶ UNMUTE (closed set of events)

One ``SessionSettings`` holds what the client configured; ``render`` shows it in the
shape its dialect expects, and ``accepts`` says which server events it may receive.
``voice_source`` shows a character's ``VOICE_SOURCE`` in one of the two shapes Unmute's
clients accept (``/v1/voices``), and ``voice_path`` is the id they select it by.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import TroupeError
from .protocol import AudioFormat, SessionFields


class Dialect(enum.Enum):
    GA = "ga"
    BETA = "beta"
    UNMUTE = "unmute"


def detect(query: Mapping[str, str], headers: Mapping[str, str]) -> Dialect:
    if "model" not in query:
        return Dialect.UNMUTE
    if "realtime=v1" in headers.get("OpenAI-Beta", ""):
        return Dialect.BETA
    return Dialect.GA


_UNMUTE_EVENTS = frozenset({
    "error", "session.updated", "response.created", "response.text.delta",
    "response.text.done", "response.audio.delta", "response.audio.done",
    "conversation.item.input_audio_transcription.delta",
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
    "unmute.additional_outputs", "unmute.response.text.delta.ready",
    "unmute.response.audio.delta.ready", "unmute.interrupted_by_vad",
    "session.characters.reloaded", "session.characters.listed",
})


_UNMUTE_ONLY = frozenset({
    "unmute.additional_outputs", "unmute.response.text.delta.ready",
    "unmute.response.audio.delta.ready",
})


def accepts(dialect: Dialect, event_type: str) -> bool:
    """Whether a client of ``dialect`` may be sent an event of ``event_type``: Unmute's
    client validates every event against a closed union and breaks on others; its
    bookkeeping extensions mean nothing to OpenAI's clients."""
    if dialect is Dialect.UNMUTE:
        return event_type in _UNMUTE_EVENTS
    return event_type not in _UNMUTE_ONLY


AUDIO_FORMATS = ("pcm16", "opus")
_GA_FORMATS = {"pcm16": "audio/pcm", "opus": "audio/opus"}
_FROM_GA = {value: key for key, value in _GA_FORMATS.items()}


@dataclass
class SessionSettings:
    """What the client configured, dialect-neutral."""

    session_id: str
    model: str | None
    voice: str | None = None
    instructions: str | dict[str, Any] | None = None
    allow_recording: bool = False
    modalities: list[str] = field(default_factory=lambda: ["text", "audio"])
    input_audio_format: str = "pcm16"
    output_audio_format: str = "pcm16"
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: {"type": "server_vad"}
    )
    temperature: float = 0.8
    tools: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def initial(cls, session_id: str, dialect: Dialect, model: str | None) -> SessionSettings:
        audio = "opus" if dialect is Dialect.UNMUTE else "pcm16"
        return cls(session_id, model, input_audio_format=audio, output_audio_format=audio)

    def requested_voice(self, update: SessionFields) -> str | None:
        if update.voice is not None:
            return update.voice
        if update.audio is not None and update.audio.output is not None:
            return update.audio.output.voice
        return None

    def apply(self, update: SessionFields) -> None:
        """Take every field ``update`` sets, except ``voice`` (the session checks it
        against its characters first). Raises ``TroupeError`` before changing anything."""
        input_format = _format(update.input_audio_format, "session.input_audio_format")
        output_format = _format(update.output_audio_format, "session.output_audio_format")
        turn_detection = update.turn_detection
        if update.audio is not None:
            if update.audio.input is not None:
                given = _format(update.audio.input.format, "session.audio.input.format")
                input_format = given or input_format
                if update.audio.input.turn_detection is not msgspec.UNSET:
                    turn_detection = update.audio.input.turn_detection
            if update.audio.output is not None:
                given = _format(update.audio.output.format, "session.audio.output.format")
                output_format = given or output_format
        if update.instructions is not None:
            self.instructions = update.instructions
        if update.allow_recording is not None:
            self.allow_recording = update.allow_recording
        modalities = update.output_modalities or update.modalities
        if modalities is not None:
            self.modalities = modalities
        if input_format is not None:
            self.input_audio_format = input_format
        if output_format is not None:
            self.output_audio_format = output_format
        if turn_detection is not msgspec.UNSET:
            self.turn_detection = turn_detection
        if update.temperature is not None:
            self.temperature = update.temperature
        if update.tools is not None:
            self.tools = update.tools


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


def voice_path(name: str, source: Mapping[str, Any]) -> str:
    """The ``path_on_server`` Unmute's clients know the character ``name`` by, and send
    back as ``voice`` to select it: a file or freesound source's own path (the TTS
    speaks from it), else ``<source_type>/<voice>/<name>`` (``piper/en_US-joe-medium/
    Bramble``), which names the character because characters share piper voices."""
    path = source.get("path_on_server")
    if source.get("source_type") in ("file", "freesound") and isinstance(path, str) and path:
        return path
    kind, voice = source.get("source_type"), source.get("voice")
    parts = [str(kind), *([str(voice)] if isinstance(voice, str) and voice else []), name]
    return "/".join(parts)


_FREESOUND_INSTANCE = {"id": int, "name": str, "username": str, "license": str}


def voice_source(name: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """``source`` as Unmute's clients accept it (DESIGN.md §6): its freesound shape when
    ``source`` has all of it (the frontend credits ``sound_instance.username``), else a
    ``file`` source at ``voice_path``, keeping the description. Unmute's models forbid
    extra fields, so only theirs are copied; the character keeps its own source for
    the TTS."""
    path = voice_path(name, source)
    instance = source.get("sound_instance")
    if (source.get("source_type") == "freesound" and isinstance(source.get("url"), str)
            and isinstance(instance, Mapping)
            and all(type(instance.get(key)) is kind for key, kind in _FREESOUND_INSTANCE.items())):
        shown: dict[str, Any] = {
            "source_type": "freesound", "url": source["url"], "path_on_server": path,
            "sound_instance": {key: instance[key] for key in _FREESOUND_INSTANCE},
        }
        start = source.get("start_time")
        if type(start) is int:
            shown["start_time"] = start
        return shown
    shown = {"source_type": "file", "path_on_server": path}
    for key in ("description", "description_link"):
        if isinstance(source.get(key), str):
            shown[key] = source[key]
    if "description_link" not in shown and isinstance(source.get("url"), str):
        shown["description_link"] = source["url"]  # a freesound without its credits
    return shown


def _ga_format(name: str) -> dict[str, Any]:
    shape: dict[str, Any] = {"type": _GA_FORMATS[name]}
    if name == "pcm16":
        shape["rate"] = 24000
    return shape


def _format(value: AudioFormat | str | None, param: str) -> str | None:
    if value is None:
        return None
    name = _FROM_GA.get(value.type or "") if isinstance(value, AudioFormat) else value
    if isinstance(value, AudioFormat) and value.rate not in (None, 24000):
        raise TroupeError(
            "invalid_event", f"{param}: only 24000 Hz is supported, not {value.rate}", param=param
        )
    if name not in AUDIO_FORMATS:
        shown = value.type if isinstance(value, AudioFormat) else value
        raise TroupeError(
            "invalid_event",
            f"{param}: unsupported audio format {shown!r}; use "
            + " or ".join(AUDIO_FORMATS + tuple(_GA_FORMATS.values())),
            param=param,
        )
    return name
