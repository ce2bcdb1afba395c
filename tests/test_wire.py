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
    wire.Tools(id=4, tools='[{"type": "function", "function": {"name": "count"}}]'),
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


def _loaded_with(voice_source: object, tool_names: object = ()) -> bytes:
    info = {"name": "X", "file": "x.py", "voice_source": voice_source,
            "good": True, "comment": None, "tool_names": list(tool_names)}
    return msgspec.msgpack.encode({"kind": "Loaded", "id": 1, "directory": "/d",
                                   "total_files": 1, "characters": [info], "errors": []})


@pytest.mark.parametrize("voice_source, tool_names", [
    ({"source_type": "file", "pad": [{}] * 1000}, ()),  # a list of maps: amplification
    ({"source_type": "file", "deep": {"a": {"b": "c"}}}, ()),  # nested beyond one level
    ({f"k{i}": i for i in range(33)}, ()),  # too many keys
    ({"source_type": "file"}, [f"t{i}" for i in range(129)]),  # too many tool names
])
def test_a_reply_is_bounded_by_its_type_not_only_its_size(
    voice_source: object, tool_names: object
) -> None:
    """A child's reply cannot make the host build more objects than its types allow."""
    with pytest.raises(msgspec.ValidationError):
        wire.decode_reply(_loaded_with(voice_source, tool_names))


def test_a_freesound_voice_source_fits_the_bounds() -> None:
    source = {"source_type": "freesound", "url": "https://freesound.org/s/1/",
              "sound_instance": {"id": 1, "username": "someone", "license": "CC0"}}
    reply = wire.decode_reply(_loaded_with(source, ["tool"]))
    assert isinstance(reply, wire.Loaded)
    assert reply.characters[0].voice_source == source
