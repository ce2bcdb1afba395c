"""The three scenarios of the load test.

    capacity      streaming sessions join at --ramp a second (each starts speaking at a
                  random point of its first cycle); every 5 s window is judged (p99
                  frame lateness ≤ 20 ms and no error); the run stops when two windows
                  in a row miss, or --duration after the last session started
                  streaming; held = the most sessions streaming through a window in
                  budget
    reload-storm  --sessions join (10 % of them reloaders); once all stream and have
                  heard a reply (a cycle and its first block), --duration alternates
                  calm phases
                  (nobody reloads) and storm phases (the reloaders reload at
                  --reload-rate each), about 5 s each; the streamers' p99 lateness in
                  the storm phases is compared with the calm ones
    churn         --sessions workers run connect / reload / disconnect cycles until
                  --cycles are done or --duration has passed; the server's RSS is
                  taken idle after a warm-up and again at the end

Each returns an ``Outcome``; ``run.py`` turns it into the ``Result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from scripts import measure
from scripts.loadtest.audio import Cycle
from scripts.loadtest.characters import Directories
from scripts.loadtest.monitor import WINDOW, Monitor
from scripts.loadtest.result import AdminSnapshot, Capacity, Churn, ReloadStorm, Window
from scripts.loadtest.roles import (
    Reloader,
    churn_cycle,
    churn_owner,
    open_or_none,
    reloader_count,
    reloader_owner,
    stagger,
)
from scripts.loadtest.server import Target
from scripts.loadtest.sessions import Failed, Run, Session
from scripts.loadtest.stats import Budget, rounded
from scripts.measure import percentile

PHASE = 5.0
"""Seconds of one calm or storm phase of the reload storm, about."""
MIN_FRAMES = 50
"""Frames a window needs before its p99 is judged."""
LATENESS_BUDGET_MS = 20.0
STORM_GROWTH_BUDGET_MS = 5.0
CPU_PER_SESSION_BUDGET = 0.35
"""% of a core, the server process, per streaming session (compression negotiated)."""
CAPACITY_BUDGET = 200
CHURN_BUDGET = 10_000


@dataclass
class Outcome:
    sessions_held: int
    measured: list[tuple[float, float]]
    """The parts of the run (seconds) whose lateness and reply figures are reported."""
    load_at: float
    """When the load was at its reported level (for memory)."""
    budgets: list[Budget] = field(default_factory=list)
    baseline: list[tuple[float, float]] | None = None
    capacity: Capacity | None = None
    reload_storm: ReloadStorm | None = None
    churn: Churn | None = None
    """The scenario's own section of the result (one of the three)."""
    admin: AdminSnapshot | None = None


@dataclass
class Context:
    run: Run
    target: Target
    cycle: Cycle
    directories: Directories
    rng: random.Random
    monitor: Monitor
    sessions: int
    duration: float
    ramp: float
    reload_fraction: float = 0.1
    reload_rate: float = 1.0
    cycles: int = CHURN_BUDGET


# ── helpers ──────────────────────────────────────────────────────────────────


async def _until(run: Run, at: float, stop: asyncio.Event | None = None) -> None:
    """Sleep until run time ``at``, or until ``stop`` is set."""
    delay = at - run.now()
    if delay <= 0:
        return
    if stop is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await stop.wait()


async def admin_snapshot(ctx: Context) -> AdminSnapshot | None:
    """What the server's admin API says about the live sessions: how many, and the
    median PSS of their sandbox children (the server's own reading)."""
    asked = time.monotonic()
    sessions = await ctx.target.admin_sessions(ctx.run.http)
    if sessions is None:
        return None
    pss = [s["sandbox_pss_kb"] / 1024 for s in sessions if s.get("sandbox_pss_kb")]
    median = percentile(pss, 50)
    return AdminSnapshot(len(sessions), rounded(median),
                         round((time.monotonic() - asked) * 1000, 1))


async def _close_all(sessions: list[Session]) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


def lateness_budget(ctx: Context, windows: list[tuple[float, float]], who: str) -> Budget:
    late = ctx.run.recorder.frame_lateness_ms.within(windows)
    p99 = percentile(late, 99)
    return Budget(f"p99 audio-frame lateness ({who})",
                  round(p99, 2) if p99 is not None and len(late) >= MIN_FRAMES else None,
                  LATENESS_BUDGET_MS,
                  note="" if len(late) >= MIN_FRAMES else f"only {len(late)} frames")


