"""The server's audio inside: mono float32 samples at 24 kHz, and pcm16 at the edge.

    client pcm16 (little-endian int16) ──pcm16_to_float──▶ Samples ──▶ STT
    TTS ──▶ Samples ──pcm16_bytes──▶ pcm16 for ``response.audio.delta``

Every backend speaks and hears at ``SAMPLE_RATE`` (the Realtime API's pcm16 rate and
Kyutai's Mimi rate); the embedded models resample at their own edge.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt

SAMPLE_RATE: Final = 24_000
"""The session's audio rate, both ways: the Realtime API's pcm16 and Mimi's."""

Samples = npt.NDArray[np.float32]
"""Mono float samples in [-1, 1]."""


def pcm16_to_float(data: bytes) -> Samples:
    """Little-endian signed 16-bit samples (the Realtime API's ``pcm16``) as float32
    in [-1, 1). Raises ``ValueError`` on an odd number of bytes."""
    if len(data) % 2:
        raise ValueError(f"pcm16 audio is 2 bytes a sample; got {len(data)} bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(32768)


def pcm16_bytes(samples: npt.NDArray[np.floating[Any]]) -> bytes:
    """Float samples (clipped to [-1, 1]) as little-endian int16 PCM: what the OpenAI
    dialects' ``response.audio.delta`` carries (base64) in ``pcm16``."""
    ints = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return bytes(ints.tobytes())
