"""Messages between the server (host) and a sandbox child, and their framing.

    host (asyncio)                                   child (blocking)
    ──────────────                                   ────────────────
    encode_request(Load) ──▶ [u32 length][msgpack] ──▶ read_frame → decode_request
    decode_reply(frame)  ◀── [u32 length][msgpack] ◀── write_frame(encode_reply(...))

Requests and replies are msgspec Structs in two tagged unions; nothing on this
channel is pickled. The child is untrusted, so the host decodes replies with a typed
decoder and refuses frames larger than ``MAX_FRAME``.
"""

from __future__ import annotations

import os
import struct
from typing import Annotated, Any

import msgspec

MAX_FRAME = 8 * 1024 * 1024
"""Largest frame either side accepts; a bigger one is a protocol violation."""

# What a reply may hold is bounded by its type as well as by its size: a frame of
# 8 MiB of empty maps would decode into 8 million dicts on the host (the red team's
# "small replies become huge" attack), so replies carry no ``Any`` and every list or
# map has a maximum length. Tools, whose JSON schemas nest freely, travel as JSON text
# (``MAX_TOOLS_JSON``) that the host decodes only when a reply needs them.
Scalar = str | int | float | bool | None
_Flat = Annotated[dict[str, Scalar], msgspec.Meta(max_length=32)]
VoiceSource = Annotated[dict[str, Scalar | _Flat], msgspec.Meta(max_length=32)]
"""A ``VOICE_SOURCE``: at most 32 keys of scalars or flat maps (Unmute's freesound
source nests one, ``sound_instance``)."""
_MANY = msgspec.Meta(max_length=1000)
MAX_TOOLS_JSON = 256 * 1024

_HEADER = struct.Struct("!I")


class Message(msgspec.Struct, tag=True, tag_field="kind", omit_defaults=True):
    """Base of every message: tagged by class name in the ``kind`` field."""


# ── requests (host → child) ──────────────────────────────────────────────────


class CodeBlob(msgspec.Struct, array_like=True):
    """One file compiled by a clean child: ``marshal`` bytes of its code object, valid
    while the file's ``stamp`` (st_dev, st_ino, st_mtime_ns, st_size) is unchanged."""

    file: str
    stamp: tuple[int, int, int, int]
    code: bytes


class Load(Message):
    """Import ``directory`` as the package ``characters`` and load its files.

    Files named in ``exclude`` are skipped (the host already knows they break the
    child); ``code`` holds compiled files the host has cached, used when their stamp
    still matches. The child compiles the rest, sends them in ``Compiled`` before it
    runs any character code, then sends ``Progress`` before each file, then ``Loaded``.
    """

    id: int
    directory: str
    exclude: list[str] = []
    max_characters: int = 100
    code: list[CodeBlob] = []


class ListCharacters(Message):
    id: int


class SystemPrompt(Message):
    id: int
    name: str


class GetTools(Message):
    id: int
    name: str


class CallTool(Message):
    id: int
    name: str
    tool: str
    arguments: dict[str, Any] = {}


class Ping(Message):
    id: int


Request = Load | ListCharacters | SystemPrompt | GetTools | CallTool | Ping


# ── replies (child → host) ───────────────────────────────────────────────────


class CharacterInfo(msgspec.Struct, omit_defaults=False):
    """What the host needs to know about one loaded character."""

    name: str
    file: str
    voice_source: VoiceSource
    good: bool | None = None
    comment: str | None = None
    tool_names: Annotated[list[str], msgspec.Meta(max_length=128)] = []


class FileError(msgspec.Struct):
    file: str
    error_type: str
    message: str


class Progress(Message):
    """Sent before the child compiles or runs ``file``: if it dies or hangs, ``file``
    did it. ``running`` is False while compiling (no character code has run yet)."""

    id: int
    file: str
    running: bool = True


class Compiled(Message):
    """Files compiled for a ``Load``, sent before any character code runs, so the host
    may cache them for any later load of the same files."""

    id: int
    blobs: Annotated[list[CodeBlob], _MANY]


class Loaded(Message):
    id: int
    directory: str
    total_files: int
    characters: Annotated[list[CharacterInfo], _MANY]
    errors: Annotated[list[FileError], _MANY]
    output: str = ""


class Listed(Message):
    id: int
    characters: Annotated[list[CharacterInfo], _MANY]


class Prompt(Message):
    id: int
    text: str
    output: str = ""


class Tools(Message):
    """``tools``: the character's TOOLS as JSON text (see ``MAX_TOOLS_JSON``)."""

    id: int
    tools: Annotated[str, msgspec.Meta(max_length=MAX_TOOLS_JSON)]


class ToolResult(Message):
    id: int
    result: str
    output: str = ""


class Pong(Message):
    """``pid`` is the child's own view (1, in its PID namespace); the first Pong also
    lists the protections it got (``containment.ALL_PROTECTIONS``)."""

    id: int
    pid: int
    protections: Annotated[list[str], msgspec.Meta(max_length=32)] = []


class Failed(Message):
    """A request the child could not serve; ``error_type`` names the failure."""

    id: int
    error_type: str
    message: str
    traceback: str = ""
    output: str = ""


Reply = Progress | Compiled | Loaded | Listed | Prompt | Tools | ToolResult | Pong | Failed


def is_final(reply: Reply) -> bool:
    """Whether ``reply`` ends its request (a Load also sends Progress and Compiled)."""
    return not isinstance(reply, Progress | Compiled)


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(message: Message) -> bytes:
    """Encode ``message`` as one frame: a 4-byte big-endian length, then msgpack."""
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


def decode_request(payload: bytes) -> Request:
    request: Request = _request_decoder.decode(payload)
    return request


def decode_reply(payload: bytes) -> Reply:
    reply: Reply = _reply_decoder.decode(payload)
    return reply


class FrameTooLarge(ValueError):
    """The peer announced a frame larger than ``MAX_FRAME``."""


class FrameBuffer:
    """Accumulates bytes read from a non-blocking pipe and cuts them into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every complete frame payload. Raises ``FrameTooLarge``."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_HEADER.size : end]))
            del self._buffer[:end]
        return frames


def read_frame(fd: int) -> bytes | None:
    """Blocking read of one frame from ``fd`` (child side); ``None`` at end of file."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds {MAX_FRAME}")
    payload = _read_exactly(fd, length)
    if payload is None:
        return None
    return payload


def write_frame(fd: int, message: Message) -> None:
    """Blocking write of ``message`` as one frame to ``fd`` (child side)."""
    view = memoryview(encode(message))
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