class Streamers:
    """Sessions that join at their offsets and stream until ``stop``, each starting
    at a random point of the speech cycle (``phases``)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stop = asyncio.Event()
        self.sessions: list[Session] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.phases: list[float] = []

    def start(self, offsets: list[float], begin: float,
              role: Callable[[int, Session], Awaitable[None]] | None = None) -> None:
        """Session ``i`` joins at ``begin + offsets[i]``; ``role`` (default: stream)
        is what it does once open."""
        self.phases = [self.ctx.rng.uniform(0, self.ctx.cycle.period) for _ in offsets]
        for index, offset in enumerate(offsets):
            self.tasks.append(asyncio.create_task(
                self._one(index, begin + offset, role), name=f"loadtest-session-{index}"))

    async def _one(self, index: int, at: float,
                   role: Callable[[int, Session], Awaitable[None]] | None) -> None:
        ctx = self.ctx
        await _until(ctx.run, at, self.stop)
        if self.stop.is_set():
            return
        session = await open_or_none(ctx.run)
        if session is None:
            return
        self.sessions.append(session)
        try:
            if role is None:
                await session.stream(ctx.cycle, self.stop, self.phases[index])
            else:
                await role(index, session)
        except Exception as exc:  # a defect here: counted, never a silent end
            ctx.run.error("client.session_failed", repr(exc), session.id)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await _close_all(self.sessions)


# ── capacity ─────────────────────────────────────────────────────────────────


async def capacity(ctx: Context) -> Outcome:
    run, recorder = ctx.run, ctx.run.recorder
    offsets = stagger(ctx.sessions, ctx.ramp, ctx.rng)
    begin = run.now()
    streamers = Streamers(ctx)
    streamers.start(offsets, begin)
    hold_until = begin + offsets[-1] + ctx.cycle.period + ctx.duration
    windows: list[Window] = []
    misses, reason = 0, f"held {ctx.sessions} sessions for --duration {ctx.duration:g} s"
    start = begin
    try:
        while True:
            end = start + WINDOW
            held = recorder.streaming
            counts = [held]
            while run.now() < end:
                await asyncio.sleep(min(0.25, max(0.0, end - run.now())))
                held = min(held, recorder.streaming)
                counts.append(recorder.streaming)
            late = recorder.frame_lateness_ms.between(start, end)
            errors = recorder.errors_between(start, end)
            p99 = percentile(late, 99)
            judged = len(late) >= MIN_FRAMES or errors > 0
            ok = judged and errors == 0 and p99 is not None and p99 <= LATENESS_BUDGET_MS
            windows.append(Window(round(start, 2), round(end, 2), held,
                                  round(sum(counts) / len(counts), 1), len(late), errors,
                                  rounded(p99), ok if judged else None,
                                  ctx.monitor.cpu_between(start, end)))
            misses = 0 if ok else misses + (1 if judged else 0)
            if misses >= 2:
                reason = ("frame lateness p99 above 20 ms or errors in two windows in a row "
                          f"at {held} sessions")
                break
            if end >= hold_until:
                break
            start = end
        admin = await admin_snapshot(ctx)
    finally:
        await streamers.finish()
    good = [w for w in windows if w.ok]
    best = max(good, key=lambda w: (w.held, -w.start)) if good else None
    measured = (best.start, best.end) if best else (begin, run.now())
    held = best.held if best else 0
    per_session, at_one_core = cpu_per_session(windows)
    assessed = ctx.sessions >= CAPACITY_BUDGET
    budget = Budget(
        "sessions streaming in real time, p99 frame lateness <= 20 ms",
        held if assessed else None, CAPACITY_BUDGET, at_most=False, unit="sessions",
        note="" if assessed else f"--sessions {ctx.sessions} < {CAPACITY_BUDGET}: not assessed")
    no_errors = Budget("errors", sum(recorder.errors.values()), 0, unit="",
                       note="any code, the whole run")
    return Outcome(
        sessions_held=held, measured=[measured], load_at=measured[1],
        budgets=[budget, no_errors],
        capacity=Capacity(held, reason, per_session, at_one_core, WINDOW, windows), admin=admin,
    )


def cpu_per_session(windows: list[Window]) -> tuple[float | None, int | None]:
    """The server's CPU (% of one core) per streaming session, the slope of a line
    fitted through the windows; and where that line reaches one whole core, the most
    a single event loop could carry if nothing else ran (an upper bound that other
    load on the machine does not move much, unlike the lateness)."""
    points = [(w.streaming_mean, w.cpu_percent["server"]) for w in windows
              if w.streaming_mean > 0 and "server" in w.cpu_percent]
    if len({x for x, _ in points}) < 2:
        return None, None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], 1)
    return (round(float(slope), 3),
            round(float((100 - intercept) / slope)) if slope > 0 else None)


# ── reload storm ─────────────────────────────────────────────────────────────


def storm_phases(start: float, duration: float) -> list[tuple[str, float, float]]:
    """Calm and storm phases alternating over ``duration`` from ``start``, calm first:
    pairs of PHASE seconds each (at least one pair), so that a change in the machine's
    background load falls on both sides of the comparison."""
    pairs = max(1, round(duration / (2 * PHASE)))
    length = duration / (2 * pairs)
    return [(("calm", "storm")[i % 2], start + i * length, start + (i + 1) * length)
            for i in range(2 * pairs)]


async def reload_storm(ctx: Context) -> Outcome:
    run, recorder = ctx.run, ctx.run.recorder
    reloading = set(ctx.rng.sample(range(ctx.sessions),
                                   reloader_count(ctx.sessions, ctx.reload_fraction)))
    storming = asyncio.Event()
    streamers = Streamers(ctx)

    async def role(index: int, session: Session) -> None:
        if index not in reloading:
            await session.stream(ctx.cycle, streamers.stop, streamers.phases[index])
            return
        reloader = Reloader(session, reloader_owner(index), ctx.directories, ctx.reload_rate,
                            random.Random(ctx.rng.random()))
        await reloader.run(storming, streamers.stop)

    offsets = stagger(ctx.sessions, ctx.ramp, ctx.rng)
    begin = run.now()
    streamers.start(offsets, begin, role)
    # Every streamer has started (within a cycle of joining) and heard a reply.
    warmed = begin + offsets[-1] + ctx.cycle.period + ctx.cycle.first_block + 1.0
    phases = storm_phases(warmed, ctx.duration)
    try:
        for kind, _, end in phases:
            if kind == "storm":
                storming.set()
            else:
                storming.clear()
            await _until(run, end)
        held = recorder.sessions_open
        storming.clear()
        admin = await admin_snapshot(ctx)
    finally:
        storming.clear()
        await streamers.finish()
    calm = [(a, b) for kind, a, b in phases if kind == "calm"]
    stormy = [(a, b) for kind, a, b in phases if kind == "storm"]
    quiet = ctx.run.recorder.frame_lateness_ms
    before, during = percentile(quiet.within(calm), 99), percentile(quiet.within(stormy), 99)
    growth = round(during - before, 2) if before is not None and during is not None else None
    reloads = recorder.reload_ms.values
    streaming = ctx.sessions - len(reloading)
    server_cpu = ctx.monitor.server_cpu_within(calm)
    per_session = (round(server_cpu / streaming, 3)
                   if server_cpu is not None and streaming else None)
    budgets = [
        lateness_budget(ctx, stormy, "the others, during the storm"),
        Budget("growth of that p99 over the calm phases", growth, STORM_GROWTH_BUDGET_MS),
        Budget("reload p50, 20-character directory, client-observed",
               rounded(percentile(reloads, 50)), 30.0,
               note="during the storm, beside the streaming sessions"),
        Budget("reload p99, 20-character directory, client-observed",
               rounded(percentile(reloads, 99)), 100.0,
               note="during the storm, beside the streaming sessions"),
        Budget("errors", sum(recorder.errors.values()), 0, unit="",
               note="any code, the whole run"),
        Budget("server CPU per streaming session", per_session, CPU_PER_SESSION_BUDGET,
               unit="% of a core", binding=False,
               note="calm phases, " + ("compression negotiated" if ctx.run.compress
                                       else "compression off: not the budget's condition")),
    ]
    return Outcome(
        sessions_held=held, measured=stormy, baseline=calm, load_at=phases[-1][2],
        budgets=budgets,
        reload_storm=ReloadStorm(
            reloading_sessions=len(reloading), reload_rate_per_session=ctx.reload_rate,
            phases_s=[(kind, round(a, 2), round(b, 2)) for kind, a, b in phases],
            lateness_p99_calm_ms=rounded(before), lateness_p99_storm_ms=rounded(during),
            growth_ms=growth, server_cpu_percent_calm=server_cpu,
            server_cpu_percent_per_streaming_session=per_session),
        admin=admin,
    )


# ── churn ────────────────────────────────────────────────────────────────────


async def churn(ctx: Context, http: aiohttp.ClientSession, baseline_children: int | None,
                ) -> Outcome:
    run, recorder, target = ctx.run, ctx.run.recorder, ctx.target
    counter = itertools.count()
    deadline = run.now() + ctx.duration
    warm = min(ctx.cycles, max(50, ctx.cycles // 50))
    done = 0

    async def worker(index: int, limit: int) -> None:
        nonlocal done
        owner = churn_owner(index)
        paths = ctx.directories.per_owner[owner]
        while run.now() < deadline and (number := next(counter)) < limit:
            with contextlib.suppress(Failed):  # counted where it was seen
                await churn_cycle(run, owner, paths[number % len(paths)], ctx.directories)
            done += 1

    started = run.now()
    await asyncio.gather(*(worker(i, warm) for i in range(ctx.sessions)))
    counter = itertools.count(done)
    await target.settle(http, baseline_children)
    rss_warm = measure.rss_mb(target.pid) if target.pid else None
    warm_at = run.now()
    await asyncio.gather(*(worker(i, ctx.cycles) for i in range(ctx.sessions)))
    elapsed = run.now() - started
    settled = await target.settle(http, baseline_children)
    rss_end = measure.rss_mb(target.pid) if target.pid else None
    series = leftover_series(await _metrics(target, http), await live_labels(ctx, settled))
    drift = (round((rss_end - rss_warm) / rss_warm * 100, 2)
             if rss_warm and rss_end is not None else None)
    rate = done / elapsed if elapsed > 0 else 0.0
    budgets = [
        Budget("connect/reload/disconnect cycles", done if ctx.cycles >= CHURN_BUDGET and
               done >= CHURN_BUDGET else None, CHURN_BUDGET, at_most=False, unit="cycles",
               note="" if done >= CHURN_BUDGET else
               f"{done} cycles run ({rate:.1f}/s; {CHURN_BUDGET} would take "
               f"{CHURN_BUDGET / rate / 60:.1f} min)" if rate else "no cycle completed"),
        Budget("leftover per-session metric series", series, 0, unit="series"),
        Budget("server RSS drift after the warm-up", drift, 5.0, unit="%"),
        Budget("errors", sum(recorder.errors.values()), 0, unit=""),
    ]
    return Outcome(
        sessions_held=ctx.sessions, measured=[(started, run.now())], load_at=warm_at,
        budgets=budgets,
        churn=Churn(
            cycles_requested=ctx.cycles, cycles_done=done, warm_up_cycles=min(warm, done),
            concurrency=ctx.sessions, cycles_per_second=round(rate, 2),
            elapsed_s=round(elapsed, 1),
            extrapolated_s_for_10000=round(CHURN_BUDGET / rate, 1) if rate else None,
            rss_after_warm_up_mb=rounded(rss_warm), rss_at_end_mb=rounded(rss_end),
            rss_drift_percent=drift, leftover_metric_series=series,
            sessions_seen=len(recorder.session_ids)),
    )


async def _metrics(target: Target, http: aiohttp.ClientSession) -> str | None:
    try:
        return await target.metrics(http)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


_SERIES = re.compile(r'^[a-z_]+\{[^}]*session_id="([^"]+)"', re.MULTILINE)


def leftover_series(metrics: str | None, live: set[str] | None) -> int | None:
    """Per-session Prometheus series (samples with a ``session_id`` label) whose
    label is not that of a live session (``live``); None when either is unknown.
    The label is the session's ordinal in the server process, not its id, so a
    series cannot be traced back to one of our sessions once it has closed: what
    no live session owns is left over."""
    if metrics is None or live is None:
        return None
    return sum(1 for match in _SERIES.finditer(metrics) if match[1] not in live)


async def live_labels(ctx: Context, health: dict[str, Any]) -> set[str] | None:
    """The ``session_id`` labels of the sessions open on the settled server: none
    when ``/v1/health`` counts none; else from the admin API (``metrics_label``), or
    None without it (another client's sessions cannot be told from leftovers)."""
    if health.get("sessions", {}).get("active") == 0:
        return set()
    sessions = await ctx.target.admin_sessions(ctx.run.http)
    if sessions is None:
        return None
    return {str(s["metrics_label"]) for s in sessions if s.get("metrics_label") is not None}
