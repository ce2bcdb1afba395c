"""Kyutai TTS's messages: moshi-server's ``/api/tts_streaming``, as msgspec Structs.

    client ──▶ Text{text} · Eos
    server ◀── Ready · Text{text, start_s, stop_s} (here ``Word``) · Audio{pcm} · Error{message}

Every message is one binary frame holding a msgpack map tagged by ``type`` (serde's
``#[serde(tag = "type")]``); ``Audio``'s samples stay raw until ``float32.samples``
reads them.
"""

from __future__ import annotations

import msgspec

# moshi-server's TTS speaks 24 kHz mono float32 (Mimi's rate, ``SAMPLE_RATE``),
# 1920 samples a frame.
STREAMING_PATH = "/api/tts_streaming"


class _Message(msgspec.Struct, tag_field="type"):
    """A msgpack map whose ``type`` names the variant (serde's ``#[serde(tag = "type")]``)."""


class Text(_Message, tag="Text"):
    """Client → server: text to speak; the server splits it at spaces."""

    text: str


class Eos(_Message, tag="Eos"):
    """Client → server: no more text; the server closes once it has spoken it all."""


class Ready(_Message, tag="Ready"):
    """Server → client: a channel is ours, text may follow."""


class Word(_Message, tag="Text"):
    """Server → client: a word was spoken, with its place in the audio (seconds)."""

    text: str
    start_s: float
    stop_s: float


class Audio(_Message, tag="Audio"):
    """Server → client: the next float32 samples at 24 kHz (a msgpack array, read
    by ``float32.samples``)."""

    pcm: msgspec.Raw


class Error(_Message, tag="Error"):
    """Server → client: e.g. ``no free channels`` (every slot of its batch is busy)."""

    message: str


ClientMessage = Text | Eos
ServerMessage = Ready | Word | Audio | Error

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[ServerMessage] = msgspec.msgpack.Decoder(ServerMessage)


def encode(message: ClientMessage) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> ServerMessage:
    """Raises ``msgspec.DecodeError`` (a ``ValidationError`` too) on a frame this
    client does not know, e.g. ``OggOpus`` when a format other than ours was asked."""
    return _decoder.decode(frame)
