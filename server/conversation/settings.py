"""What a client configured for its session, whatever its dialect (DESIGN.md §2).

``SessionSettings.apply`` takes a ``session.update``'s fields in either OpenAI shape
(flat ``input_audio_format``, or GA's ``session.audio.*`` objects); the realtime edge
shows the settings back in the shape of the client's dialect (``dialects.render``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import TroupeError
from .events import AudioFormat, SessionFields

AUDIO_FORMATS = ("pcm16", "opus")
GA_FORMATS = {"pcm16": "audio/pcm", "opus": "audio/opus"}
"""The GA protocol's names of the formats (``session.audio.*.format.type``)."""
_FROM_GA = {value: key for key, value in GA_FORMATS.items()}


@dataclass
class SessionSettings:
    """What the client configured, dialect-neutral. Kept by the session's dialogue,
    apart from the connection (a resumed session takes it over)."""

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
            + " or ".join(AUDIO_FORMATS + tuple(GA_FORMATS.values())),
            param=param,
        )
    return name
