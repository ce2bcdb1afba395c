"""Troupe's load test: how many sessions one server process holds, what reloads cost
under load, and that sessions never see each other's characters (DESIGN.md §8).

Run it from the checkout (``make loadtest ARGS="..."``)::

    .venv/bin/python -m scripts.loadtest --spawn-server                     # reload-storm
    .venv/bin/python -m scripts.loadtest --spawn-server --scenario capacity --sessions 300
    .venv/bin/python -m scripts.loadtest --spawn-server --scenario churn --duration 900
    .venv/bin/python -m scripts.loadtest --url ws://127.0.0.1:8000/v1/realtime?model=lt \\
        --characters-root /srv/characters/loadtest --scenario reload-storm

``--spawn-server`` starts, on 127.0.0.1, the test suite's protocol-faithful fake
backends (Kyutai STT and TTS, an OpenAI-compatible LLM: ``scripts/loadtest_fakes.py``)
and ``python -m server`` pointed at them, with a temporary allowed root holding the
generated character directories; everything it starts is stopped by pid at the end.
Without it, ``--url`` names a running server (default: the local ``make run`` one);
reload scenarios then need ``--characters-root``, a directory inside one of that
server's ``--allowed-root``s, where the character directories are written (and
removed afterwards). Only loopback addresses are accepted unless
``--allow-non-loopback``. Server memory, CPU and leftover processes are read from
``/proc`` when the server is a process on this machine; with ``TROUPE_ADMIN_TOKEN``
set to the server's admin token, the end of the measured part also asks
``/v1/sessions`` for the live sessions and their sandboxes' memory.

What a session does (GA dialect, ``?model=``): it connects, offering
``permessage-deflate`` as browsers and the ``websockets`` library (the ``openai``
SDK's transport) do (``--no-compression``: it does not), waits for
``session.created`` and lists its default characters (session start). A streaming
session then sends real speech in real time, 80 ms of 24 kHz pcm16 at a time, in a
loop (``scripts/loadtest_audio.py``): a question synthesised once by the embedded
piper voice and cached under the system temp directory (``--wav`` to use another
file); the character's reply, which the person interrupts (a shorter utterance
spoken over it, starting at a moment drawn per run, different in each of the
cycle's two blocks); the reply to the interruption, heard to the end; silence. The
server's turn-taking answers each utterance, cancels the reply spoken over
(``response.done`` cancelled) and the session receives the reply audio. With
``--no-interruptions`` the cycle is one question and its whole reply. A reloading
session reloads its own generated directories (``scripts/loadtest_characters.py``:
20 characters each, some sharing file names with every other session's) and checks
that both the reload's answer and a list right after it name exactly the
directory's characters: any character of another session's set is an isolation
violation, printed with its details.

Scenarios (``--scenario``; what ``--sessions``, ``--duration`` and ``--ramp`` mean):

- ``capacity``: streaming sessions join at ``--ramp`` a second, up to ``--sessions``;
  each 5 s window is judged (p99 frame lateness ≤ 20 ms, no error); the run stops after
  two windows in a row out of budget, or ``--duration`` after the last session started
  streaming. Sessions held = the most sessions streaming through a whole window within
  budget.

Every streaming session starts at a random point of the speech cycle (it waits up to
one cycle after joining), so replies are spread over time however fast the ramp.
- ``reload-storm``: ``--sessions`` join at ``--ramp``; ``--reload-fraction`` (10 %) of
  them reload at ``--reload-rate`` each while the rest stream. After two cycles of
  warm-up, ``--duration`` alternates calm phases (nobody reloads) and storm phases,
  about 5 s each, so that the machine's background load falls on both sides; the
  budget compares the streamers' p99 lateness in the storm phases with the calm ones.
- ``churn``: ``--sessions`` workers run connect / reload / disconnect cycles until
  ``--cycles`` (10 000) are done or ``--duration`` has passed; then leftover
  processes, leftover per-session metric series, and the drift of the server's RSS
  from after the warm-up (the first 2 %, at least 50 cycles) to the end, both taken
  with the server idle.

Figures (milliseconds; percentiles interpolate between ranks):

- reload: from sending ``session.characters.reload`` to ``.reloaded``.
- session start: from opening the WebSocket to ``session.characters.listed``.
- first audio: from sending the last 80 ms of an utterance to the first
  ``response.output_audio.delta`` of the reply to its turn.
- audio-frame lateness, per reply frame k after the first (t0 = the first frame's
  arrival, S_k = samples before frame k, lead = the server's ``--audio-lead``)::

      lateness_k = max(0, arrival_k - (t0 + max(0, S_k / 24000 - lead)))

  The server sends the first ``lead`` seconds of a reply at once and every later
  frame ``lead`` ahead of real time, so an on-time frame has lateness 0. A reply cut
  short by an interruption just stops: its frames count up to its
  ``response.done``, frames arriving after it are only tallied (``stale_frames``).
  Measured in this process: "load generator lag" (how late its own event loop
  wakes) says how much of it may be the load generator's own.
- memory: server RSS (and PSS), the PSS of every process below the server (fork
  server and sandbox children), per session = (that at full load − the idle server
  before the run) / sessions. Leftover processes = processes below the server once
  every session has closed and the server has settled, minus those before the run
  and the children it keeps warm on purpose (``/v1/health``'s ``sandbox.warm``:
  directories loaded twice recently, kept loaded for the next load).
- CPU: % of one core per process group, from ``/proc``, and "other processes": the
  rest of the machine's busy time. The spawned fakes and this load generator share
  the machine with the server (about 0.45 % of a core per streaming session between
  them on the 2-core dev machine), and anything else running there shows up as
  lateness: compare the figures of runs whose "other processes" share was low.

Output: a progress line on stderr; at the end a summary table on stdout with each
budget of DESIGN.md §8 this scenario measures; a JSON file with every figure
(``--json``, default ``bench-results/loadtest-SCENARIO.json``) and a self-contained
HTML page of charts (``--plot``, default ``bench-results/loadtest-SCENARIO.html``);
with ``--spawn-server``, the server's and the fakes' output goes beside the JSON file
(``….server.log``).
``--profile FILE`` also records the server with py-spy while the load runs (``.svg``:
flame graph, ``.json``: speedscope, else raw collapsed stacks).

The JSON file's top level: ``scenario``, ``sessions_requested``, ``sessions_held``,
``isolation_violations`` (count), ``reload_mismatches``, ``reload_ms``,
``session_start_ms``, ``session_created_ms``, ``first_audio_ms``,
``frame_lateness_ms`` (each ``{count, p50, p95, p99, max, mean}``),
``errors_by_code`` (server codes, and ``client.*`` for what the client saw: a refused
connection, a close code, a timeout), ``clients`` (whether sessions interrupted and
offered compression, how many negotiated it, the interruption offsets),
``interruptions_made``, ``interruptions_missed`` (found no reply going),
``questions_over_late_replies``, ``interrupted_at_ms`` (reply audio received when
each interruption began),
``responses`` (``response.done`` by status: completed, cancelled, failed),
``turns`` (asked, answered, merged, superseded, in flight at the end, unanswered:
``scripts/loadtest_stats.Turns``), ``leftover_processes``, ``orphan_processes``,
``server_rss_mb``, ``sandbox_pss_mb_per_session``, ``memory_mb_per_session``,
``cpu_percent``, ``budgets`` (each ``{name, value, limit, comparison, unit, ok,
binding, note}``), ``passed``, the scenario's own section (``capacity``,
``reload_storm`` or ``churn``), ``distributions`` (101 percentiles per figure),
``timeline`` (one point a second) and the examples of errors and violations.

Bounded: at most 2000 sessions, 100 000 cycles and an hour; every wait for the
server is limited by ``--timeout``; the run stops by itself.

Exit status: 0 when the run completed within its budgets; 1 when a budget or the
isolation check failed, or the server could not be started or reached; 2 on bad
usage; 130 when interrupted.
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
from typing import Any

import aiohttp
from yarl import URL

from . import loadtest_proc as proc
from .client import CannotStart
from .loadtest_audio import (
    INTERRUPTION,
    PHRASE,
    Cycle,
    build_cycle,
    interruption_offsets,
    load_speech,
    synthesized_speech,
    words_of,
)
from .loadtest_characters import CHARACTERS_PER_DIRECTORY, Directories
from .loadtest_report import table, write_html, write_json
from .loadtest_scenarios import (
    Context,
    Monitor,
    Outcome,
    Profiler,
    capacity,
    churn,
    churn_owner,
    reload_storm,
    reloader_count,
    reloader_owner,
)
from .loadtest_server import ServerProblem, Spawned, Target, is_loopback
from .loadtest_sessions import COMPRESSION, Run, loop_lag
from .loadtest_stats import Budget, Recorder, passed, quantiles, summary

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime?model=loadtest"
SCENARIOS = ("capacity", "reload-storm", "churn")
DEFAULTS: dict[str, dict[str, float]] = {
    "capacity": {"sessions": 300, "ramp": 5.0},
    "reload-storm": {"sessions": 200, "ramp": 20.0},
    "churn": {"sessions": 8, "ramp": 50.0},
}
MAX_SESSIONS = 2000
MAX_CYCLES = 100_000
MAX_DURATION = 3600.0
MEMORY_BUDGET_MB = 10.0
SESSION_START_BUDGET_MS = 20.0


def log(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


# ── the command line ─────────────────────────────────────────────────────────


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.loadtest",
        description="Load-test a Troupe server: concurrent sessions streaming speech in "
        "real time, reload storms with an isolation check, connect/reload/disconnect "
        "churn. Prints a summary against the budgets of DESIGN.md section 8 and writes "
        "a JSON file and an HTML page of charts.",
        epilog="Exit status: 0 within budgets; 1 a budget or the isolation check failed, "
        "or no server; 2 bad usage. Example: make loadtest ARGS=\"--spawn-server "
        "--scenario capacity --sessions 300\"",
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="reload-storm",
                        help="what to run (default: %(default)s)")
    parser.add_argument("--sessions", type=_count(MAX_SESSIONS), metavar="N",
                        help="sessions (capacity: the most to try, default 300; "
                        "reload-storm: all of them, default 200; churn: concurrent "
                        f"cycles, default 8); at most {MAX_SESSIONS}")
    parser.add_argument("--duration", type=_seconds, default=30.0, metavar="SECONDS",
                        help="capacity: hold after the last session joined; reload-storm: "
                        "calm and storm phases together; churn: the time limit (default: "
                        "%(default)g)")
    parser.add_argument("--ramp", type=_rate, metavar="PER_SECOND",
                        help="sessions joining a second (default: capacity 5, "
                        "reload-storm 20)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help=f"a running server's realtime WebSocket, with ?model= (default: "
                       f"{DEFAULT_URL})")
    where.add_argument("--spawn-server", action="store_true",
                       help="start the server and fake backends on 127.0.0.1 for this run")
    parser.add_argument("--characters-root", type=Path, metavar="DIR",
                        help="with --url: a directory inside one of the server's "
                        "--allowed-root, where the generated character directories go")
    # Refused below: a secret on the command line is readable in /proc/<pid>/cmdline.
    parser.add_argument("--admin-token", nargs="?", const="", help=argparse.SUPPRESS)
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="accept a --url that is not a loopback address")
    parser.add_argument("--reload-fraction", type=_fraction, default=0.1, metavar="F",
                        help="reload-storm: share of sessions that reload (default: "
                        "%(default)g)")
    parser.add_argument("--reload-rate", type=_non_negative, default=1.0,
                        metavar="PER_SECOND",
                        help="reload-storm: reloads a second per reloading session, 0 for "
                        "back to back (default: %(default)g)")
    parser.add_argument("--cycles", type=_count(MAX_CYCLES), default=10_000, metavar="N",
                        help="churn: connect/reload/disconnect cycles (default: %(default)s)")
    parser.add_argument("--characters", type=_count(100), default=CHARACTERS_PER_DIRECTORY,
                        metavar="N", help="characters per generated directory (default: "
                        "%(default)s, as the reload budget's)")
    parser.add_argument("--wav", type=Path, metavar="FILE",
                        help="speech to stream instead of the synthesised phrases, for "
                        "the question and the interruption (any rate and channels); "
                        "--spawn-server's fake STT hears the question's words spread over "
                        "its voiced part")
    parser.add_argument("--no-interruptions", dest="interruptions", action="store_false",
                        help="never speak over the character's reply (by default sessions "
                        "interrupt twice a cycle, as people do)")
    parser.add_argument("--no-compression", dest="compression", action="store_false",
                        help="do not offer permessage-deflate (by default sessions offer "
                        "it, as browsers and the openai SDK's websockets do)")
    parser.add_argument("--audio-lead", type=_non_negative, default=0.5, metavar="SECONDS",
                        help="the server's --audio-lead (given to a spawned server; "
                        "default: %(default)g)")
    parser.add_argument("--timeout", type=_seconds, default=20.0, metavar="SECONDS",
                        help="longest wait for any one answer (default: %(default)g)")
    parser.add_argument("--seed", type=int, default=1, metavar="N",
                        help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="the JSON file (default: bench-results/loadtest-SCENARIO.json)")
    parser.add_argument("--plot", type=Path, metavar="PATH",
                        help="the HTML page of charts (default: "
                        "bench-results/loadtest-SCENARIO.html)")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="record the server with py-spy while the load runs "
                        "(.svg flame graph, .json speedscope, else raw stacks)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="with --spawn-server: one more option for python -m server, "
                        "e.g. --server-arg=--sandbox-pool-size=4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def _count(most: int) -> Any:
    def parse(value: str) -> int:
        number = int(value)
        if not 1 <= number <= most:
            raise argparse.ArgumentTypeError(f"must be between 1 and {most}, got {value}")
        return number
    parse.__name__ = "count"
    return parse


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_DURATION:g}")
    return seconds


def _rate(value: str) -> float:
    rate = float(value)
    if not 0 < rate <= 500:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 500 a second")
    return rate


def _non_negative(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and complete the options; exits with status 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.scenario]
    args.sessions = args.sessions or int(defaults["sessions"])
    args.ramp = args.ramp or defaults["ramp"]
    args.json = args.json or Path("bench-results") / f"loadtest-{args.scenario}.json"
    args.plot = args.plot or Path("bench-results") / f"loadtest-{args.scenario}.html"
    if args.plot.suffix.lower() not in (".html", ".htm"):
        parser.error(f"--plot {args.plot}: the charts are an HTML page (inline SVG); "
                     "give a path ending in .html")
    if not args.spawn_server:
        args.url = args.url or DEFAULT_URL
        url = URL(args.url)
        if url.scheme not in ("ws", "wss") or not url.host or "model" not in url.query:
            parser.error(f"--url {args.url!r} must be ws://HOST:PORT/v1/realtime?model=NAME")
        if not is_loopback(args.url) and not args.allow_non_loopback:
            parser.error(f"--url {args.url!r} is not a loopback address; load tests stay on "
                         "this machine unless --allow-non-loopback")
        if needs_directories(args) and args.characters_root is None:
            parser.error(f"--scenario {args.scenario} against --url needs --characters-root "
                         "DIR, a directory inside one of the server's --allowed-root")
        if args.server_arg:
            parser.error("--server-arg only applies with --spawn-server")
    elif args.characters_root is not None:
        parser.error("--characters-root applies to --url; --spawn-server makes its own")
    if args.admin_token is not None:
        parser.error("--admin-token is not accepted: a secret on the command line can be "
                     "read by other processes; with --url, set TROUPE_ADMIN_TOKEN in this "
                     "script's environment instead")
    if args.characters_root is not None and not args.characters_root.is_dir():
        parser.error(f"--characters-root {args.characters_root} is not a directory")
    if args.wav is not None and not args.wav.is_file():
        parser.error(f"--wav {args.wav}: no such file")
    return args


def needs_directories(args: argparse.Namespace) -> bool:
    return args.scenario == "churn" or (
        args.scenario == "reload-storm"
        and reloader_count(args.sessions, args.reload_fraction) > 0)


# ── the run ──────────────────────────────────────────────────────────────────


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


async def execute(args: argparse.Namespace, prepared: Prepared,
                  rng: random.Random) -> dict[str, Any]:
    """One run against the server: start it if asked, run the scenario, stop what
    was started; returns the result. Raises ``ServerProblem``."""
    raise_file_limit(args.sessions)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    spawned: Spawned | None = None
    target: Target | None = None
    orphans: list[dict[str, Any]] = []
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
            + ("" if target.pid else " (not a local process: no /proc figures)"))
        result = await measure(args, target, prepared.cycle, prepared.directories, rng, http,
                               spawned.fakes_pid if spawned else None)
    finally:
        if spawned is not None:
            orphans = await spawned.stop(target)
        await http.close()
    if spawned is not None:
        result["orphan_processes"] = len(orphans)
        result["orphan_details"] = orphans
        result["budgets"].append(Budget("processes outliving the stopped server",
                                        len(orphans), 0, unit="").as_dict())
        result["passed"] = result["passed"] and not orphans
    return result


async def measure(args: argparse.Namespace, target: Target, cycle: Cycle,
                  directories: Directories, rng: random.Random, http: aiohttp.ClientSession,
                  fakes_pid: int | None) -> dict[str, Any]:
    recorder = Recorder()
    run = Run(http, target.ws_url, recorder, time.monotonic(), args.audio_lead, args.timeout,
              COMPRESSION if args.compression else 0)
    monitor = Monitor(run, target, args.scenario, args.sessions, fakes_pid,
                      progress=not args.quiet)
    idle = await target.settle(http, None)
    before = proc.footprint(target.pid) if target.pid else None
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
    after = proc.footprint(target.pid) if target.pid else None
    warm = settled.get("sandbox", {}).get("warm")
    result = assemble(args, target, cycle, outcome, recorder, monitor, before, after,
                      (started, ended), warm if isinstance(warm, int) else 0)
    result["server_health_before"] = idle.get("sandbox")
    result["server_health_after"] = settled.get("sandbox")
    if profiler is not None:
        result["profile"] = str(args.profile) if profiled else None
    return result


def assemble(args: argparse.Namespace, target: Target, cycle: Cycle, outcome: Outcome,
             recorder: Recorder, monitor: Monitor, before: proc.Footprint | None,
             after: proc.Footprint | None, span: tuple[float, float],
             warm: int = 0) -> dict[str, Any]:
    """The result dictionary: what the JSON file holds and the report shows. ``warm``:
    children the settled server keeps warm on purpose, not counted as leftovers."""
    lateness = recorder.frame_lateness_ms.within(outcome.measured)
    first_audio = recorder.first_audio_ms.within(outcome.measured)
    baseline = (recorder.frame_lateness_ms.within(outcome.baseline)
                if outcome.baseline else None)
    at_load = monitor.pss_near(outcome.load_at)
    sessions = at_load["sessions_open"] if at_load is not None else 0
    server_rss = server_pss = pss_per_session = memory_per_session = None
    if at_load is not None and before is not None:
        server_rss = at_load.get("server_rss_mb")
        server_pss = at_load.get("server_pss_mb")
        if sessions > 0:
            pss_per_session = round((at_load["sandbox_pss_mb"] - before.children_pss_mb)
                                    / sessions, 2)
            memory_per_session = round(
                (at_load["sandbox_pss_mb"] + at_load["server_pss_mb"]
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
               _rounded(summary(start)["p50"]), SESSION_START_BUDGET_MS, binding=False,
               note="under this run's load; make bench measures the budget idle"),
        Budget("memory per session (server + sandbox PSS)", memory_per_session,
               MEMORY_BUDGET_MB, unit="MB", binding=False,
               note="sessions busy, not idle; make bench measures the idle budget"),
    ]
    cpu = monitor.cpu_between(outcome.measured[0][0], outcome.measured[-1][1])
    result: dict[str, Any] = {
        "scenario": args.scenario,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"url": target.ws_url, "spawned": target.spawned is not None,
                   "server_pid": target.pid},
        "parameters": {
            "sessions": args.sessions, "duration_s": args.duration, "ramp_per_s": args.ramp,
            "reload_fraction": args.reload_fraction, "reload_rate_per_s": args.reload_rate,
            "cycles": args.cycles, "characters_per_directory": args.characters,
            "seed": args.seed, "audio_lead_s": args.audio_lead, "timeout_s": args.timeout,
            "speech_cycle_s": round(cycle.period, 2),
            "interruptions": args.interruptions, "compression": args.compression,
        },
        "clients": {
            "interruptions": args.interruptions,
            "interruptions_per_cycle": len(cycle.interruptions),
            "interruption_offsets_s": list(cycle.interruptions),
            "compression": "permessage-deflate" if args.compression else None,
            "sessions_with_compression": recorder.compressed,
            "sessions_refused_compression": recorder.uncompressed,
        },
        "sessions_requested": args.sessions,
        "sessions_held": outcome.sessions_held,
        "sessions_opened": recorder.sessions_opened,
        "isolation_violations": recorder.violations,
        "reload_mismatches": recorder.mismatches,
        "answers_checked": recorder.reloads_checked,
        "reload_ms": summary(recorder.reload_ms.values),
        "reload_server_ms": summary(recorder.reload_server_ms.values),
        "session_start_ms": summary(start),
        "session_created_ms": summary(recorder.session_created_ms.values),
        "first_audio_ms": summary(first_audio),
        "frame_lateness_ms": summary(lateness),
        "frame_lateness_baseline_ms": summary(baseline) if baseline is not None else None,
        "client_loop_lag_ms": summary(recorder.client_lag_ms.between(*span)),
        "measured_s": [[round(a, 2), round(b, 2)] for a, b in outcome.measured],
        "errors_by_code": dict(sorted(recorder.errors.items())),
        "error_examples": recorder.error_examples,
        "isolation_details": recorder.violation_examples,
        "mismatch_details": recorder.mismatch_examples,
        "responses": dict(sorted(recorder.responses.items())),
        "interruptions_made": recorder.interruptions,
        "interruptions_missed": recorder.interruptions_missed,
        "questions_over_late_replies": recorder.talked_over,
        "interrupted_at_ms": summary(recorder.interrupted_at_ms.values),
        "turns": turns.as_dict(),
        "stale_frames": recorder.stale_frames,
        "leftover_processes": leftover,
        "warm_children_at_end": warm,
        "server_rss_mb": server_rss,
        "server_pss_mb": server_pss,
        "server_rss_mb_idle": round(before.server_rss_mb, 1) if before else None,
        "server_rss_mb_after": round(after.server_rss_mb, 1) if after else None,
        "sandbox_pss_mb_idle": round(before.children_pss_mb, 1) if before else None,
        "sandbox_pss_mb_at_load": at_load.get("sandbox_pss_mb") if at_load else None,
        "sandbox_pss_mb_per_session": pss_per_session,
        "memory_mb_per_session": memory_per_session,
        "sessions_at_memory_reading": sessions,
        "cpu_percent": cpu,
        "budgets": [budget.as_dict() for budget in budgets],
        "passed": passed(budgets),
        **outcome.details,
        "distributions": {
            "reload_ms": quantiles(recorder.reload_ms.values),
            "session_start_ms": quantiles(start),
            "first_audio_ms": quantiles(first_audio),
            "frame_lateness_ms": quantiles(lateness),
            "interrupted_at_ms": quantiles(recorder.interrupted_at_ms.values),
            **({"frame_lateness_baseline_ms": quantiles(baseline)} if baseline else {}),
        },
        "timeline": monitor.timeline,
        "duration_s": round(span[1] - span[0], 1),
    }
    return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


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
          + (f"\nprofile: {result['profile']}" if result.get("profile") else ""))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
