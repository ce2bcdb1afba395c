"""One load test run, start to end (``python -m scripts.loadtest``; see the package's
docstring for what it measures).

    prepare()  the speech cycle (synthesised once per machine), the directories
    execute()  start the fakes and the server (--spawn-server) or find it (--url),
               measure_run(): the monitor, the scenario, the server settled, then
               assemble() the Result; stop what was started, by pid
    main()     write the JSON file and the charts, print the table; the exit status
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

from scripts import measure
from scripts.client import CannotStart
from scripts.loadtest.audio import (
    INTERRUPTION,
    PHRASE,
    Cycle,
    build_cycle,
    interruption_offsets,
    load_speech,
    synthesized_speech,
    words_of,
)
from scripts.loadtest.characters import Directories
from scripts.loadtest.cli import parse_args
from scripts.loadtest.monitor import Monitor, Profiler
from scripts.loadtest.report import table, write_html, write_json
from scripts.loadtest.result import Clients, Orphan, Parameters, Result
from scripts.loadtest.result import Target as TargetSummary
from scripts.loadtest.roles import churn_owner, loop_lag, reloader_owner
from scripts.loadtest.scenarios import Context, Outcome, capacity, churn, reload_storm
from scripts.loadtest.server import ServerProblem, Spawned, Target
from scripts.loadtest.sessions import COMPRESSION, Run
from scripts.loadtest.stats import Budget, Recorder, passed, quantiles, summary

MEMORY_BUDGET_MB = 10.0
SESSION_START_BUDGET_MS = 20.0


def log(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


def raise_file_limit(sessions: int) -> None:
    """Each session holds a few sockets and pipes in each process (this one, the
    server, the fakes): raise the soft limit to the hard one, which children inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = sessions * 8 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard != resource.RLIM_INFINITY and hard < wanted:
            log(f"the open-file limit ({hard}) may be too low for {sessions} sessions")


def write_directories(args: argparse.Namespace, root: Path) -> Directories:
    directories = Directories(root)
    if args.scenario == "churn":
        owners = [churn_owner(i) for i in range(args.sessions)]
    elif args.scenario == "reload-storm":
        # Every session may be drawn as a reloader: the draw happens in the scenario.
        owners = [reloader_owner(i) for i in range(args.sessions)]
    else:
        owners = []
    for owner in owners:
        directories.write(owner, args.characters)
    return directories


@dataclass
class Prepared:
    """What a run needs before it starts: the speech cycle and the directories."""

    cycle: Cycle
    workdir: Path
    """The run's own temp directory: the spawned server's allowed root, and where the
    character directories are written; removed at the end."""
    directories: Directories


def prepare(args: argparse.Namespace, rng: random.Random) -> Prepared:
    """Make the speech (once per machine), lay out the cycle (interruption offsets
    drawn from ``rng``) and write the character directories. Raises ``CannotStart``
    for a ``--wav`` that cannot be read."""
    question = load_speech(args.wav or synthesized_speech(), words_of(PHRASE))
    if args.interruptions:
        interruption = (question if args.wav else
                        load_speech(synthesized_speech(INTERRUPTION), words_of(INTERRUPTION)))
        cycle = build_cycle(question, args.audio_lead, interruption, interruption_offsets(rng))
    else:
        cycle = build_cycle(question, args.audio_lead)
    base = args.characters_root or Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="troupe-loadtest-", dir=base)).resolve()
    try:
        return Prepared(cycle, workdir, write_directories(args, workdir))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


async def execute(args: argparse.Namespace, prepared: Prepared, rng: random.Random) -> Result:
    """One run against the server: start it if asked, run the scenario, stop what
    was started; returns the result. Raises ``ServerProblem``."""
    raise_file_limit(args.sessions)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    spawned: Spawned | None = None
    orphans: list[measure.Leftover] = []
    try:
        if args.spawn_server:
            spawned = Spawned(prepared.workdir, prepared.cycle.stt_script(),
                              args.sessions + 16, args.audio_lead, args.server_arg,
                              args.json.with_suffix(".server.log"))
            log(f"starting the fake backends and python -m server (log {spawned.log_path})")
            target = await spawned.start(http)
        else:
            target = Target(args.url, os.environ.get("TROUPE_ADMIN_TOKEN") or None)
            await target.locate(http)
        log(f"{args.scenario} against {target.ws_url}"
            + ("" if target.pid else " (not one local process: no /proc figures)"))
        result = await measure_run(args, target, prepared.cycle, prepared.directories, rng,
                                   http, spawned.fakes_pid if spawned else None)
    finally:
        if spawned is not None:
            orphans = await spawned.stop()
        await http.close()
    if spawned is None:
        return result
    budget = Budget("processes outliving the stopped server", len(orphans), 0, unit="")
    return msgspec.structs.replace(
        result, orphan_processes=len(orphans),
        orphan_details=[Orphan(left.pid, left.cmdline) for left in orphans],
        budgets=[*result.budgets, budget.line()], passed=result.passed and not orphans)


