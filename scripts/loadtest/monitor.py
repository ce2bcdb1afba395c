"""What watches a load test run from beside it: once a second, a point of the
timeline (sessions, memory and CPU from ``/proc``, lateness) and the progress line;
and, with ``--profile``, py-spy recording the server.

    Monitor ─ every second (in a thread) ─▶ Point(t, sessions, RSS, PSS every 5 s,
                                                  CPU % per process group, lateness)
    Profiler ─ py-spy record --pid <server> … ─▶ stopped with SIGINT, by pid
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from pathlib import Path

from scripts import measure
from scripts.loadtest.result import Point
from scripts.loadtest.server import Target
from scripts.loadtest.sessions import Run
from scripts.loadtest.stats import rounded
from scripts.measure import percentile

WINDOW = 5.0
"""Seconds of the lateness shown while running (and of one capacity step)."""
PSS_EVERY = 5
"""Monitor ticks (seconds) between two PSS readings (smaps_rollup is costly)."""


class Monitor:
    """Once a second: a point of the timeline (sessions, memory, CPU, lateness) and
    the progress line on stderr (rewritten in place on a terminal, else every 10 s)."""

    def __init__(self, run: Run, target: Target, scenario: str, requested: int,
                 fakes_pid: int | None, progress: bool = True) -> None:
        self.run = run
        self.target = target
        self.scenario = scenario
        self.requested = requested
        self.fakes_pid = fakes_pid
        self.progress = progress
        self.timeline: list[Point] = []
        self._previous: tuple[float, dict[str, float]] | None = None
        self._tty = sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="loadtest-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.progress and self._tty:
            print(file=sys.stderr, flush=True)

    async def _watch(self) -> None:
        for tick in itertools.count():
            await asyncio.sleep(1.0 - (self.run.now() % 1.0))
            point = await asyncio.to_thread(self.sample, tick % PSS_EVERY == 0)
            self.timeline.append(point)
            if self.progress and (self._tty or tick % 10 == 0):
                self._print(point)

    def sample(self, with_pss: bool) -> Point:
        """One timeline point (run in a thread: /proc reads take milliseconds)."""
        run, recorder = self.run, self.run.recorder
        now = run.now()
        point = Point(round(now, 2), recorder.sessions_open, recorder.streaming)
        cpu: dict[str, float] = {"loadtest": time.process_time(),
                                 "machine": measure.machine_busy_seconds()}
        if self.target.pid is not None:
            below = measure.descendants(self.target.pid)
            self.target.track(below)
            found = measure.footprint(self.target.pid, below, with_pss=with_pss)
            point.server_rss_mb = round(found.server_rss_mb, 1)
            point.children = found.children
            if with_pss:
                point.server_pss_mb = round(found.server_pss_mb, 1)
                point.sandbox_pss_mb = round(found.children_pss_mb, 1)
            cpu["server"] = found.server_cpu_s
            cpu["sandboxes"] = found.children_cpu_s
        if self.fakes_pid is not None:
            cpu["fake backends"] = measure.cpu_seconds(self.fakes_pid)
        if self._previous is not None:
            then, before = self._previous
            elapsed = max(now - then, 1e-6)
            shares = {key: round(max(0.0, value - before.get(key, value)) / elapsed * 100, 1)
                      for key, value in cpu.items()}
            machine = shares.pop("machine")
            shares["other processes"] = round(max(0.0, machine - sum(shares.values())), 1)
            point.cpu_percent = shares
        self._previous = (now, cpu)
        late = recorder.frame_lateness_ms.between(now - WINDOW, now)
        point.lateness_p99_ms = rounded(percentile(late, 99))
        lag = recorder.client_lag_ms.between(now - 1.0, now)
        point.client_lag_max_ms = round(max(lag), 2) if lag else None
        return point

    def _print(self, point: Point) -> None:
        recorder = self.run.recorder
        parts = [f"[{point.t:5.0f} s] {self.scenario}",
                 f"sessions {point.sessions_open}/{self.requested}",
                 f"streaming {point.streaming}"]
        if len(recorder.reload_ms):
            parts.append(f"reloads {len(recorder.reload_ms)}")
        if point.lateness_p99_ms is not None:
            parts.append(f"late p99 {point.lateness_p99_ms:.1f} ms")
        if recorder.turns.asked:
            parts.append(f"turns {recorder.turns.answered}/{recorder.turns.asked}")
            parts.append(f"interruptions {recorder.interruptions}")
        parts.append(f"errors {sum(recorder.errors.values())}")
        parts.append(f"violations {recorder.violations}")
        if point.server_rss_mb is not None:
            parts.append(f"RSS {point.server_rss_mb:.0f} MB")
        if point.cpu_percent:
            parts.append("cpu " + " ".join(f"{k.split()[0]} {v:.0f}%"
                                           for k, v in point.cpu_percent.items()))
        line = "  ".join(parts)
        if self._tty:
            print(f"\r{line[:160]:<160}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """Mean CPU share (% of one core) of each process group in (start, end]."""
        points = [p.cpu_percent for p in self.timeline
                  if p.cpu_percent is not None and start < p.t <= end]
        keys = {key for point in points for key in point}
        return {key: round(sum(p.get(key, 0.0) for p in points) / len(points), 1)
                for key in sorted(keys)}

    def server_cpu_within(self, windows: list[tuple[float, float]]) -> float | None:
        """Mean CPU share (% of one core) of the server process over ``windows``."""
        shares = [p.cpu_percent["server"] for p in self.timeline
                  if p.cpu_percent is not None and "server" in p.cpu_percent
                  and any(start < p.t <= end for start, end in windows)]
        return round(sum(shares) / len(shares), 1) if shares else None

    def pss_near(self, at: float) -> Point | None:
        """The last point with PSS figures taken at or before ``at`` (else the first)."""
        with_pss = [p for p in self.timeline if p.sandbox_pss_mb is not None]
        before = [p for p in with_pss if p.t <= at + 0.5]
        chosen = before or with_pss
        return chosen[-1] if chosen else None


class Profiler:
    """``py-spy record`` on the server while the load runs; stopped with SIGINT
    (py-spy then writes its output) by its pid."""

    def __init__(self, path: Path, pid: int) -> None:
        self.path, self.pid = path, pid
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(self.path.suffix, "raw")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        executable = Path(sys.executable).with_name("py-spy")
        self.process = await asyncio.create_subprocess_exec(
            str(executable) if executable.exists() else "py-spy", "record",
            "--pid", str(self.pid), "--rate", "100", "--nonblocking", "--format", fmt,
            "--output", str(self.path), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)

    async def stop(self) -> bool:
        if self.process is None:
            return False
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return _written(self.path)


def _written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
