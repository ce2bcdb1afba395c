"""The characters part of ``make bench`` (alone: ``python -m scripts.bench --only
characters``): reload, session start and idle memory, against the budgets of DESIGN.md
section 8. Its figures are the JSON line's ``reload_p50_ms``, ``reload_p99_ms``,
``inprocess_p50_ms``, ``ratio_p50``, ``session_start_p50_ms`` and ``idle_session_mb``.

What the characters part measures, and how:

- Input: two generated directories of 20 realistic character files each
  (``scripts/bench/directories.py``: the Unmute fork's format, prompt helpers from
  ``unmute.llm.system_prompt``, two files per directory with TOOLS), so every reload
  loads other files than the one before.
- The real server runs as a subprocess (``python -m server`` on a free loopback port,
  its log in a temp file), so this client never competes for the server's event loop.
- Reload: one WebSocket session, 10 warm-up reloads, then N alternating the
  directories, each sent ``RELOAD_PAUSE`` after the answer to the one before (a
  person reloads far less often; the pause lets the server finish the background
  work a reload leaves, refilling its pool and warming the directory again, as it
  would between a person's reloads); the time from sending
  ``session.characters.reload`` to receiving ``session.characters.reloaded``, each of
  which must report 20 loaded and 0 errors. The server's own ``duration_ms`` is shown
  beside it. The same N reloads back to back are shown for reference: there each
  reload also waits for the background work of the ones before (a spawn and a load,
  about 15-20 ms of CPU per reload on the 2-core dev machine), so they measure the
  sandbox's throughput, not a reload's latency. So is the WebSocket round trip of a
  reload the server refuses at once (a directory that does not exist): the part of
  every client-observed reload that the in-process figure has no counterpart for.
- In-process baseline: the same N loads in this process, the way the Unmute fork loads
  characters (per file ``spec_from_file_location`` + ``module_from_spec`` +
  ``exec_module``, required attributes checked, ``PromptGenerator`` instantiated), with
  the directory importable as the package ``characters`` and the prompt shim on
  ``sys.path``; the modules are dropped between loads so each load executes the files
  again. Python's default bytecode caching applies (the warm-up writes ``__pycache__``,
  the measured loads read it), as it would for a server importing characters itself;
  the same loads compiling from source every time are shown beside it. The sandbox
  has its own cache of compiled files (``sandbox/codecache.py``), warmed the same way.
  Ratio = reload p50 / in-process p50 with bytecode cached.
- Session start: N times, open a new session and time until ``session.created`` has
  arrived and a ``session.characters.list`` (the bundled default set, which the
  session's sandbox loads first) is answered; then close it. The time to
  ``session.created`` alone is shown beside it.
- Idle session memory: PSS (``/proc/<pid>/smaps_rollup``) of the server process and of
  every process below it (the zygote and the sandbox children), before and after
  opening K sessions that have each listed their characters, with the pool refilled
  and no retired sandbox alive both times; the delta divided by K. Also the median PSS
  of the sessions' own sandbox children (their pids from the admin API). 1 MB = 1 MiB.

Between phases the run waits until the server is idle: sessions closed, pool full, no
retired child running (counted in /proc). At the end it warns when ``/v1/health``
counts more live children than run, and it fails when a process the server started
outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.common import BenchError, Client, Realtime, log, serving
from scripts.bench.directories import CHARACTER_COUNT, write_directories
from scripts.measure import REPO, Spread, footprint, ms, pss_mb, pss_readable, sandbox_children

SHIMS = REPO / "sandbox" / "shims"
PACKAGE = "characters"
RELOAD_WARMUP = 10
RELOAD_PAUSE = 0.1
"""Seconds between a reload's answer and the next reload (see the module's docstring)."""
START_WARMUP = 5

BUDGETS = {
    "reload_p50_ms": 30.0,
    "reload_p99_ms": 100.0,
    "ratio_p50": 3.0,
    "session_start_p50_ms": 20.0,
    "idle_session_mb": 10.0,
}
Row = tuple[str, str, str, str]


# ── measurements ─────────────────────────────────────────────────────────────


async def measure_reloads(
    client: Client, directories: list[Path], count: int, pause: float
) -> tuple[list[float], list[float]]:
    """Client-observed and server-reported (``duration_ms``) seconds per reload, each
    sent ``pause`` seconds after the answer to the one before."""
    session = await client.open()
    observed, reported = [], []
    try:
        for index in range(RELOAD_WARMUP + count):
            await asyncio.sleep(pause)
            directory = directories[index % len(directories)]
            started = time.perf_counter()
            reply = await session.request("session.characters.reloaded",
                                          "session.characters.reload", directory=str(directory))
            elapsed = time.perf_counter() - started
            if reply["loaded_count"] != CHARACTER_COUNT or reply["error_count"] != 0:
                raise BenchError(f"reload of {directory}: {reply['loaded_count']} loaded, "
                                 f"errors {reply['errors']}")
            if index >= RELOAD_WARMUP:
                observed.append(elapsed)
                reported.append(reply["duration_ms"] / 1000)
    finally:
        await session.close()
    return observed, reported


async def measure_round_trips(client: Client, directory: Path, count: int) -> list[float]:
    """Seconds per reload of a directory that does not exist, refused with an error
    before any sandbox work: the WebSocket round trip in every reload."""
    session = await client.open()
    missing = str(directory / "missing")
    samples = []
    try:
        for index in range(RELOAD_WARMUP + count):
            await asyncio.sleep(RELOAD_PAUSE)
            started = time.perf_counter()
            await session.request("error", "session.characters.reload", directory=missing)
            if index >= RELOAD_WARMUP:
                samples.append(time.perf_counter() - started)
    finally:
        await session.close()
    return samples


def load_inprocess(directory: Path) -> int:
    """Load the character files of ``directory`` the Unmute fork's way; how many loaded."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(directory)]
    sys.modules[PACKAGE] = package
    names = set()
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for attribute in ("CHARACTER_NAME", "VOICE_SOURCE", "INSTRUCTIONS", "PromptGenerator"):
            if not hasattr(module, attribute):
                raise BenchError(f"{path} has no {attribute}")
        if not callable(getattr(module.PromptGenerator, "make_system_prompt", None)):
            raise BenchError(f"{path}: PromptGenerator has no make_system_prompt")
        module.PromptGenerator(module.INSTRUCTIONS)
        names.add(module.CHARACTER_NAME)
    return len(names)


