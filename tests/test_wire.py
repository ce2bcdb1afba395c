"""The sandbox wire format: every message round-trips; framing survives any split."""

from __future__ import annotations

import os

import msgspec
import pytest

from sandbox import wire

INFO = wire.CharacterInfo(name="Ada", file="ada.py", voice_source={"source_type": "file"},
                          good=True, comment=None, tool_names=["count"])
REQUESTS = [
    wire.Load(id=1, directory="/d", exclude=["x.py"], max_characters=5),
    wire.ListCharacters(id=2),
    wire.SystemPrompt(id=3, name="Ada"),
    wire.GetTools(id=4, name="Ada"),
    wire.CallTool(id=5, name="Ada", tool="count", arguments={"step": 2, "nested": [1, "a"]}),
    wire.Ping(id=6),
]
REPLIES = [
    wire.Progress(id=1, file="ada.py"),
    wire.Loaded(id=1, directory="/d", total_files=2, characters=[INFO],
                errors=[wire.FileError("b.py", "SyntaxError", "line 1")], output="hi"),
    wire.Listed(id=2, characters=[INFO]),
    wire.Prompt(id=3, text="You are Ada."),
    wire.Tools(id=4, tools=[{"type": "function", "function": {"name": "count"}}]),
    wire.ToolResult(id=5, result="2"),
    wire.Pong(id=6, pid=123),
    wire.Failed(id=7, error_type="KeyError", message="m", traceback="tb"),
]


def payload(frame: bytes) -> bytes:
    return frame[4:]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_requests_round_trip(message: wire.Message) -> None:
    assert wire.decode_request(payload(wire.encode(message))) == message


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_replies_round_trip(message: wire.Message) -> None:
    assert wire.decode_reply(payload(wire.encode(message))) == message


def test_frames_are_cut_correctly_whatever_the_read_sizes() -> None:
    stream = b"".join(wire.encode(m) for m in REPLIES)
    for chunk in (1, 3, 7, 64, len(stream)):
        buffer, frames = wire.FrameBuffer(), []
        for start in range(0, len(stream), chunk):
            frames += buffer.feed(stream[start:start + chunk])
        assert [wire.decode_reply(f) for f in frames] == REPLIES


def test_oversized_frame_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(wire.FrameTooLarge):
        wire.FrameBuffer().feed((wire.MAX_FRAME + 1).to_bytes(4, "big") + b"x")


def test_a_request_is_not_a_reply() -> None:
    with pytest.raises(msgspec.ValidationError):
        wire.decode_reply(payload(wire.encode(wire.Ping(id=1))))


def test_blocking_helpers_over_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        wire.write_frame(write_fd, REQUESTS[4])
        os.close(write_fd)
        frame = wire.read_frame(read_fd)
        assert frame is not None and wire.decode_request(frame) == REQUESTS[4]
        assert wire.read_frame(read_fd) is None
    finally:
        os.close(read_fd)
