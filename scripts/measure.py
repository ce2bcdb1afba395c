"""What ``make bench``, ``make loadtest`` and the other scripts measure with: percentiles,
what ``/proc`` says about a server and the processes below it, and a server started
for a measurement (and stopped, with whatever outlived it found and killed).

    percentile(values, q)  linear between the closest ranks (numpy's default method)
    Spread.of(ms)          p50, p99, max, mean and count of a few samples
    /proc/<pid>/stat       stat(): ppid, state, start time, CPU seconds
    /proc/<pid>/status     rss_mb(): VmRSS, shared pages counted in full
    /proc/<pid>/smaps_rollup  pss_mb(): proportional share, the figure that adds up
                           across forked children (RSS where it cannot be read)
    ServerProcess          python -m server --host 127.0.0.1 --port <free> …, its
                           output in a log file, SIGTERM should this process die;
                           stop(): SIGTERM, wait, then every process ever seen
                           below it that still runs is killed by pid and returned

Every ``/proc`` reader returns nothing (0, None, {}) for a process that is gone:
processes come and go between two reads. 1 MB here is 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


# ── statistics ───────────────────────────────────────────────────────────────


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``values``, interpolating linearly between
    the closest ranks (numpy's default: p50 of [1, 2, 3, 4] is 2.5); None when there
    are no values. Raises ``ValueError`` for a ``q`` outside 0–100."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, got {q}")
    if len(values) == 0:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


@dataclass(frozen=True)
class Spread:
    """Milliseconds: p50, p99, max and mean of a few samples (NaN when there are none)."""

    p50: float
    p99: float
    max: float
    mean: float
    count: int

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Spread:
        if not values_ms:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(percentile(values_ms, 50) or 0.0, percentile(values_ms, 99) or 0.0,
                   max(values_ms), math.fsum(values_ms) / len(values_ms), len(values_ms))


def ms(seconds: Sequence[float]) -> list[float]:
    return [s * 1000 for s in seconds]


# ── /proc ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Stat:
    ppid: int
    state: str
    started: int
    """Start time in clock ticks since boot: with the pid, names one process for good."""
    cpu_seconds: float
    reaped_cpu_seconds: float
    """CPU time of its children that have ended and been waited for."""


def stat(pid: int) -> Stat | None:
    """``/proc/<pid>/stat``, or None once the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # the name may hold spaces and ")"
    return Stat(int(fields[1]), fields[0], int(fields[19]),
                (int(fields[11]) + int(fields[12])) / _TICKS,
                (int(fields[13]) + int(fields[14])) / _TICKS)


def alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie), and is still the process that
    started at ``started`` when given."""
    found = stat(pid)
    return (found is not None and found.state != "Z"
            and (started is None or found.started == started))


def live_processes() -> dict[int, Stat]:
    """Every live (not zombie) process of the machine, by pid."""
    stats: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (found := stat(int(name))) is not None and found.state != "Z":
            stats[int(name)] = found
    return stats


def children_by_parent(stats: dict[int, Stat] | None = None) -> dict[int, list[int]]:
    """Live processes by parent pid."""
    children: dict[int, list[int]] = {}
    for pid, found in (live_processes() if stats is None else stats).items():
        children.setdefault(found.ppid, []).append(pid)
    return children


def descendants(root: int) -> dict[int, Stat]:
    """Every live process below ``root`` (children, theirs, …), by pid."""
    stats = live_processes()
    children = children_by_parent(stats)
    below: dict[int, Stat] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            below[child] = stats[child]
            todo.append(child)
    return below


def sandbox_children(server_pid: int) -> list[int]:
    """The running sandbox children: the processes the server's zygote forked."""
    children = children_by_parent()
    zygotes = [pid for pid in children.get(server_pid, []) if "sandbox.zygote" in cmdline(pid)]
    return [child for pid in zygotes for child in children.get(pid, [])]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    return _field_kb(f"/proc/{pid}/status", "VmRSS:") / 1024


def pss_readable(pid: int) -> bool:
    """Whether ``pid``'s smaps_rollup can be read (not, for a non-dumpable process of
    another user): else ``pss_mb`` gives its RSS, which counts shared pages in full."""
    try:
        Path(f"/proc/{pid}/smaps_rollup").read_bytes()
    except PermissionError:
        return False
    except OSError:
        pass
    return True


def pss_mb(pid: int) -> float:
    """PSS, or RSS where smaps_rollup cannot be read (see ``pss_readable``)."""
    try:
        return _field_kb(f"/proc/{pid}/smaps_rollup", "Pss:", strict=True) / 1024
    except PermissionError:
        return rss_mb(pid)


