"""The shape of a load test's result: what the JSON file holds, the summary table and
the charts are made from (``report.py``), and the tests read. One msgspec Struct per
part, encoded once (``encode``); a field of the JSON file is a field here.

    Result ─┬ Target, Parameters, Clients         what ran, against what
            ├ Summary × 9                         each figure's count, p50 … max, mean
            ├ Turns, responses, errors_by_code    what the sessions saw
            ├ BudgetLine × n, passed              DESIGN.md §8 as this run measured it
            ├ Capacity | ReloadStorm | Churn      the scenario's own section
            ├ AdminSnapshot                       the server's admin API at the end
            └ distributions, Point × seconds      101 percentiles per figure; a timeline

Fields that default to None are left out of the JSON file while None (a scenario's
section, ``profile``, the orphan count of a run that started no server).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Summary(msgspec.Struct):
    """Milliseconds: the figures of one distribution, rounded to 0.01 (None when empty)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    mean: float | None


class BudgetLine(msgspec.Struct):
    """One line of DESIGN.md §8 as this run measured it; ``ok`` None: not measured."""

    name: str
    value: float | None
    limit: float
    comparison: Literal["<=", ">="]
    unit: str
    ok: bool | None
    binding: bool
    """False: shown for reference (measured under other conditions than the budget's)
    and never failing the run."""
    note: str


class ErrorExample(msgspec.Struct):
    t: float
    code: str
    message: str
    session_id: str


class Finding(msgspec.Struct):
    """One answer (a reload's or a list's) that was not exactly the directory asked for."""

    session_id: str
    answer: str
    owner: str
    directory: str
    foreign: dict[str, str]
    """Names that belong to another owner, with that owner: isolation violations."""
    missing: list[str]
    unexpected: list[str]
    duplicates: list[str]
    t: float = 0.0


class Turns(msgspec.Struct):
    """What became of the utterances streaming sessions finished (each is a turn
    they asked the character to answer).

    ``asked`` = ``answered`` + ``superseded`` + ``in_flight`` + ``unanswered``.
    Answered: a reply began (``response.created``) after the server took the turn;
    ``merged`` of them were taken together with the next utterance, because it began
    before the server had ended the first (one reply for both, as for a person who
    goes on speaking). Superseded: taken, but the server took the next turn before
    any reply began (it may have seen the person go on speaking, or lost the
    turn). In flight: not answered when the session closed, but finished less than
    the run's ``--timeout`` before; unanswered: finished longer ago. ``unprompted``:
    replies no utterance asked for (the character speaking after a long silence)."""

    asked: int = 0
    answered: int = 0
    merged: int = 0
    superseded: int = 0
    in_flight: int = msgspec.field(default=0, name="in_flight_at_end")
    unanswered: int = 0
    unprompted: int = msgspec.field(default=0, name="unprompted_replies")

    @property
    def without_reply(self) -> int:
        """Turns that never got a reply of their own (in flight ones aside)."""
        return self.superseded + self.unanswered


class Target(msgspec.Struct):
    url: str
    spawned: bool
    server_pid: int | None


class Parameters(msgspec.Struct):
    sessions: int
    duration_s: float
    ramp_per_s: float
    reload_fraction: float
    reload_rate_per_s: float
    cycles: int
    characters_per_directory: int
    seed: int
    audio_lead_s: float
    timeout_s: float
    speech_cycle_s: float
    interruptions: bool
    compression: bool


class Clients(msgspec.Struct):
    """How the sessions behaved: whether they interrupted replies and offered
    permessage-deflate, and how many negotiated it."""

    interruptions: bool
    interruptions_per_cycle: int
    interruption_offsets_s: list[float]
    compression: str | None
    sessions_with_compression: int
    sessions_refused_compression: int


class Point(msgspec.Struct, omit_defaults=True):
    """One second of the run: sessions, memory, CPU (% of one core per process
    group), the lateness of the last 5 s and the load generator's own lag."""

    t: float
    sessions_open: int
    streaming: int
    server_rss_mb: float | None = None
    children: int | None = None
    server_pss_mb: float | None = None
    sandbox_pss_mb: float | None = None
    cpu_percent: dict[str, float] | None = None
    lateness_p99_ms: float | None = None
    client_lag_max_ms: float | None = None


