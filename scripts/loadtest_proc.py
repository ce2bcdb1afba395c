"""What ``/proc`` says about a local server: its processes, memory and CPU time.

    server pid ──ppid links──▶ descendants: the zygote, the sandbox children
    (idle in the pool, or a session's), and any other worker it started
    /proc/<pid>/status VmRSS       resident memory (shared pages counted in full)
    /proc/<pid>/smaps_rollup Pss   proportional share (shared pages split): the
                                   figure that adds up across forked children
    /proc/<pid>/stat utime+stime   CPU seconds

Every reader returns nothing (0, None, []) for a process that is gone: processes
come and go between two reads. 1 MB here is 1 MiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


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
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return Stat(int(fields[1]), fields[0], int(fields[19]),
                (int(fields[11]) + int(fields[12])) / _TICKS,
                (int(fields[13]) + int(fields[14])) / _TICKS)


def descendants(root: int) -> dict[int, Stat]:
    """Every live (not zombie) process below ``root``, by pid."""
    stats: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (found := stat(int(name))) is not None and found.state != "Z":
            stats[int(name)] = found
    children: dict[int, list[int]] = {}
    for pid, found in stats.items():
        children.setdefault(found.ppid, []).append(pid)
    below: dict[int, Stat] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            below[child] = stats[child]
            todo.append(child)
    return below


def rss_mb(pid: int) -> float:
    return _field_kb(f"/proc/{pid}/status", "VmRSS:") / 1024


def pss_mb(pid: int) -> float:
    """PSS, or RSS where smaps_rollup cannot be read (not root, non-dumpable)."""
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs."""
    found = stat(pid)
    return found is not None and found.started == started and found.state != "Z"


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


def cpu_seconds(pid: int) -> float:
    found = stat(pid)
    return found.cpu_seconds if found else 0.0
