"""Landlock (Linux 5.13+) through ctypes: confine this process to reading a few trees.

    restrict(read_only=[directory, python, shims], read_files=[...])
        ruleset handling every filesystem right the kernel knows (so each is denied
        unless a rule grants it), TCP bind/connect (ABI 4), and the scopes of ABI 6
        (abstract unix sockets and signals outside this process's domain)
        + one read-only rule per path ─▶ landlock_restrict_self

Nothing here grants a write: after ``restrict`` the process can create, change or
remove no file anywhere. The layer holds for every thread started afterwards; call
it while the process has one thread. See the kernel's userspace-api/landlock.rst.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

_SYS_CREATE_RULESET = 444  # the same number on x86_64 and arm64 (asm-generic)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights, by the ABI that introduced them.
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_BY_ABI = {1: _FS_ABI1, 2: _FS_ABI1 | 1 << 13, 3: _FS_ABI1 | 3 << 13, 5: _FS_ABI1 | 7 << 13}
_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP | CONNECT_TCP, ABI 4
_SCOPES = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET | SIGNAL, ABI 6

_READ_TREE = _EXECUTE | _READ_FILE | _READ_DIR
_READ_ONE_FILE = _EXECUTE | _READ_FILE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockError(OSError):
    """The kernel refused to set up the ruleset."""


def abi_version() -> int:
    """The Landlock ABI the kernel offers; 0 when it has none (or it is disabled)."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def restrict(read_trees: Iterable[str], read_files: Iterable[str] = ()) -> int:
    """Deny this process (and its future threads) every filesystem access but reading
    ``read_trees`` and ``read_files``; deny TCP and, from ABI 6, signals and abstract
    unix sockets outside it. Missing paths are skipped. Returns the ABI used.
    Raises ``LandlockError`` when the kernel has no Landlock."""
    abi = abi_version()
    if abi < 1:
        raise LandlockError("this kernel offers no Landlock")
    fs = _FS_BY_ABI[max(level for level in _FS_BY_ABI if level <= abi)]
    attr = _RulesetAttr(
        handled_access_fs=fs,
        handled_access_net=_NET_TCP if abi >= 4 else 0,
        scoped=_SCOPES if abi >= 6 else 0,
    )
    size = 8 if abi < 4 else 16 if abi < 6 else ctypes.sizeof(attr)
    ruleset = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr),
                                   ctypes.c_size_t(size), ctypes.c_uint32(0)), "create_ruleset")
    try:
        for paths, access in ((read_trees, _READ_TREE), (read_files, _READ_ONE_FILE)):
            for path in paths:
                _allow(ruleset, path, access)
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # nothing there to read
    try:
        if not os.path.isdir(path):
            access &= _READ_ONE_FILE
        rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        _check(_libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset),
                             ctypes.c_uint32(_RULE_PATH_BENEATH), ctypes.byref(rule),
                             ctypes.c_uint32(0)), f"add_rule {path}")
    finally:
        os.close(fd)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise LandlockError(errno, f"landlock {what}: {os.strerror(errno)}")
    return result
