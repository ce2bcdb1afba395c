"""The seccomp filter every sandbox child runs under: the system calls that reach
beyond its own process are refused with EPERM.

Built once by the zygote with libseccomp (``pyseccomp``), exported as a BPF program,
and loaded by each child with one ``prctl`` (``install``): no compilation per child.

What is refused, and why (everything else is allowed; the other walls are the PID,
user, network and IPC namespaces, Landlock and the rlimits):

- new processes, threads and programs: ``fork``, ``vfork``, ``clone``, ``clone3``,
  ``execve``. No threads either: under root ``RLIMIT_NPROC`` binds nothing, so a
  thread bomb would reach the host's ``pid_max``, and a thread left running would
  keep burning CPU after its request (the red team found both);
- reaching other processes: ``ptrace``, ``process_vm_readv``/``writev``,
  ``process_madvise``, ``kcmp``, the ``pidfd_*`` calls;
- sockets of any family (the child's only channel is the one it was given);
- file metadata that Landlock does not cover: ``chmod``, ``chown``, extended
  attributes, timestamps;
- memory and kernel objects outside the address-space limit, or counted against
  the server's user: SysV shared memory, message queues and semaphores, POSIX
  message queues, ``memfd_create``, inotify and fanotify instances (inotify also
  sees names Landlock hides);
- kernel surface a character never needs: ``io_uring``, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, keyrings, modules, mounts and namespaces, ``personality``...;
- file leases and ``flock`` (they would stall the server's own opens and locks of
  files the child may read), socket ioctls (the host's interfaces);
- system calls newer than the machine's libseccomp, by number (``_BY_NUMBER``), and
  any from ``_UNKNOWN_FROM`` on with ENOSYS, so that a kernel newer than this list
  does not open a door (``setxattrat`` would otherwise change ACLs of server files).
"""

from __future__ import annotations

import ctypes
import errno
import os

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

REFUSED = (
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "socket", "socketpair",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "utime", "utimes", "utimensat", "futimesat",
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "memfd_create", "memfd_secret",
    "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_mark",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "move_mount", "open_tree", "fsopen", "fsmount", "fspick", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "personality", "ioperm", "iopl", "syslog", "acct", "quotactl", "swapon", "swapoff",
    "flock", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname",
    "reboot", "vhangup", "uselib", "lookup_dcookie",
)


# System calls newer than the libseccomp a machine may have (2.5.4 on Debian 12 knows
# none of these): refused by number, the same on x86_64 and arm64 (asm-generic).
_BY_NUMBER = {
    "fchmodat2": 452, "statmount": 457, "listmount": 458, "lsm_set_self_attr": 460,
    "setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467, "file_setattr": 469,
}
_UNKNOWN_FROM = 470
"""System calls from this number on (newer than this filter) answer ENOSYS."""
_UNKNOWN_TO = 512
_F_SETLEASE, _F_NOTIFY = 1024, 1026
_SIOC_MASK, _SIOC = 0xFF00, 0x8900
"""Socket ioctls (SIOCGIFCONF...): on the channel, a socket of the server's network
namespace, they would list the host's interfaces."""


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def build() -> bytes:
    """The filter as a BPF program. Raises ``OSError``/``ImportError`` when libseccomp
    is missing."""
    import pyseccomp as seccomp  # loads libseccomp.so.2

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    refuse = seccomp.ERRNO(errno.EPERM)
    for name in REFUSED:
        try:
            rules.add_rule(refuse, name)
        except (OSError, ValueError, RuntimeError):
            if name not in _BY_NUMBER:
                continue  # not a system call on this architecture (vfork on arm64...)
    for name, number in _BY_NUMBER.items():
        try:
            rules.add_rule(refuse, name)  # a libseccomp that knows it
        except (OSError, ValueError, RuntimeError):
            rules.add_rule(refuse, number)
    for number in range(_UNKNOWN_FROM, _UNKNOWN_TO):
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), number)
    for command in (_F_SETLEASE, _F_NOTIFY):  # leases stall the server's opens
        rules.add_rule(refuse, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    rules.add_rule(refuse, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, _SIOC_MASK, _SIOC))
    with os.fdopen(os.memfd_create("troupe-seccomp"), "w+b") as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def install(program: bytes) -> None:
    """Load ``program`` (from ``build``) into this process; irreversible, inherited by
    every thread started afterwards. Raises ``OSError``."""
    count = len(program) // ctypes.sizeof(_SockFilter)
    instructions = (_SockFilter * count).from_buffer_copy(program)
    fprog = _SockFprog(len=count, filter=instructions)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"seccomp filter refused: {os.strerror(error)}")