async def measure_run(args: argparse.Namespace, target: Target, cycle: Cycle,
                      directories: Directories, rng: random.Random,
                      http: aiohttp.ClientSession, fakes_pid: int | None) -> Result:
    """The monitor and the scenario, between two looks at the idle server."""
    recorder = Recorder()
    run = Run(http, target.ws_url, recorder, time.monotonic(), args.audio_lead, args.timeout,
              COMPRESSION if args.compression else 0)
    monitor = Monitor(run, target, args.scenario, args.sessions, fakes_pid,
                      progress=not args.quiet)
    idle = await target.settle(http, None)
    before = measure.footprint(target.pid) if target.pid else None
    ctx = Context(run, target, cycle, directories, rng, monitor, args.sessions,
                  args.duration, args.ramp, args.reload_fraction, args.reload_rate,
                  args.cycles)
    profiler = Profiler(args.profile, target.pid) if args.profile and target.pid else None
    if args.profile and profiler is None:
        log("--profile needs a server process on this machine; not profiling")
    stop_lag = asyncio.Event()
    lag = asyncio.create_task(loop_lag(run, stop_lag))
    monitor.start()
    if profiler is not None:
        await profiler.start()
    started = run.now()
    try:
        if args.scenario == "capacity":
            outcome = await capacity(ctx)
        elif args.scenario == "reload-storm":
            outcome = await reload_storm(ctx)
        else:
            outcome = await churn(ctx, http, before.children if before else None)
    finally:
        profiled = await profiler.stop() if profiler is not None else False
        stop_lag.set()
        await lag
        await monitor.stop()
    ended = run.now()
    settled = await target.settle(http, before.children if before else None)
    after = measure.footprint(target.pid) if target.pid else None
    warm = settled.get("sandbox", {}).get("warm")
    result = assemble(args, target, cycle, outcome, recorder, monitor, before, after,
                      (started, ended), warm if isinstance(warm, int) else 0)
    return msgspec.structs.replace(
        result, server_health_before=idle.get("sandbox"),
        server_health_after=settled.get("sandbox"),
        profile=str(args.profile) if profiled else None)


