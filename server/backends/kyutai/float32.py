"""Audio on moshi-server's wire: a msgpack array of float32, both ways.

    Samples ──float32_array──▶ 0xdc/0xdd count, then 0xca + 4 big-endian bytes a sample
    Samples ◀──samples──────── the same (anything else: through msgspec)

The speech-to-text client writes it (``stt_wire.encode_audio``), the text-to-speech
client reads it (``tts_wire.Audio``); numpy does the bytes, no Python float per sample.
"""

from __future__ import annotations

import msgspec
import numpy as np

from ...audio.pcm import Samples

_ITEM = [("marker", "u1"), ("value", ">f4")]
"""One msgpack float32: its ``0xca`` marker, then the value."""

_floats: msgspec.msgpack.Decoder[list[float]] = msgspec.msgpack.Decoder(list[float])


def float32_array(samples: Samples) -> bytes:
    """The samples as a msgpack array of float32 (half the bytes of msgspec's float64)."""
    items = np.empty(len(samples), dtype=_ITEM)
    items["marker"] = 0xCA  # msgpack float32
    items["value"] = samples
    n = len(samples)
    header = b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")
    return header + items.tobytes()


def samples(raw: msgspec.Raw) -> Samples:
    """A msgpack array of floats as numpy. moshi-server writes float32 (``0xca`` and 4
    big-endian bytes each): read straight by numpy, 10x faster than a list of Python
    floats (the profile of 100 sessions had 13 % of the loop here). Anything else goes
    through msgspec."""
    data = bytes(raw)
    if data[:1] == b"\xdc":
        count, header = int.from_bytes(data[1:3], "big"), 3
    elif data[:1] == b"\xdd":
        count, header = int.from_bytes(data[1:5], "big"), 5
    else:
        count, header = -1, 0
    if count >= 0 and len(data) == header + 5 * count:
        items = np.frombuffer(data, dtype=_ITEM, offset=header)
        if (items["marker"] == 0xCA).all():
            return items["value"].astype(np.float32)
    return np.asarray(_floats.decode(data), dtype=np.float32)
