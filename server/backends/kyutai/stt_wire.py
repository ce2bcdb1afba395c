"""Kyutai STT's messages: moshi-server's ``/api/asr-streaming``, as msgspec Structs.

    client ──▶ Audio{pcm} · Marker{id}
    server ◀── Ready · Word{text, start_time} · EndWord{stop_time}
               · Step{step_idx, prs, buffered_pcm} · Marker{id} · Error{message}

All messages are msgpack maps tagged by ``type`` (moshi-server's serde
``#[serde(tag = "type")]`` enums ``InMsg``/``OutMsg`` in ``rust/moshi-server/src/asr.rs``).
Audio goes out as float32, as Unmute sends it (``use_single_float``): half the bytes
of msgspec's float64.
"""

from __future__ import annotations

import msgspec

from ...audio.pcm import SAMPLE_RATE, Samples
from .float32 import float32_array

FRAME_SAMPLES = 1920
FRAME_SEC = FRAME_SAMPLES / SAMPLE_RATE
ASR_PATH = "/api/asr-streaming"


class _Message(msgspec.Struct, tag=True, tag_field="type"):
    """A msgpack map whose ``type`` is the class name."""


class Audio(_Message):
    pcm: list[float]
    """Mono float samples at 24 kHz; moshi-server cuts them into 1920-sample frames."""


class Marker(_Message):
    """Sent by the client; echoed once the audio before it has been transcribed."""

    id: int


class Ready(_Message):
    pass


class WordMessage(_Message, tag="Word"):
    text: str
    start_time: float
    """Seconds into the stream's audio."""


class EndWordMessage(_Message, tag="EndWord"):
    stop_time: float


class Step(_Message):
    step_idx: int
    prs: list[float]
    """Pause probabilities, one per prediction head (four for ``stt-1b-en_fr``)."""
    buffered_pcm: int = 0
    """Samples the server holds that do not yet fill a frame."""


class Error(_Message):
    message: str


ClientMessage = Audio | Marker
ServerMessage = Ready | WordMessage | EndWordMessage | Step | Marker | Error

_encoder = msgspec.msgpack.Encoder()
_server_messages = msgspec.msgpack.Decoder(ServerMessage)


class _Float32Audio(_Message, tag="Audio"):
    pcm: msgspec.Raw
    """A msgpack array of float32, built by ``float32_array``."""


def encode(message: ClientMessage) -> bytes:
    return _encoder.encode(message)


def encode_audio(frame: Samples) -> bytes:
    """``Audio{pcm}`` with the samples as msgpack float32."""
    return _encoder.encode(_Float32Audio(msgspec.Raw(float32_array(frame))))


def decode(frame: bytes) -> ServerMessage:
    """Raises ``msgspec.DecodeError`` on a frame outside the protocol."""
    return _server_messages.decode(frame)
