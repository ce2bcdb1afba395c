"""The walls around a sandbox child, put up before any character code runs.

    zygote ─fork─▶ outer: unshare(user, pid, network, IPC namespaces) ─fork─▶ child
                   (exits at once; the child,                     pid 1 of its own
                    reparented, belongs to the zygote)            PID namespace
    child: enter()   its own session; stdin/stdout/stderr on /dev/null; environment
                     cut to ``safe_env``; every fd closed but its channel; rlimits;
                     not dumpable; the seccomp filter of ``syscalls``
    child, on Load:  confine(directory): Landlock, read-only access to the directory,
                     the Python installation and the shims, nothing writable anywhere,
                     no signal or abstract socket outside itself

What each wall stops, and what the server reports when the kernel lacks one, is in
the README's "Security model". ``Protections`` is what a child actually got; the
pool reads it from the child's first reply.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import resource
import sys
import sysconfig
from pathlib import Path

from . import landlock, syscalls
from .config import ChildLimits

_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

SHIMS = str(Path(__file__).with_name("shims"))

# What a child may read besides its directory: Python, the libraries it loads, shims.
_SYSTEM_TREES = ("/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/share/zoneinfo")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom")

# The names ``Protections.active`` may hold, in the order the README explains them.
ALL_PROTECTIONS = (
    "user_namespace", "pid_namespace", "network_namespace", "ipc_namespace",
    "seccomp", "landlock", "landlock_scopes", "rlimits",
)


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


def unshare_namespaces(isolate_network: bool) -> list[str]:
    """In the zygote's first fork: new user, PID, IPC (and network) namespaces, so that
    the next fork is pid 1 of a namespace holding nothing else. Falls back to fewer
    when the kernel refuses; returns the namespaces entered."""
    libc = ctypes.CDLL(None, use_errno=True)
    wanted = [("user_namespace", _CLONE_NEWUSER), ("pid_namespace", _CLONE_NEWPID),
              ("ipc_namespace", _CLONE_NEWIPC)]
    if isolate_network:
        wanted.append(("network_namespace", _CLONE_NEWNET))
    flags = 0
    for _, flag in wanted:
        flags |= flag
    if libc.unshare(flags) == 0:
        return [name for name, _ in wanted]
    entered = []
    for name, flag in wanted:  # one at a time: keep what the kernel allows
        if libc.unshare(flag) == 0:
            entered.append(name)
    return entered


def enter(limits: ChildLimits, channel: int, seccomp_program: bytes | None) -> list[str]:
    """Contain the current process (single-threaded, first thing in the child).
    Returns the protections in force, beside the namespaces."""
    os.setsid()
    _redirect_standard_fds()
    _scrub_environment(limits.safe_env)
    _close_other_fds({channel})
    _set_rlimits(limits)
    _drop_capabilities()
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    active = ["rlimits"]
    if seccomp_program is not None:
        try:
            syscalls.install(seccomp_program)
            active.append("seccomp")
        except OSError:
            pass  # reported: the pool sees "seccomp" missing
    abi = landlock.abi_version()
    if abi >= 1:
        active.append("landlock")
    if abi >= 6:
        active.append("landlock_scopes")
    return active


def confine(directory: str) -> None:
    """Landlock: from now on this process reads only ``directory``, the Python
    installation, the system libraries and the shims, and writes nowhere. Raises
    ``landlock.LandlockError`` when the kernel has no Landlock."""
    landlock.restrict(
        read_trees=[directory, SHIMS, *_python_trees(), *_SYSTEM_TREES],
        read_files=_SYSTEM_FILES,
    )


def make_host_undumpable() -> None:
    """Stop same-user processes from reading our memory and ``/proc/<pid>/environ``:
    only a holder of CAP_SYS_PTRACE may, and sandbox children hold none over us."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


@functools.cache
def _python_trees() -> tuple[str, ...]:
    """The standard library and the server's environment's packages. (The stdlib
    tree holds the base interpreter's own site-packages too; listing the stdlib's
    ~200 entries one rule each to leave it out cost 6 ms a load, measured: its
    packages are code a character could import anyway, not secrets.)"""
    paths = sysconfig.get_paths()  # 4.5 ms the first time: the zygote warms it (prepare)
    return tuple(sorted({paths[key] for key in ("stdlib", "platstdlib", "purelib",
                                                "platlib")}))


def prepare() -> None:
    """In the zygote, before any fork: compute once what every child's ``confine``
    needs, so that a load does not pay for it (measured: 5 ms of a 6 ms confine)."""
    _python_trees()
    landlock.abi_version()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """No capability at all, in any namespace (where the user namespace could not be
    made, the child would otherwise keep root's): bounding set emptied, then the
    effective, permitted and inheritable sets."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in range(64):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)  # EINVAL past the last: fine
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: could not drop capabilities")


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


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd of the listdir itself, already closed


def _set_rlimits(limits: ChildLimits) -> None:
    mib = 1024 * 1024
    wanted = {
        resource.RLIMIT_AS: limits.memory_mb * mib,
        resource.RLIMIT_CPU: limits.cpu_seconds,
        resource.RLIMIT_FSIZE: limits.file_size_mb * mib,
        resource.RLIMIT_NOFILE: limits.open_files,
        resource.RLIMIT_NPROC: limits.processes,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in wanted.items():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
