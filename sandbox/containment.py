"""The walls a child puts up around itself before it runs character code.

Called once, first thing in the child, while it still has a single thread:

- its own session and process group, so the host can kill it with its descendants;
- stdin from /dev/null, fds 1 and 2 to /dev/null, Python's ``sys.stdout`` and
  ``sys.stderr`` replaced by a capped capture (returned with each reply);
- the environment cut down to ``ChildLimits.safe_env``;
- a new user and network namespace where the kernel allows it (no network, and no
  capabilities over the server's processes);
- resource limits on address space, CPU seconds, file size, open files, processes;
- a watcher thread that kills the process group when the server goes away
  (``PR_SET_DEATHSIG`` would fire on the fork server's death, not the server's).
"""

from __future__ import annotations

import ctypes
import io
import os
import resource
import select
import signal
import sys
import threading

from .config import ChildLimits

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_DUMPABLE = 4


class OutputLimitExceeded(Exception):
    """Character code wrote more to stdout/stderr than the child keeps."""


class CappedOutput(io.TextIOBase):
    """A text stream that keeps the first ``limit`` bytes and then refuses writes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[str] = []
        self._size = 0
        self.overflowed = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._size + len(text) > self.limit:
            self.overflowed = True
            raise OutputLimitExceeded(f"more than {self.limit} bytes written to stdout/stderr")
        self._parts.append(text)
        self._size += len(text)
        return len(text)

    def take(self) -> tuple[str, bool]:
        """Return what was written since the last call and whether it overflowed."""
        text, overflowed = "".join(self._parts), self.overflowed
        self._parts, self._size, self.overflowed = [], 0, False
        return text, overflowed


def enter(limits: ChildLimits, parent_sentinel: int | None, keep_fds: set[int]) -> bool:
    """Contain the current process. Returns whether the network namespace was entered."""
    os.setsid()
    _redirect_standard_fds()
    _scrub_environment(limits.safe_env)
    isolated = limits.isolate_network and _unshare_network()
    _close_other_fds(keep_fds | ({parent_sentinel} if parent_sentinel is not None else set()))
    if parent_sentinel is not None:
        _watch_parent(parent_sentinel)
    _set_rlimits(limits)
    return isolated


def make_host_undumpable() -> None:
    """Stop same-user processes (sandbox children included) from reading our memory
    and ``/proc/<pid>/environ``: only a holder of CAP_SYS_PTRACE may, and children in
    their own user namespace hold none over us."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _redirect_standard_fds() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdin = None


def _scrub_environment(safe: tuple[str, ...]) -> None:
    for name in list(os.environ):
        if name not in safe:
            del os.environ[name]


def _unshare_network() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0)


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already closed


def _watch_parent(sentinel: int) -> None:
    def watch() -> None:
        select.select([sentinel], [], [])
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _set_rlimits(limits: ChildLimits) -> None:
    mib = 1024 * 1024
    wanted = {
        resource.RLIMIT_AS: limits.memory_mb * mib,
        resource.RLIMIT_CPU: limits.cpu_seconds,
        resource.RLIMIT_FSIZE: limits.file_size_mb * mib,
        resource.RLIMIT_NOFILE: limits.open_files,
        resource.RLIMIT_NPROC: limits.processes,
    }
    for which, value in wanted.items():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
