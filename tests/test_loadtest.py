"""scripts/loadtest: its own logic (the isolation check, the percentile maths, the
fake STT's looping script, the report) and small runs against real servers: an
in-process one for the session logic, and ``--spawn-server`` runs of the script as a
subprocess. Nothing here asserts on how fast anything was."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
import soundfile
from aiohttp.test_utils import TestClient
from conftest import REPO, SCALE

from scripts.loadtest import cli, run
from scripts.loadtest.audio import (
    CHUNK_SEC,
    OFFSETS_SEC,
    REPLY_DELAY_SEC,
    STT_DELAY_SEC,
    Speech,
    build_cycle,
    interruption_offsets,
    load_speech,
    pcm16_samples_in,
    reply_seconds,
    voiced_span,
)
from scripts.loadtest.characters import Directories, check, owner_of
from scripts.loadtest.fakes import LoopingTranscript, array_length
from scripts.loadtest.report import nice_ticks, table, write_html, write_json
from scripts.loadtest.result import Result, decode
from scripts.loadtest.roles import reload_and_check, reloader_count
from scripts.loadtest.scenarios import leftover_series, storm_phases
from scripts.loadtest.sessions import (
    TRANSCRIBED,
    Event,
    Failed,
    Run,
    Session,
)
from scripts.loadtest.stats import Budget, Recorder, Series, passed, summary
from scripts.measure import percentile
from tests.fakes.kyutai_stt import PAUSE_HEAD, PAUSED, SPEAKING

# ── percentile maths ─────────────────────────────────────────────────────────


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 99) == 99
    assert percentile([3, 1, 2], 0) == 1
    assert percentile([3, 1, 2], 100) == 3
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summary_has_the_figures_of_the_json_file() -> None:
    figures = msgspec.to_builtins(summary([float(v) for v in range(1, 101)]))
    assert figures == {"count": 100, "p50": 50.5, "p95": 95.05, "p99": 99.01,
                       "max": 100.0, "mean": 50.5}
    assert msgspec.to_builtins(summary([])) == {"count": 0, "p50": None, "p95": None, "p99": None,
                           "max": None, "mean": None}


def test_series_picks_the_samples_of_windows() -> None:
    series = Series()
    for t in range(10):
        series.add(float(t), float(t * 10))
    assert series.between(2, 5) == [20, 30, 40]
    assert series.within([(0, 2), (8, 20)]) == [0, 10, 80, 90]


def test_budgets_fail_only_when_binding_and_measured() -> None:
    assert Budget("lateness", 19.9, 20).ok is True
    assert Budget("capacity", 150, 200, at_most=False).ok is False
    assert Budget("not measured", None, 20).ok is None
    assert passed([Budget("a", 1, 2), Budget("not measured", None, 0),
                   Budget("reference", 50, 20, binding=False)])
    assert not passed([Budget("a", 3, 2)])


# ── the isolation check ──────────────────────────────────────────────────────


def test_generated_names_say_whose_they_are(tmp_path: Path) -> None:
    directories = Directories(tmp_path)
    first = directories.write("r0001", count=3)
    second = directories.write("r0002", count=3)
    d0, d1, d2 = first
    # d0 and d1 (and everyone's d0) hold files of the same names, not the same content.
    assert sorted(p.name for p in d0.glob("*.py")) == sorted(p.name for p in d1.glob("*.py"))
    assert sorted(p.name for p in d0.glob("*.py")) == sorted(
        p.name for p in second[0].glob("*.py"))
    assert (d0 / "c00.py").read_text() != (d1 / "c00.py").read_text()
    assert not set(p.name for p in d2.glob("*.py")) & set(p.name for p in d0.glob("*.py"))
    assert directories.names[d1] == {"r0001.d1.c00", "r0001.d1.c01", "r0001.d1.c02"}
    assert {owner_of(n) for n in directories.names[second[2]]} == {"r0002"}
    assert owner_of("Charles") is None
    with pytest.raises(ValueError):
        directories.write("R-1")


def test_check_tells_violations_from_mismatches() -> None:
    expected = ["r0001.d0.c00", "r0001.d0.c01"]
    exact = check("r0001", "/x/d0", expected, reversed(expected))
    assert exact.exact and not exact.violation

    stale = check("r0001", "/x/d0", expected, ["r0001.d1.c00", "r0001.d1.c01"])
    assert not stale.violation and not stale.exact
    assert stale.missing == expected and stale.unexpected == ["r0001.d1.c00", "r0001.d1.c01"]

    leaked = check("r0001", "/x/d0", expected, ["r0001.d0.c00", "r0002.d0.c01"])
    assert leaked.violation and leaked.foreign == {"r0002.d0.c01": "r0002"}
    assert leaked.details("sess_1", "session.characters.listed").foreign == {
        "r0002.d0.c01": "r0002"}

    other = check("r0001", "/x/d0", expected, [*expected, "Charles"], owners={"Charles": "w0009"})
    assert other.violation and other.foreign == {"Charles": "w0009"}

    doubled = check("r0001", "/x/d0", expected, [*expected, expected[0]])
    assert doubled.duplicates == [expected[0]] and not doubled.exact


# ── the fake STT's looping script, audio helpers ─────────────────────────────


def test_the_looping_transcript_repeats_every_period() -> None:
    stream = LoopingTranscript([([("hello", 0.16), ("there", 0.4)], 0.64)], period=1.6,
                               delay_steps=0)
    out = stream.audio(2 * 1920 * 20)  # two periods of 20 frames
    words = [(m["text"], round(m["start_time"], 2)) for m in out if m["type"] == "Word"]
    assert words == [("hello", 0.16), ("there", 0.4), ("hello", 1.76), ("there", 2.0)]
    steps = [m["prs"][PAUSE_HEAD] for m in out if m["type"] == "Step"]
    assert len(steps) == 40
    # Step i is about the audio up to (i + 1) × 80 ms, as in FakeKyutaiSTT.
    speaking = [i for i, p in enumerate(steps) if p == SPEAKING]
    assert speaking == [1, 2, 3, 4, 5, 6, 21, 22, 23, 24, 25, 26]
    assert all(p == PAUSED for i, p in enumerate(steps) if i not in speaking)

    delayed = LoopingTranscript([([("hello", 0.16)], 0.64)], period=1.6, delay_steps=2)
    assert [m["type"] for m in delayed.audio(1920)] == ["Step"]
    assert delayed.marker(7) == []  # once the audio before it and the delay are through
    assert delayed.audio(1920)[-1]["type"] == "Step"
    assert delayed.audio(1920)[-1] == {"type": "Marker", "id": 7}


def test_the_looping_transcript_hears_every_utterance_of_the_cycle() -> None:
    stream = LoopingTranscript([([("question", 0.16)], 0.48), ([("wait", 0.96)], 1.2)],
                               period=1.6, delay_steps=0)
    out = stream.audio(1920 * 20)
    assert [(m["type"], m.get("text")) for m in out if m["type"] != "Step"] == [
        ("Word", "question"), ("EndWord", None), ("Word", "wait"), ("EndWord", None)]
    steps = [m["prs"][PAUSE_HEAD] for m in out if m["type"] == "Step"]
    # A pause between the two, long enough for the server to end the first turn.
    assert [i for i, p in enumerate(steps) if p == SPEAKING] == [1, 2, 3, 4, 11, 12, 13]


def test_audio_messages_are_counted_without_decoding() -> None:
    pcm = msgspec.msgpack.encode({"type": "Audio", "pcm": [0.5] * 1920})
    decoded = msgspec.msgpack.decode(pcm, type=dict[str, msgspec.Raw])
    assert array_length(decoded["pcm"]) == 1920
    assert array_length(msgspec.msgpack.encode([1.0] * 3)) == 3
    assert array_length(msgspec.msgpack.encode([1.0] * 70000)) == 70000
    assert array_length(b"\xa1x") is None
    assert pcm16_samples_in("AAAA") == 1  # 3 bytes: one whole sample
    assert pcm16_samples_in("AAA=") == 1
    assert pcm16_samples_in("AA==") == 0


def test_voiced_span_finds_the_loud_part() -> None:
    pcm = np.zeros(24_000, dtype="<i2")
    pcm[4800:12000] = 8000
    assert voiced_span(pcm) == (0.2, 0.5)
    assert voiced_span(np.zeros(100, dtype="<i2")) == (0.0, 100 / 24_000)


def a_speech(tmp_path: Path, seconds: float, voiced: tuple[float, float],
             words: tuple[str, ...]) -> Speech:
    """A WAV at 16 kHz with a tone over ``voiced``, read as the load test reads it."""
    samples = np.zeros(round(16_000 * seconds), dtype=np.float32)
    first, last = round(16_000 * voiced[0]), round(16_000 * voiced[1])
    samples[first:last] = 0.3 * np.sin(np.arange(last - first) / 5)
    path = tmp_path / f"{'-'.join(words)}.wav"
    soundfile.write(path, samples, 16_000)
    return load_speech(path, words)


def test_the_cycle_leaves_room_for_the_whole_reply(tmp_path: Path) -> None:
    question = a_speech(tmp_path, 2.0, (0.5, 1.5), ("one", "two", "three"))
    assert abs(question.start - 0.5) <= 0.02 and abs(question.end - 1.5) <= 0.02
    cycle = build_cycle(question, audio_lead=0.5)
    (utterance,) = cycle.utterances
    assert cycle.interruptions == () and cycle.first_block == cycle.period
    assert cycle.period >= utterance.end + reply_seconds() + 0.5 + 1.0
    assert [w for w, _ in utterance.heard()] == ["one", "two", "three"]
    assert all(utterance.start <= t < utterance.end for _, t in utterance.heard())
    assert cycle.ends == {int(utterance.end / 0.08): utterance}
    assert cycle.starts == {int(utterance.start / 0.08): utterance}
    first = json.loads(cycle.appends[0])
    assert first["type"] == "input_audio_buffer.append"
    assert pcm16_samples_in(first["audio"]) == 1920  # 80 ms at 24 kHz, resampled
    script = cycle.stt_script()
    assert script["period"] == cycle.period
    assert script["utterances"] == [{"words": utterance.heard(), "end": utterance.end}]


def test_interruptions_start_while_the_server_still_sends_the_reply(tmp_path: Path) -> None:
    question = a_speech(tmp_path, 2.0, (0.5, 1.5), ("one", "two", "three"))
    wait = a_speech(tmp_path, 1.0, (0.1, 0.7), ("wait",))
    lead = 0.5
    cycle = build_cycle(question, lead, wait, [1.0, 0.4])
    assert cycle.interruptions == (1.0, 0.4)
    q1, i1, q2, i2 = cycle.utterances
    assert [u.words for u in cycle.utterances] == [question.words, ("wait",)] * 2
    for asked, cut, offset in ((q1, i1, 1.0), (q2, i2, 0.4)):
        # The interruption begins ``offset`` into the reply to the question; the
        # server hears it STT_DELAY_SEC later, while it is still sending that reply.
        assert cut.start == pytest.approx(asked.end + REPLY_DELAY_SEC + offset, abs=0.03)
        assert cut.start + STT_DELAY_SEC < asked.end + REPLY_DELAY_SEC + reply_seconds() - lead
    # The reply to each interruption is heard to the end before the next question.
    assert q2.start >= i1.end + REPLY_DELAY_SEC + reply_seconds() + lead + 1.0
    assert cycle.period >= i2.end + REPLY_DELAY_SEC + reply_seconds() + lead + 1.0
    assert q2.start - q1.start == pytest.approx(cycle.first_block, abs=0.03)
    assert sorted(cycle.starts) == [int(u.start / CHUNK_SEC) for u in cycle.utterances]
    assert sorted(cycle.ends) == [int(u.end / CHUNK_SEC) for u in cycle.utterances]
    # The interruption's audio is in the appends where its words are heard.
    loud = [i for i, append in enumerate(cycle.appends)
            if np.abs(np.frombuffer(base64.b64decode(json.loads(append)["audio"]),
                                    dtype="<i2")).max() > 1000]
    assert int(i1.start / CHUNK_SEC) in loud and int(i1.end / CHUNK_SEC) - 1 in loud
    assert int((i1.start - 0.3) / CHUNK_SEC) not in loud  # silence before it
    assert len(cycle.stt_script()["utterances"]) == 4


def test_interruption_offsets_cover_the_reply_from_early_to_late() -> None:
    low, high = OFFSETS_SEC
    for seed in range(20):
        offsets = interruption_offsets(random.Random(seed), 2)
        assert len(offsets) == 2 and all(low <= o <= high for o in offsets)
        early, late = sorted(offsets)
        assert early <= (low + high) / 2 <= late
    assert interruption_offsets(random.Random(1)) == interruption_offsets(random.Random(1))
    assert len({tuple(interruption_offsets(random.Random(s))) for s in range(5)}) == 5


# ── scenario arithmetic and the report ───────────────────────────────────────


def test_reloaders_are_a_fraction_but_never_everyone() -> None:
    assert reloader_count(200, 0.1) == 20
    assert reloader_count(4, 0.1) == 1
    assert reloader_count(4, 1.0) == 3
    assert reloader_count(4, 0.0) == 0
    assert reloader_count(1, 0.5) == 0


def test_storm_phases_alternate_calm_first() -> None:
    phases = storm_phases(10.0, 20.0)
    assert [kind for kind, _, _ in phases] == ["calm", "storm", "calm", "storm"]
    assert phases[0][1] == 10.0 and phases[-1][2] == 30.0
    assert all(a[2] == b[1] for a, b in zip(phases, phases[1:], strict=False))
    assert len(storm_phases(0.0, 3.0)) == 2


def test_leftover_series_are_those_no_live_session_owns() -> None:
    text = "\n".join([
        "# HELP session_character_count Characters loaded in a session.",
        'session_character_count{session_id="7"} 7.0',
        'character_load_per_session_total{session_id="7"} 2.0',
        'session_character_count{session_id="9"} 3.0',
        "sessions_active 1.0",
    ])
    assert leftover_series(text, {"9"}) == 2
    assert leftover_series(text, {"7", "9"}) == 0
    assert leftover_series(text, set()) == 3
    assert leftover_series(None, set()) is None
    assert leftover_series(text, None) is None


def test_nice_ticks_cover_the_data() -> None:
    for low, high in ((0, 30.4), (0.0, 0.8), (12.0, 812.0), (5.0, 5.0)):
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) <= 12


def a_result() -> Result:
    latency = msgspec.to_builtins(summary([1.0, 2.0, 3.0]))
    empty = msgspec.to_builtins(summary([]))
    return msgspec.convert({
        "scenario": "reload-storm", "started_at": "2025-01-01T00:00:00+0000",
        "target": {"url": "ws://127.0.0.1:1/v1/realtime?model=x", "spawned": True,
                   "server_pid": 1},
        "parameters": {"sessions": 4, "duration_s": 8.0, "ramp_per_s": 10.0,
                       "reload_fraction": 0.5, "reload_rate_per_s": 1.0, "cycles": 10,
                       "characters_per_directory": 5, "seed": 1, "audio_lead_s": 0.5,
                       "timeout_s": 20.0, "speech_cycle_s": 12.0, "interruptions": True,
                       "compression": True},
        "clients": {"interruptions": True, "interruptions_per_cycle": 2,
                    "interruption_offsets_s": [1.2, 0.5], "compression": "permessage-deflate",
                    "sessions_with_compression": 4, "sessions_refused_compression": 0},
        "sessions_requested": 4, "sessions_held": 4, "sessions_opened": 4,
        "isolation_violations": 0, "reload_mismatches": 0, "answers_checked": 6,
        "reload_ms": latency, "reload_server_ms": latency, "session_start_ms": latency,
        "session_created_ms": latency, "first_audio_ms": empty,
        "frame_lateness_ms": latency, "frame_lateness_baseline_ms": latency,
        "client_loop_lag_ms": latency, "measured_s": [[1.0, 9.0]],
        "errors_by_code": {"rate_limited": 2},
        "error_examples": [{"t": 1.5, "code": "rate_limited", "message": "slow down",
                            "session_id": "sess_1"}],
        "isolation_details": [], "mismatch_details": [],
        "responses": {"cancelled": 5, "completed": 6},
        "interruptions_made": 5, "interruptions_missed": 1, "questions_over_late_replies": 2,
        "interrupted_at_ms": msgspec.to_builtins(summary([400.0, 1100.0])),
        "turns": {"asked": 12, "answered": 11, "merged": 1, "superseded": 0,
                  "in_flight_at_end": 1, "unanswered": 0, "unprompted_replies": 0},
        "stale_frames": 0, "leftover_processes": 0, "warm_children_at_end": 0,
        "server_rss_mb": 80.5, "server_pss_mb": 60.0, "server_rss_mb_idle": 79.0,
        "server_rss_mb_after": 80.0, "sandbox_pss_mb_idle": 20.0,
        "sandbox_pss_mb_at_load": 40.0, "sandbox_pss_mb_per_session": 4.6,
        "memory_mb_per_session": 5.1, "sessions_at_memory_reading": 4,
        "cpu_percent": {"server": 12.5},
        "budgets": [msgspec.to_builtins(b.line()) for b in (
            Budget("isolation violations", 0, 0, unit=""), Budget("growth", 7.5, 5.0),
            Budget("start", None, 20.0, binding=False))],
        "passed": False,
        "distributions": {"reload_ms": [float(i) for i in range(101)],
                          "frame_lateness_ms": [], "interrupted_at_ms": [400.0, 1100.0]},
        "timeline": [{"t": 1.0, "sessions_open": 2, "streaming": 1, "server_rss_mb": 80.0,
                      "sandbox_pss_mb": 40.0},
                     {"t": 2.0, "sessions_open": 4, "streaming": 3, "server_rss_mb": 81.0,
                      "cpu_percent": {"server": 12.5}, "lateness_p99_ms": 3.0}],
        "duration_s": 9.0, "server_health_before": None, "server_health_after": None,
        "reload_storm": {"reloading_sessions": 2, "reload_rate_per_session": 1.0,
                         "phases_s": [["calm", 1.0, 5.0], ["storm", 5.0, 9.0]],
                         "lateness_p99_calm_ms": 1.0, "lateness_p99_storm_ms": 8.5,
                         "growth_ms": 7.5, "server_cpu_percent_calm": 10.0,
                         "server_cpu_percent_per_streaming_session": 5.0},
        "orphan_processes": 0, "orphan_details": [],
    }, Result)


def test_the_report_shows_every_budget(tmp_path: Path) -> None:
    result = a_result()
    text = table(result)
    assert "MISS growth: 7.5 ms <= 5.0 ms" in text
    assert "n/a  start" in text and "(for reference)" in text
    assert text.endswith("FAILED: a budget or the isolation check failed")
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "rate_limited 2" in lines["errors by code"]
    assert "cancelled 5, completed 6" in lines["replies (response.done)"]
    assert lines["interruptions made"].endswith(
        "  5 (and 1 that found no reply going); reply audio received when they began: "
        "min 400.0 / p50 750.0 / max 1100 ms; questions begun while a late reply still "
        "played 2")
    assert "interrupt 2 replies a cycle (1.2 / 0.5 s" in lines["clients"]
    assert "permessage-deflate (negotiated by 4, refused to 0)" in lines["clients"]
    assert "asked 12, answered 11 (merged with the next 1)" in lines["turns"]
    assert "in flight at the end 1, unanswered 0" in lines["turns"]
    quiet = msgspec.structs.replace(
        result, errors_by_code={}, clients=msgspec.structs.replace(
            result.clients, interruptions=False, compression=None))
    assert "never interrupt; no compression" in table(quiet)
    assert "errors by code" in table(quiet) and "none" in table(quiet)
    write_json(result, tmp_path / "out" / "result.json")
    written = (tmp_path / "out" / "result.json").read_bytes()
    assert decode(written) == result
    assert json.loads(written)["turns"]["in_flight_at_end"] == 1  # the file's names
    assert "reload_storm" in json.loads(written) and "capacity" not in json.loads(written)
    write_html(result, tmp_path / "out" / "charts.html")
    page = (tmp_path / "out" / "charts.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert page.count("<svg") >= 5 and "Reload, client-observed (CDF)" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_sessions_interrupt_and_compress_unless_told_not_to() -> None:
    args = cli.parse_args(["--spawn-server"])
    assert args.interruptions and args.compression
    args = cli.parse_args(["--spawn-server", "--no-interruptions", "--no-compression"])
    assert not args.interruptions and not args.compression


@pytest.mark.parametrize("argv", [
    ["--sessions", "0"],
    ["--scenario", "nonsense"],
    ["--url", "ws://192.0.2.1:8000/v1/realtime?model=x"],
    ["--url", "ws://127.0.0.1:8000/v1/realtime"],
    ["--url", "ws://127.0.0.1:8000/v1/realtime?model=x", "--scenario", "churn"],
    ["--spawn-server", "--plot", "charts.png"],
    ["--spawn-server", "--characters-root", "/tmp"],
    ["--spawn-server", "--duration", "-1"],
])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# ── what a session makes of the events it receives ───────────────────────────


class IdleSocket:
    """Enough of aiohttp's client WebSocket for a Session whose events the test
    hands to its dispatcher, at the arrival times it chooses."""

    closed = False

    async def receive(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed = True


def event(kind: str, **fields: Any) -> Event:
    return msgspec.convert({"type": kind, **fields}, Event)


def frame(response_id: str) -> Event:
    """80 ms of reply audio."""
    return event("response.output_audio.delta", response_id=response_id,
                 delta=base64.b64encode(bytes(2 * 1920)).decode())


def a_session(timeout: float = 20.0) -> tuple[Run, Session]:
    run = Run(None, "ws://127.0.0.1:9/v1/realtime?model=t", Recorder(),  # type: ignore[arg-type]
              time.monotonic(), audio_lead=0.5, timeout=timeout)
    return run, Session(run, IdleSocket())  # type: ignore[arg-type]


def ask(session: Session, ended: float, words: int) -> None:
    """The session finished an utterance of ``words`` words at ``ended``."""
    session._ended.append((ended, words))
    session.run.recorder.turns.asked += 1


def on_time(session: Session, response_id: str, first: float, frames: int) -> None:
    """``frames`` frames arriving as the server sends them: the first half second at
    once, then in real time."""
    for k in range(frames):
        session._dispatch(frame(response_id), first + max(0.0, k * 0.08 - 0.5))


async def test_a_reply_cut_short_just_stops() -> None:
    run, session = a_session()
    recorder = run.recorder
    try:
        t = time.monotonic()
        ask(session, t, 3)
        session._dispatch(event(TRANSCRIBED, transcript="one two three"), t + 0.5)
        session._dispatch(event("response.created", response={"id": "r1"}), t + 0.5)
        on_time(session, "r1", t + 0.6, 12)  # 0.96 s of audio, of which 0.46 s played
        session._speaking(t + 1.0, interruption=True)  # the person speaks over it
        assert recorder.interruptions == 1
        assert recorder.interrupted_at_ms.values == [pytest.approx(400.0)]
        session._dispatch(event("response.done", response={"id": "r1", "status": "cancelled"}),
                          t + 1.6)
        session._dispatch(frame("r1"), t + 1.7)  # after its end: not the next reply's
        ask(session, t + 2.0, 1)
        session._dispatch(event(TRANSCRIBED, transcript="wait"), t + 2.5)
        session._dispatch(event("response.created", response={"id": "r2"}), t + 2.5)
        session._dispatch(frame("r1"), t + 2.55)  # naming another response
        on_time(session, "r2", t + 2.7, 20)
        session._dispatch(event("response.done", response={"id": "r2", "status": "completed"}),
                          t + 4.0)
        session._speaking(t + 4.2, interruption=False)  # a question over its last 0.1 s
        session._speaking(t + 2.7 + 1.6 + 0.1, interruption=True)  # after it: nothing to cut
        assert (recorder.interruptions, recorder.talked_over,
                recorder.interruptions_missed) == (1, 1, 1)
        # No frame counts as late: neither those of the reply cut short, nor the
        # stale ones, nor the next reply's, whose clock starts at its own first frame.
        assert recorder.frame_lateness_ms.values == [0.0] * (11 + 19)
        assert recorder.stale_frames == 2
        assert recorder.first_audio_ms.values == [pytest.approx(600.0), pytest.approx(700.0)]
        assert dict(recorder.responses) == {"cancelled": 1, "completed": 1}
        assert msgspec.to_builtins(recorder.turns) == {
            "asked": 2, "answered": 2, "merged": 0, "superseded": 0, "in_flight_at_end": 0,
            "unanswered": 0, "unprompted_replies": 0}
    finally:
        await session.close()


async def test_turns_merged_superseded_and_left_open_are_told_apart() -> None:
    run, session = a_session(timeout=5.0)
    turns = run.recorder.turns
    t = time.monotonic() - 60
    try:
        # The person went on before the server ended the first utterance: one turn
        # holding both (13 + 5 words), one reply, both answered.
        ask(session, t, 13)
        ask(session, t + 2, 5)
        session._dispatch(event(TRANSCRIBED, transcript=" ".join(["w"] * 18)), t + 3)
        session._dispatch(event("response.created", response={"id": "r1"}), t + 3)
        assert (turns.answered, turns.merged) == (2, 1)
        # A turn taken and never answered before the next one was taken.
        ask(session, t + 10, 13)
        session._dispatch(event(TRANSCRIBED, transcript=" ".join(["w"] * 13)), t + 11)
        ask(session, t + 12, 5)
        session._dispatch(event(TRANSCRIBED, transcript=" ".join(["w"] * 5)), t + 13)
        assert turns.superseded == 1
        # A reply nobody asked for (the character speaking into a silence).
        session._dispatch(event("response.created", response={"id": "r2"}), t + 14)
        session._dispatch(event("response.created", response={"id": "r3"}), t + 40)
        assert (turns.answered, turns.unprompted) == (3, 1)
        # At the close: one utterance finished long ago, one just now.
        ask(session, t + 20, 13)
        ask(session, time.monotonic(), 5)
    finally:
        await session.close()
    assert msgspec.to_builtins(turns) == {"asked": 6, "answered": 3, "merged": 1, "superseded": 1,
                               "in_flight_at_end": 1, "unanswered": 1,
                               "unprompted_replies": 1}
    assert turns.without_reply == 2


# ── sessions against a real server ───────────────────────────────────────────


async def test_a_reload_of_another_sessions_set_is_a_violation(
    server: TestClient, allowed_root: Path
) -> None:
    directories = Directories(allowed_root)
    mine, theirs = directories.write("r0001", count=3), directories.write("r0002", count=3)
    async with aiohttp.ClientSession() as http:
        run = Run(http, f"ws://127.0.0.1:{server.port}/v1/realtime?model=t", Recorder(),
                  time.monotonic(), audio_lead=0.5, timeout=20 * SCALE)
        session = await Session.open(run)
        try:
            await reload_and_check(session, "r0001", mine[1], directories)
            assert run.recorder.violations == run.recorder.mismatches == 0
            assert run.recorder.reloads_checked == 2  # the reload's answer and a list

            # Claiming another owner's directory as ours: its names are foreign.
            expected_theirs = directories.names[theirs[0]]
            directories.names[theirs[0]] = directories.names[mine[0]]
            await reload_and_check(session, "r0001", theirs[0], directories)
            assert run.recorder.violations == 2
            example = run.recorder.violation_examples[0]
            assert example.session_id == session.id
            assert set(example.foreign) == set(expected_theirs)
            assert set(example.foreign.values()) == {"r0002"}

            # Our own other directory where d0 was expected: a mismatch, not a leak.
            directories.names[mine[1]] = directories.names[mine[0]]
            await reload_and_check(session, "r0001", mine[1], directories)
            assert run.recorder.violations == 2 and run.recorder.mismatches == 2

            metrics = await (await server.get("/metrics")).text()
            assert leftover_series(metrics, set()) >= 2  # its gauge and counter, while open
        finally:
            await session.close()
        for _ in range(int(200 * SCALE)):  # the server ends the session after the close
            metrics = await (await server.get("/metrics")).text()
            if leftover_series(metrics, set()) == 0:
                break
            await asyncio.sleep(0.05)
        assert leftover_series(metrics, set()) == 0
        assert run.recorder.sessions_open == 0 and run.recorder.sessions_opened == 1
        assert len(run.recorder.session_start_ms) == 1


async def test_errors_are_counted_by_code(server: TestClient, allowed_root: Path) -> None:
    async with aiohttp.ClientSession() as http:
        run = Run(http, f"ws://127.0.0.1:{server.port}/v1/realtime?model=t", Recorder(),
                  time.monotonic(), audio_lead=0.5, timeout=20 * SCALE)
        session = await Session.open(run)
        try:
            with pytest.raises(Failed) as failed:
                await session.request({"type": "session.characters.reload",
                                       "directory": str(allowed_root / "missing")},
                                      "session.characters.reloaded")
            assert failed.value.code == "directory_not_found"
        finally:
            await session.close()
        run.url = "ws://127.0.0.1:9/v1/realtime?model=t"  # nothing listens there
        with pytest.raises(Failed):
            await Session.open(run)
    assert dict(run.recorder.errors) == {"directory_not_found": 1, "client.connect_failed": 1}
    assert (run.recorder.compressed, run.recorder.uncompressed) == (1, 0)  # permessage-deflate


# ── the script, with the server and fakes it starts ──────────────────────────


async def run_script(tmp_path: Path, *args: str) -> tuple[int, Result, str]:
    out = tmp_path / "result.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.loadtest", "--spawn-server", "--quiet",
        "--json", str(out), "--plot", str(tmp_path / "charts.html"),
        "--timeout", str(20 * SCALE), *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 240 * SCALE)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert out.exists(), text
    return process.returncode or 0, decode(out.read_bytes()), text


def check_common(code: int, result: Result, output: str) -> None:
    assert code == (0 if result.passed else 1), output
    assert result.isolation_violations == 0, result.isolation_details
    assert result.reload_mismatches == 0, result.mismatch_details
    assert result.leftover_processes == 0
    assert result.orphan_processes == 0
    assert "budgets (DESIGN.md section 8):" in output


@pytest.mark.timeout(300)
async def test_a_small_reload_storm(tmp_path: Path) -> None:
    """As real clients: interrupting, compression negotiated; every streamer has
    been through its first block (one interruption) before the storm starts."""
    code, result, output = await run_script(
        tmp_path, "--scenario", "reload-storm", "--sessions", "4", "--reload-fraction", "0.5",
        "--duration", "8", "--ramp", "10", "--characters", "5")
    check_common(code, result, output)
    assert result.scenario == "reload-storm" and result.sessions_requested == 4
    assert result.reload_storm is not None and result.reload_storm.reloading_sessions == 2
    assert result.reload_ms.count > 0
    assert result.answers_checked == 2 * result.reload_ms.count
    clients = result.clients
    assert clients.interruptions and clients.compression == "permessage-deflate"
    assert clients.sessions_with_compression == 4
    assert clients.sessions_refused_compression == 0
    assert len(clients.interruption_offsets_s) == 2
    # Each streamer spoke over a reply, which the server cancelled, and answered
    # the interruption with a reply heard to the end.
    assert result.interruptions_made >= 2, result.turns
    assert result.responses.get("cancelled", 0) >= 2, result.responses
    assert result.responses.get("completed", 0) >= 2, result.responses
    assert result.interrupted_at_ms.count >= 1
    turns = result.turns
    assert turns.asked >= 4 and turns.superseded == turns.unanswered == 0, turns
    assert turns.answered + turns.in_flight == turns.asked, turns
    assert result.errors_by_code == {}, result.error_examples
    lines = {line.split("  ")[0]: line for line in output.splitlines()}
    assert "none" in lines["errors by code"] and "cancelled" in lines["replies (response.done)"]
    assert result.server_rss_mb is not None and result.timeline
    assert (tmp_path / "charts.html").read_text().count("<svg") >= 5


@pytest.mark.timeout(300)
async def test_a_small_churn(tmp_path: Path) -> None:
    code, result, output = await run_script(
        tmp_path, "--scenario", "churn", "--sessions", "2", "--cycles", "60",
        "--characters", "3")
    check_common(code, result, output)
    churn = result.churn
    assert churn is not None
    assert churn.cycles_done == 60 and churn.leftover_metric_series == 0
    assert churn.sessions_seen == 60 and result.reload_ms.count == 60
    assert churn.warm_up_cycles == 50  # at least 50: the rest is the measured part
    # The drift is the server's RSS after the warm-up against the end (both read
    # idle, from /proc), and ten cycles leave the server where they found it.
    warm, end = churn.rss_after_warm_up_mb, churn.rss_at_end_mb
    assert warm is not None and end is not None and warm > 0
    assert churn.rss_drift_percent == pytest.approx((end - warm) / warm * 100, abs=0.5)
    (drift,) = [b for b in result.budgets if b.name == "server RSS drift after the warm-up"]
    assert drift.ok is True, drift


@pytest.mark.timeout(300)
async def test_a_small_capacity_run(tmp_path: Path) -> None:
    """Without interruptions or compression: as the load test was before them."""
    code, result, output = await run_script(
        tmp_path, "--scenario", "capacity", "--sessions", "3", "--ramp", "10",
        "--duration", "4", "--no-interruptions", "--no-compression")
    check_common(code, result, output)
    capacity = result.capacity
    assert capacity is not None and capacity.windows
    # Every session joined and streamed: each starts within one speech cycle of
    # joining, and the run goes on --duration past that.
    assert result.sessions_opened == 3
    assert max(point.streaming for point in result.timeline) == 3
    # Sessions held is the best window within budget, whatever this machine's load.
    assert result.sessions_held == max(
        (w.held for w in capacity.windows if w.ok), default=0)
    assert capacity.largest_held_within_budget == result.sessions_held
    assert result.turns.answered > 0 and result.frame_lateness_ms.count > 0
    assert not any(b.ok is not None for b in result.budgets
                   if b.name.startswith("sessions streaming"))  # fewer than 200 asked
    assert result.clients.interruptions is False
    assert result.clients.compression is None
    assert result.clients.interruption_offsets_s == []
    assert result.clients.sessions_with_compression == 0
    assert result.interruptions_made == 0 and "cancelled" not in result.responses
    assert any(b.name == "errors" for b in result.budgets)
    lines = {line.split("  ")[0]: line for line in output.splitlines()}
    assert "never interrupt; no compression" in lines["clients"]
    assert "errors by code" in lines