def forget_package() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def measure_inprocess(directories: list[Path], count: int, bytecode: bool) -> list[float]:
    """Seconds per in-process load of a whole directory; with ``bytecode`` Python's
    default (``__pycache__`` written by the warm-up, then read), else compiled anew."""
    sys.path.insert(0, str(SHIMS))
    wrote_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, not bytecode
    samples = []
    try:
        for index in range(RELOAD_WARMUP + count):
            directory = directories[index % len(directories)]
            started = time.perf_counter()
            loaded = load_inprocess(directory)
            elapsed = time.perf_counter() - started
            forget_package()
            if loaded != CHARACTER_COUNT:
                raise BenchError(f"{directory}: {loaded} characters loaded in-process")
            if index >= RELOAD_WARMUP:
                samples.append(elapsed)
    finally:
        forget_package()
        sys.dont_write_bytecode = wrote_bytecode
        sys.path.remove(str(SHIMS))
    return samples


async def measure_session_starts(client: Client, count: int) -> tuple[list[float], list[float]]:
    """Seconds per session start: until ``session.created``, and until listed."""
    created, listed = [], []
    for index in range(START_WARMUP + count):
        session, to_created, to_listed = await client.start_session()
        await session.close()
        if index >= START_WARMUP:
            created.append(to_created)
            listed.append(to_listed)
    return created, listed


@dataclass(frozen=True)
class IdleMemory:
    """MiB per idle session, and the median PSS of a session's sandbox child."""

    sessions: int
    server_mb: float
    sandbox_mb: float
    child_median_mb: float

    @property
    def total_mb(self) -> float:
        return self.server_mb + self.sandbox_mb


async def measure_idle_memory(client: Client, count: int) -> IdleMemory:
    await client.wait_settled(sessions=0)
    if not pss_readable(client.server.pid):
        log("cannot read smaps_rollup (the server is non-dumpable: run as root for PSS); "
            "using RSS, which counts shared pages in full")
    before = footprint(client.server.pid)
    sessions: list[Realtime] = []
    try:
        for _ in range(count):
            sessions.append((await client.start_session())[0])
        await client.wait_settled(sessions=count)
        after = footprint(client.server.pid)
        children = [pss_mb(pid) for pid in await client.sandbox_pids()]
        client.server.watched.track()
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    if len(children) != count:
        raise BenchError(f"the admin API lists {len(children)} sandboxes for {count} sessions")
    return IdleMemory(
        sessions=count,
        server_mb=(after.server_pss_mb - before.server_pss_mb) / count,
        sandbox_mb=(after.children_pss_mb - before.children_pss_mb) / count,
        child_median_mb=statistics.median(children),
    )


@dataclass(frozen=True)
class Results:
    reload: Spread
    reload_server: Spread
    reload_back_to_back: Spread
    round_trip: Spread
    inprocess: Spread
    inprocess_compiling: Spread
    session_created: Spread
    session_start: Spread
    memory: IdleMemory

    @property
    def ratio(self) -> float:
        return self.reload.p50 / self.inprocess.p50

    def figures(self) -> dict[str, float]:
        """The JSON line."""
        return {key: round(value, 2) for key, value in {
            "reload_p50_ms": self.reload.p50,
            "reload_p99_ms": self.reload.p99,
            "inprocess_p50_ms": self.inprocess.p50,
            "ratio_p50": self.ratio,
            "session_start_p50_ms": self.session_start.p50,
            "idle_session_mb": self.memory.total_mb,
        }.items()}


