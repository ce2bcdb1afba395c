"""The voice part of ``make bench`` (scripts/bench/voice*.py): its arithmetic, and its
fakes phase end to end against a real ``python -m server`` (one turn). No timing is
asserted: the benchmark reports times, the tests check that it measures what it says.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from scripts.bench.voice_client import APPEND, appends, audio_gaps
from scripts.bench.voice_fakes import REPLY, SCRIPT, measure_fakes
from scripts.measure import Spread


def test_appends_are_80_ms_of_pcm16_the_last_padded() -> None:
    audio = np.full(APPEND * 2 + 10, 0.5, np.float32)

    frames = [json.loads(frame) for frame in appends(audio)]

    assert [f["type"] for f in frames] == ["input_audio_buffer.append"] * 3
    pcm = [np.frombuffer(base64.b64decode(f["audio"]), "<i2") for f in frames]
    assert [len(p) for p in pcm] == [APPEND] * 3
    assert (pcm[2][:10] == 16384).all() and not pcm[2][10:].any()


def test_audio_gaps_count_the_time_a_player_waits() -> None:
    # 1 s of audio at t=0, the next 1 s at t=1.5: the player waited 0.5 s.
    assert audio_gaps([(0.0, 1.0), (1.5, 1.0)]) == (0.5, 2.0)
    # Audio ahead of time is buffered: no wait.
    assert audio_gaps([(0.0, 1.0), (0.5, 1.0), (1.9, 0.1)]) == (0.0, 2.1)
    assert audio_gaps([]) == (0.0, 0.0)


def test_spread_of_nothing_is_empty() -> None:
    assert Spread.of([]).count == 0
    assert Spread.of([3.0, 1.0, 2.0]).max == 3.0


@pytest.mark.timeout(120)
async def test_fakes_phase_matches_every_backend_frame_to_a_client_event(
    tmp_path: Path,
) -> None:
    figures = await measure_fakes(tmp_path, runs=1)

    assert figures.added["audio"].count == len(REPLY.split(" "))  # a frame per word
    assert figures.added["text"].count == len(REPLY.split(" "))  # a chunk per word
    assert figures.added["transcript"].count == len(SCRIPT)
    assert figures.added["turn_end"].count == 1
    assert all(spread.p50 > 0 for spread in figures.added.values())  # sent before received
    (turn,) = figures.turns
    assert turn["speech_stopped"] > turn["STT pause step sent"] > 0
    assert turn["first audio"] > turn["first TTS frame sent"] > turn["first LLM chunk sent"]
