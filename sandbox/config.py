"""Sandbox settings: the limits a child applies to itself and the host's deadlines."""

from __future__ import annotations

import msgspec


class ChildLimits(msgspec.Struct, frozen=True):
    """Containment a child sets up before it runs any character code.

    Sent to the child msgspec-encoded as its only start argument.
    """

    memory_mb: int = 512
    """RLIMIT_AS: address space, so a file that allocates without end gets MemoryError."""
    cpu_seconds: int = 300
    """RLIMIT_CPU over the child's whole life: a runaway guard, not a deadline."""
    file_size_mb: int = 1
    open_files: int = 64
    processes: int = 64
    """RLIMIT_NPROC, counted per user (not for root); the seccomp filter refuses every
    fork, so a child is one process whatever the server's user."""
    output_bytes: int = 64 * 1024
    """stdout + stderr kept per request; a file printing more is reported as a flood."""
    safe_env: tuple[str, ...] = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
    """The only variables of the server's environment that reach character code."""
    isolate_network: bool = True
    """Enter a new user and network namespace where the kernel allows it."""
    llm_name: str = "a language model"
    """What ``unmute.llm.system_prompt.get_readable_llm_name()`` answers."""


class SandboxConfig(msgspec.Struct, frozen=True):
    """Everything the host side needs: child limits, deadlines and the pool size."""

    limits: ChildLimits = ChildLimits()
    load_timeout: float = 10.0
    """Whole reload, restarts included."""
    file_timeout: float = 2.0
    """One file's import; past it the child is killed and the file reported as Timeout."""
    call_timeout: float = 2.0
    """System prompt, tools, tool call, list, ping."""
    pool_size: int = 2
    """Idle children kept started so that sessions and reloads never wait for a boot."""
    max_restarts_per_load: int = 8
    """Children a single reload may use up on files that kill them."""
    warm_directories: int = 4
    """Directories kept loaded in a spare child, so that their next load is a
    handover (see ``pool``); 0: none."""
    idle_cpu_seconds: float = 0.5
    """CPU a loaded child may burn between requests within ``idle_check_interval``
    (a thread or a finaliser left running); more, and it is killed."""
    idle_check_interval: float = 2.0
    require_protections: bool = False
    """Refuse to start unless every protection of ``containment.ALL_PROTECTIONS`` is
    in force (``--require-sandbox``)."""