def _field_kb(path: str, key: str, strict: bool = False) -> int:
    try:
        text = Path(path).read_text()
    except PermissionError:
        if strict:
            raise
        return 0
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used, 0 once it is gone."""
    found = stat(pid)
    return found.cpu_seconds if found else 0.0


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU time every core has spent busy since boot (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:])  # guest time is counted in user time already
    return (sum(ticks) - guest - idle) / _TICKS


@dataclass(frozen=True)
class Footprint:
    """One look at a server and the processes below it."""

    server_rss_mb: float
    server_pss_mb: float
    children: int
    children_pss_mb: float
    """Sum over the zygote and every sandbox child (and other workers)."""
    server_cpu_s: float
    children_cpu_s: float
    """CPU time of the processes below, with that of their children that ended (the
    zygote reaps the sandbox children)."""


def footprint(server_pid: int, below: dict[int, Stat] | None = None,
              with_pss: bool = True) -> Footprint:
    """The server and ``below`` (default: its descendants now). ``with_pss=False``
    skips smaps_rollup (the kernel walks every mapping: costly with hundreds of
    children), leaving the PSS figures at 0."""
    below = descendants(server_pid) if below is None else below
    own = stat(server_pid)
    return Footprint(
        server_rss_mb=rss_mb(server_pid),
        server_pss_mb=pss_mb(server_pid) if with_pss else 0.0,
        children=len(below),
        children_pss_mb=sum(pss_mb(pid) for pid in below) if with_pss else 0.0,
        server_cpu_s=own.cpu_seconds if own else 0.0,
        children_cpu_s=sum(s.cpu_seconds + s.reaped_cpu_seconds for s in below.values()),
    )


# ── processes we start, and what outlives them ───────────────────────────────


@dataclass(frozen=True)
class Leftover:
    """A process that outlived what started it (killed once found)."""

    pid: int
    cmdline: str


@dataclass
class Watched:
    """Every process ever seen below ``root`` (pid → start time), to check that they
    all end with it: ``track`` often while it runs, ``reap`` once it has stopped."""

    root: int
    seen: dict[int, int] = field(default_factory=dict)

    def track(self, below: dict[int, Stat] | None = None) -> dict[int, Stat]:
        """Remember ``below`` (default: the processes below ``root`` now); returns it."""
        below = descendants(self.root) if below is None else below
        for pid, found in below.items():
            self.seen.setdefault(pid, found.started)
        return below

    def reap(self, grace: float = 5.0) -> list[Leftover]:
        """The processes seen that still run after up to ``grace`` seconds, each then
        killed by pid (blocking: run it in a thread beside an event loop)."""
        deadline = time.monotonic() + grace
        while (left := [pid for pid, started in self.seen.items() if alive(pid, started)]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = [Leftover(pid, cmdline(pid)[:200]) for pid in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return leftovers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def die_with_parent() -> None:
    """In a child we start, before exec: SIGTERM it should this process die unannounced."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ServerDidNotStart(Exception):
    """``python -m server`` exited, or did not say it was healthy in time; the
    message ends with the tail of its log."""


class ServerProcess:
    """``python -m server --host 127.0.0.1 --port <free port> *options``, with a fresh
    admin token in its environment (``TROUPE_ADMIN_TOKEN``), its output appended to
    ``log_path`` (default: inherited), stopped by pid."""

    def __init__(self, options: Sequence[str], log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(16)
        self.log_path = log_path
        log = log_path.open("ab") if log_path is not None else None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), *options],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {}), "TROUPE_ADMIN_TOKEN": self.admin_token},
                preexec_fn=die_with_parent,
            )
        finally:
            if log is not None:
                log.close()  # the server holds its own copy
        self.watched = Watched(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def health(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.url}/v1/health",
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def wait_healthy(self, http: aiohttp.ClientSession, within: float) -> dict[str, Any]:
        """Until ``/v1/health`` says ok; returns its body. Raises ``ServerDidNotStart``."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.running:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                if (body := await self.health(http)).get("ok"):
                    return body
            await asyncio.sleep(0.05)
        why = "exited" if not self.running else f"was not healthy within {within:g} s"
        raise ServerDidNotStart(f"python -m server on {self.url} {why} "
                                f"(log {self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> list[Leftover]:
        """SIGTERM, wait (SIGKILL after ``timeout``); returns, after killing them, the
        processes ever seen below the server that outlived it (blocking)."""
        if self.running:
            self.watched.track()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.watched.reap()