async def measure_server(client: Client, directories: list[Path], args: argparse.Namespace,
                         ) -> tuple[list[Spread], IdleMemory]:
    """Reloads, session starts and idle memory, on the server ``client`` speaks to."""
    log(f"reload: {RELOAD_WARMUP} warm-up + {args.reloads} reloads of {CHARACTER_COUNT} files, "
        f"{RELOAD_PAUSE:g} s apart")
    observed, reported = await measure_reloads(client, directories, args.reloads, RELOAD_PAUSE)
    await client.wait_settled(sessions=0)
    log(f"reload back to back: {RELOAD_WARMUP} warm-up + {args.reloads} reloads")
    back_to_back, _ = await measure_reloads(client, directories, args.reloads, 0.0)
    await client.wait_settled(sessions=0)
    log(f"WebSocket round trip: {RELOAD_WARMUP} warm-up + {args.reloads} refused reloads")
    round_trips = await measure_round_trips(client, directories[0], args.reloads)
    await client.wait_settled(sessions=0)
    log(f"session start: {START_WARMUP} warm-up + {args.session_starts} sessions")
    created, starts = await measure_session_starts(client, args.session_starts)
    log(f"memory: {args.idle_sessions} idle sessions")
    memory = await measure_idle_memory(client, args.idle_sessions)
    body = await client.wait_settled(sessions=0)
    counted, running = body["sandbox"]["children"], len(sandbox_children(client.server.pid))
    if counted != running:
        log(f"warning: /v1/health counts {counted} live sandbox children while "
            f"{running} run: the server lost track of {counted - running} killed ones")
    return [Spread.of(ms(samples)) for samples in (
        observed, reported, back_to_back, round_trips, created, starts)], memory


async def _measure(root: Path, directories: list[Path], args: argparse.Namespace,
                   ) -> tuple[list[Spread], IdleMemory]:
    async with serving(root) as client:
        return await measure_server(client, directories, args)


def run(args: argparse.Namespace) -> Results:
    with tempfile.TemporaryDirectory(prefix="troupe-bench-") as tmp:
        root = Path(tmp).resolve()
        directories = write_directories(root)
        log(f"in-process baseline: {RELOAD_WARMUP} warm-up + {args.reloads} loads")
        inprocess_compiling = Spread.of(ms(measure_inprocess(directories, args.reloads, False)))
        inprocess = Spread.of(ms(measure_inprocess(directories, args.reloads, True)))
        spreads, memory = asyncio.run(_measure(root, directories, args))
    reload, reload_server, back_to_back, round_trip, created, starts = spreads
    return Results(reload, reload_server, back_to_back, round_trip, inprocess,
                   inprocess_compiling, created, starts, memory)


# ── report ───────────────────────────────────────────────────────────────────


def table(results: Results) -> list[tuple[str, str, str, str]]:
    """(figure, value, budget, verdict) rows."""
    figures = results.figures()

    def budgeted(label: str, key: str, unit: str) -> tuple[str, str, str, str]:
        value, budget = figures[key], BUDGETS[key]
        return (label, f"{value:.2f} {unit}", f"≤ {budget:g} {unit}",
                "PASS" if value <= budget else "FAIL")

    def info(label: str, value: float, unit: str) -> tuple[str, str, str, str]:
        return (label, f"{value:.2f} {unit}", "", "")

    memory = results.memory
    return [
        budgeted(f"reload p50 (client-observed, {RELOAD_PAUSE:g} s apart)", "reload_p50_ms",
                 "ms"),
        budgeted("reload p99 (client-observed)", "reload_p99_ms", "ms"),
        info("reload mean (client-observed)", results.reload.mean, "ms"),
        info("reload p50, server's duration_ms", results.reload_server.p50, "ms"),
        info("  WebSocket round trip p50 (a refused reload)", results.round_trip.p50, "ms"),
        info("reload p50 back to back (throughput)", results.reload_back_to_back.p50, "ms"),
        info("reload p99 back to back", results.reload_back_to_back.p99, "ms"),
        info("in-process load p50 (bytecode cached)", results.inprocess.p50, "ms"),
        info("in-process load p99 (bytecode cached)", results.inprocess.p99, "ms"),
        info("in-process load p50 (compiling)", results.inprocess_compiling.p50, "ms"),
        budgeted("reload ratio: reload p50 / in-process p50 (issue 16: ≤ 3 in every run)",
                 "ratio_p50", "x"),
        info("  back to back / in-process p50 (reference)",
             results.reload_back_to_back.p50 / results.inprocess.p50, "x"),
        budgeted("session start p50 (created + listed)", "session_start_p50_ms", "ms"),
        info("session start p99", results.session_start.p99, "ms"),
        info("  session.created alone, p50", results.session_created.p50, "ms"),
        budgeted(f"idle session, PSS ({memory.sessions} open)", "idle_session_mb", "MB"),
        info("  of which server process", memory.server_mb, "MB"),
        info("  of which zygote + sandbox children", memory.sandbox_mb, "MB"),
        info("sandbox child PSS, median", memory.child_median_mb, "MB"),
    ]