def assemble(args: argparse.Namespace, target: Target, cycle: Cycle, outcome: Outcome,
             recorder: Recorder, monitor: Monitor, before: measure.Footprint | None,
             after: measure.Footprint | None, span: tuple[float, float],
             warm: int = 0) -> Result:
    """The result: what the JSON file holds and the report shows. ``warm``: children
    the settled server keeps warm on purpose, not counted as leftovers."""
    lateness = recorder.frame_lateness_ms.within(outcome.measured)
    first_audio = recorder.first_audio_ms.within(outcome.measured)
    baseline = (recorder.frame_lateness_ms.within(outcome.baseline)
                if outcome.baseline else None)
    at_load = monitor.pss_near(outcome.load_at)
    sessions = at_load.sessions_open if at_load is not None else 0
    server_rss = server_pss = pss_per_session = memory_per_session = None
    if at_load is not None and before is not None:
        server_rss, server_pss = at_load.server_rss_mb, at_load.server_pss_mb
        if sessions > 0 and at_load.sandbox_pss_mb is not None and server_pss is not None:
            pss_per_session = round((at_load.sandbox_pss_mb - before.children_pss_mb)
                                    / sessions, 2)
            memory_per_session = round(
                (at_load.sandbox_pss_mb + server_pss
                 - before.children_pss_mb - before.server_pss_mb) / sessions, 2)
    leftover = (max(0, after.children - before.children - warm)
                if before is not None and after is not None else None)
    start = recorder.session_start_ms.values
    turns = recorder.turns
    streaming = args.scenario in ("capacity", "reload-storm")
    budgets = [
        Budget("isolation violations", recorder.violations, 0, unit=""),
        Budget("reload answers that were not exactly the directory asked for",
               recorder.mismatches, 0, unit=""),
        *outcome.budgets,
        *([Budget("turns without a reply (superseded + unanswered)",
                  turns.without_reply if turns.asked else None, 0, unit="",
                  note=f"of {turns.asked} asked")] if streaming else []),
        Budget("leftover processes after every session closed", leftover, 0, unit=""),
        Budget("session start to default characters listed, p50",
               summary(start).p50, SESSION_START_BUDGET_MS, binding=False,
               note="under this run's load; make bench measures the budget idle"),
        Budget("memory per session (server + sandbox PSS)", memory_per_session,
               MEMORY_BUDGET_MB, unit="MB", binding=False,
               note="sessions busy, not idle; make bench measures the idle budget"),
    ]
    distributions = {
        "reload_ms": quantiles(recorder.reload_ms.values),
        "session_start_ms": quantiles(start),
        "first_audio_ms": quantiles(first_audio),
        "frame_lateness_ms": quantiles(lateness),
        "interrupted_at_ms": quantiles(recorder.interrupted_at_ms.values),
    }
    if baseline:
        distributions["frame_lateness_baseline_ms"] = quantiles(baseline)
    return Result(
        scenario=args.scenario,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        target=TargetSummary(target.ws_url, target.spawned is not None, target.pid),
        parameters=Parameters(
            sessions=args.sessions, duration_s=args.duration, ramp_per_s=args.ramp,
            reload_fraction=args.reload_fraction, reload_rate_per_s=args.reload_rate,
            cycles=args.cycles, characters_per_directory=args.characters, seed=args.seed,
            audio_lead_s=args.audio_lead, timeout_s=args.timeout,
            speech_cycle_s=round(cycle.period, 2), interruptions=args.interruptions,
            compression=args.compression),
        clients=Clients(
            interruptions=args.interruptions,
            interruptions_per_cycle=len(cycle.interruptions),
            interruption_offsets_s=list(cycle.interruptions),
            compression="permessage-deflate" if args.compression else None,
            sessions_with_compression=recorder.compressed,
            sessions_refused_compression=recorder.uncompressed),
        sessions_requested=args.sessions,
        sessions_held=outcome.sessions_held,
        sessions_opened=recorder.sessions_opened,
        isolation_violations=recorder.violations,
        reload_mismatches=recorder.mismatches,
        answers_checked=recorder.reloads_checked,
        reload_ms=summary(recorder.reload_ms.values),
        reload_server_ms=summary(recorder.reload_server_ms.values),
        session_start_ms=summary(start),
        session_created_ms=summary(recorder.session_created_ms.values),
        first_audio_ms=summary(first_audio),
        frame_lateness_ms=summary(lateness),
        frame_lateness_baseline_ms=summary(baseline) if baseline is not None else None,
        client_loop_lag_ms=summary(recorder.client_lag_ms.between(*span)),
        measured_s=[(round(a, 2), round(b, 2)) for a, b in outcome.measured],
        errors_by_code=dict(sorted(recorder.errors.items())),
        error_examples=recorder.error_examples,
        isolation_details=recorder.violation_examples,
        mismatch_details=recorder.mismatch_examples,
        responses=dict(sorted(recorder.responses.items())),
        interruptions_made=recorder.interruptions,
        interruptions_missed=recorder.interruptions_missed,
        questions_over_late_replies=recorder.talked_over,
        interrupted_at_ms=summary(recorder.interrupted_at_ms.values),
        turns=turns,
        stale_frames=recorder.stale_frames,
        leftover_processes=leftover,
        warm_children_at_end=warm,
        server_rss_mb=server_rss,
        server_pss_mb=server_pss,
        server_rss_mb_idle=round(before.server_rss_mb, 1) if before else None,
        server_rss_mb_after=round(after.server_rss_mb, 1) if after else None,
        sandbox_pss_mb_idle=round(before.children_pss_mb, 1) if before else None,
        sandbox_pss_mb_at_load=at_load.sandbox_pss_mb if at_load else None,
        sandbox_pss_mb_per_session=pss_per_session,
        memory_mb_per_session=memory_per_session,
        sessions_at_memory_reading=sessions,
        cpu_percent=monitor.cpu_between(outcome.measured[0][0], outcome.measured[-1][1]),
        budgets=[budget.line() for budget in budgets],
        passed=passed(budgets),
        distributions=distributions,
        timeline=monitor.timeline,
        duration_s=round(span[1] - span[0], 1),
        server_health_before=None,
        server_health_after=None,
        capacity=outcome.capacity,
        reload_storm=outcome.reload_storm,
        churn=outcome.churn,
        admin_api_at_end=outcome.admin,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    try:
        prepared = prepare(args, rng)
    except CannotStart as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(execute(args, prepared, rng))
    except ServerProblem as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(prepared.workdir, ignore_errors=True)
    write_json(result, args.json)
    write_html(result, args.plot)
    print(table(result))
    print(f"\nJSON: {args.json}\ncharts: {args.plot}"
          + (f"\nprofile: {result.profile}" if result.profile else ""))
    return 0 if result.passed else 1
