"""A pool of idle, already-contained children, so that no session waits for a boot.

The pool owns the zygote (``process.Spawner``) that forks every child. One refill
task keeps ``pool_size`` children ready, one spawn at a time; ``acquire()`` hands
out a ready child at once, or spawns one when the pool is empty. A watchdog reads
each handed-out child's CPU time and kills a child that burns CPU between requests
(a thread or finaliser left running by character code).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

from .codecache import CodeCache
from .config import SandboxConfig
from .containment import ALL_PROTECTIONS, make_host_undumpable
from .errors import SandboxUnavailable
from .observer import Observer
from .process import ChildProcess, Spawner

_READY_TIMEOUT = 10.0
_TICKS = os.sysconf("SC_CLK_TCK")


class Pool:
    def __init__(self, config: SandboxConfig, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self._idle: collections.deque[ChildProcess] = collections.deque()
        self._spawner = Spawner(config.limits.safe_env, self._zygote_died)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._live: set[ChildProcess] = set()
        self._cpu: dict[ChildProcess, tuple[int, int]] = {}
        """CPU ticks and request count of each handed-out child at the last check."""
        self.code_cache = CodeCache()
        self.protections: list[str] = []
        """What the first child got: the walls in force (``containment.ALL_PROTECTIONS``)."""

    @property
    def missing_protections(self) -> list[str]:
        return [name for name in ALL_PROTECTIONS if name not in self.protections]

    async def start(self) -> None:
        """Start the zygote, learn the protections from a first child, fill the pool.
        Raises ``SandboxUnavailable`` when ``require_protections`` and one is missing,
        or when no child can start at all."""
        make_host_undumpable()
        try:
            first = await self._spawn()
        except Exception as exc:
            self._spawner.close()
            raise SandboxUnavailable(f"no sandbox child could start: {exc}") from exc
        self.protections = first.protections
        self._idle.append(first)
        if self.config.require_protections and self.missing_protections:
            await self.close()
            raise SandboxUnavailable(
                "this kernel does not offer every sandbox protection "
                f"(missing: {', '.join(self.missing_protections)}); run on a kernel with "
                "them (Linux 6.12+ with Landlock enabled and user namespaces allowed), "
                "or start without --require-sandbox to run with fewer"
            )
        self._tasks = [asyncio.create_task(self._keep_filled(), name="sandbox-pool"),
                       asyncio.create_task(self._watch_idle_cpu(), name="sandbox-cpu-watch")]
        self._wake.set()

    async def acquire(self) -> ChildProcess:
        """A ready child that belongs to the caller from now on.

        The pool is not refilled until the caller says it is done with its burst of
        work (``replenish``): on two cores, a spawn running beside the load that needs
        the child would slow that load down.
        """
        while self._idle:
            child = self._idle.popleft()
            if child.alive:
                return child
            await self.release(child)
        return await self._spawn()

    def replenish(self) -> None:
        """Start refilling the pool in the background."""
        self._wake.set()

    async def release(self, child: ChildProcess) -> None:
        """Kill a child acquired from this pool and reap it."""
        self._live.discard(child)
        self._cpu.pop(child, None)
        await child.kill()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def live_pids(self) -> list[int]:
        """Every child of this pool still running, idle or handed out."""
        return [child.pid for child in self._live]

    @property
    def zygote_pid(self) -> int | None:
        return self._spawner.pid

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for child in list(self._live):
            await self.release(child)
        self._idle.clear()
        self._spawner.close()

    async def _spawn(self) -> ChildProcess:
        started = time.perf_counter()
        child = await ChildProcess.spawn(self._spawner, self.config.limits, _READY_TIMEOUT)
        self._live.add(child)
        self.observer.spawned(time.perf_counter() - started)
        return child

    async def _keep_filled(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._idle) < self.config.pool_size:
                try:
                    self._idle.append(await self._spawn())
                except Exception as exc:
                    self.observer.spawn_failed(exc)
                    await asyncio.sleep(1.0)

    def _zygote_died(self) -> None:
        """Children of a dead zygote are killed: it is restarted, scrubbed, on demand."""
        for child in list(self._live):
            child.kill_now("its zygote died", innocent=True)

    async def _watch_idle_cpu(self) -> None:
        interval = self.config.idle_check_interval
        allowed = self.config.idle_cpu_seconds * _TICKS
        while True:
            await asyncio.sleep(interval)
            idle = set(self._idle)
            watched = [child for child in self._live if child not in idle and child.alive]
            # Before reading: a request started during the reads makes the sample void.
            requests = [child.requests for child in watched]
            # /proc reads off the loop: 200 children cost ~4 ms.
            ticks = await asyncio.to_thread(lambda: [_cpu_ticks(c.pid) for c in watched])
            for child, now, asked in zip(watched, ticks, requests, strict=True):
                before = self._cpu.get(child)
                self._cpu[child] = (now, asked)
                if before is None or child.busy or child.requests != before[1]:
                    continue  # it answered a request in between: that CPU was work
                if now - before[0] > allowed and child.alive:
                    child.kill_now(
                        f"it used {(now - before[0]) / _TICKS:.1f} s of CPU in {interval:g} s "
                        "while idle (a thread or loop left running by character code?)"
                    )


def _cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])