class Window(msgspec.Struct):
    """One capacity step; ``ok`` None: too few frames to judge."""

    start: float
    end: float
    held: int
    streaming_mean: float
    frames: int
    errors: int
    p99_ms: float | None
    ok: bool | None
    cpu_percent: dict[str, float]


class Capacity(msgspec.Struct):
    largest_held_within_budget: int
    stopped_because: str
    server_cpu_percent_per_session: float | None
    sessions_at_one_core: int | None
    window_s: float
    windows: list[Window]


class ReloadStorm(msgspec.Struct):
    reloading_sessions: int
    reload_rate_per_session: float
    phases_s: list[tuple[str, float, float]]
    lateness_p99_calm_ms: float | None
    lateness_p99_storm_ms: float | None
    growth_ms: float | None
    server_cpu_percent_calm: float | None
    server_cpu_percent_per_streaming_session: float | None


class Churn(msgspec.Struct):
    cycles_requested: int
    cycles_done: int
    warm_up_cycles: int
    concurrency: int
    cycles_per_second: float
    elapsed_s: float
    extrapolated_s_for_10000: float | None
    rss_after_warm_up_mb: float | None
    rss_at_end_mb: float | None
    rss_drift_percent: float | None
    leftover_metric_series: int | None
    sessions_seen: int


class AdminSnapshot(msgspec.Struct):
    """What the server's admin API said about the live sessions at the end."""

    sessions_listed: int
    sandbox_pss_mb_median: float | None
    answered_in_ms: float


class Orphan(msgspec.Struct):
    pid: int
    cmdline: str


class Result(msgspec.Struct, omit_defaults=True):
    scenario: str
    started_at: str
    target: Target
    parameters: Parameters
    clients: Clients
    sessions_requested: int
    sessions_held: int
    sessions_opened: int
    isolation_violations: int
    reload_mismatches: int
    answers_checked: int
    reload_ms: Summary
    reload_server_ms: Summary
    session_start_ms: Summary
    session_created_ms: Summary
    first_audio_ms: Summary
    frame_lateness_ms: Summary
    frame_lateness_baseline_ms: Summary | None
    client_loop_lag_ms: Summary
    measured_s: list[tuple[float, float]]
    errors_by_code: dict[str, int]
    error_examples: list[ErrorExample]
    isolation_details: list[Finding]
    mismatch_details: list[Finding]
    responses: dict[str, int]
    """``response.done`` by status: completed, cancelled (a barge-in), failed."""
    interruptions_made: int
    interruptions_missed: int
    questions_over_late_replies: int
    interrupted_at_ms: Summary
    turns: Turns
    stale_frames: int
    leftover_processes: int | None
    warm_children_at_end: int
    server_rss_mb: float | None
    server_pss_mb: float | None
    server_rss_mb_idle: float | None
    server_rss_mb_after: float | None
    sandbox_pss_mb_idle: float | None
    sandbox_pss_mb_at_load: float | None
    sandbox_pss_mb_per_session: float | None
    memory_mb_per_session: float | None
    sessions_at_memory_reading: int
    cpu_percent: dict[str, float]
    budgets: list[BudgetLine]
    passed: bool
    distributions: dict[str, list[float]]
    timeline: list[Point]
    duration_s: float
    server_health_before: dict[str, Any] | None
    server_health_after: dict[str, Any] | None
    capacity: Capacity | None = None
    reload_storm: ReloadStorm | None = None
    churn: Churn | None = None
    admin_api_at_end: AdminSnapshot | None = None
    profile: str | None = None
    orphan_processes: int | None = None
    orphan_details: list[Orphan] | None = None


def encode(result: Result) -> bytes:
    """The JSON file's text, indented."""
    return msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n"


def decode(data: bytes | str) -> Result:
    return msgspec.json.decode(data, type=Result)
