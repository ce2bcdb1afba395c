"""A pool of idle, already-contained children, so that no session waits for a boot.

The pool owns the zygote (``process.Spawner``) that forks every child. One refill
task keeps ``pool_size`` children ready, one spawn at a time; ``acquire()`` hands
out a ready child at once, or spawns one when the pool is empty. A watchdog reads
each handed-out child's CPU time and kills a child that burns CPU between requests
(a thread or finaliser left running by character code).

Warm directories: a directory loaded twice within ``WARM_WINDOW`` is worth having
ready. After such a load the pool loads it once more, in the background, into a
sandbox nobody uses, and keeps it (``warm_directories`` of them, least recently
used dropped). The next load of that directory takes it over if the directory's
fingerprint (every file's inode, mtime and size) is unchanged: a reload becomes a
handover, and the load's CPU moves off the session's critical path. Still one child
per session: a warm child has served nobody before it is handed out.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .codecache import CodeCache
from .config import SandboxConfig
from .containment import ALL_PROTECTIONS, make_host_undumpable
from .errors import SandboxUnavailable
from .observer import Observer
from .process import ChildDied, ChildProcess, Spawner, SpawnerGone

if TYPE_CHECKING:
    from .host import Sandbox

_READY_TIMEOUT = 10.0
_TICKS = os.sysconf("SC_CLK_TCK")
WARM_WINDOW = 300.0
"""Seconds within which a second load of a directory makes it worth keeping warm."""
WARM_MAX_RSS = 64 * 1024 * 1024
"""A warm child holding more memory than this after its load is not kept."""
_FINGERPRINT_LIMIT = 2000
"""Entries a fingerprint looks at; a bigger tree is never kept warm."""
Fingerprint = tuple[tuple[str, int, int, int], ...]


class Pool:
    def __init__(self, config: SandboxConfig, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self._idle: collections.deque[ChildProcess] = collections.deque()
        self._spawner = Spawner(config.limits.safe_env, self._zygote_died)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._live: set[ChildProcess] = set()
        self._cpu: dict[ChildProcess, tuple[int, float]] = {}
        """CPU ticks and busy seconds of each handed-out child at the last check."""
        self.code_cache = CodeCache()
        self._warm: collections.OrderedDict[str, tuple[Sandbox, Fingerprint, int]] = (
            collections.OrderedDict()
        )
        self._loaded_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._warming: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()
        """Spawns and warm loads in the background run one after the other."""
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

    # ── warm directories ────────────────────────────────────────────────────

    def take_warm(self, directory: str, max_characters: int) -> Sandbox | None:
        """The sandbox kept warm with ``directory``, if it is alive, loaded with the
        same limit and the directory's files are unchanged since; it is the caller's."""
        entry = self._warm.pop(directory, None)
        if entry is None:
            return None
        sandbox, fingerprint, limit = entry
        if sandbox.alive and limit == max_characters and fingerprint and (
                directory_fingerprint(directory) == fingerprint):
            return sandbox
        self._in_background(sandbox.close())
        return None

    def warm_up(self, directory: str, preload: Callable[[], Awaitable[None]]) -> None:
        """Note a load of ``directory``; on the second within ``WARM_WINDOW`` (and
        while none is kept or being made), run ``preload`` in the background."""
        if self.config.warm_directories <= 0:
            return
        now = time.monotonic()
        before = self._loaded_at.pop(directory, None)
        self._loaded_at[directory] = now
        while len(self._loaded_at) > 64 * self.config.warm_directories:
            self._loaded_at.popitem(last=False)
        if (before is None or now - before > WARM_WINDOW or directory in self._warm
                or directory in self._warming):
            return
        self._warming.add(directory)

        async def warm() -> None:
            try:
                async with self._one_at_a_time:
                    await preload()
            finally:
                self._warming.discard(directory)

        self._in_background(warm())

    async def keep_warm(self, directory: str, max_characters: int, fingerprint: Fingerprint,
                        sandbox: Sandbox) -> None:
        """Keep ``sandbox`` (loaded with ``directory``) for the next load of it,
        unless its load made it hold more than ``WARM_MAX_RSS`` (nobody's session
        pays for a warm child: it must stay cheap)."""
        if sandbox.pid is None or _rss_bytes(sandbox.pid) > WARM_MAX_RSS:
            await sandbox.close()
            return
        previous = self._warm.pop(directory, None)
        self._warm[directory] = (sandbox, fingerprint, max_characters)
        evicted = [previous[0]] if previous is not None else []
        while len(self._warm) > self.config.warm_directories:
            evicted.append(self._warm.popitem(last=False)[1][0])
        for old in evicted:
            await old.close()

    @property
    def warm_directories(self) -> list[str]:
        return list(self._warm)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        warm, self._warm = self._warm, collections.OrderedDict()
        for sandbox, _, _ in warm.values():
            await sandbox.close()
        for child in list(self._live):
            await self.release(child)
        self._idle.clear()
        # Kills whose callers were cancelled still reap in the background: their
        # children's pidfds close before the zygote goes.
        await asyncio.gather(*self._spawner.reaping, return_exceptions=True)
        self._spawner.close()

    async def _spawn(self) -> ChildProcess:
        """A new ready child. Raises ``SandboxUnavailable`` (the zygote is gone, the
        machine is out of fds or processes, or the child came up with fewer
        protections than the pool's first one: it is killed)."""
        started = time.perf_counter()
        try:
            child = await ChildProcess.spawn(self._spawner, self.config.limits, _READY_TIMEOUT)
        except (SpawnerGone, ChildDied, OSError, TimeoutError) as exc:
            raise SandboxUnavailable(f"no sandbox child could start: {exc}") from exc
        missing = set(self.protections) - set(child.protections)
        if missing:
            await child.kill()
            raise SandboxUnavailable(
                f"a sandbox child came up without {', '.join(sorted(missing))}; refused")
        child.abandoned_deadline = self.config.call_timeout
        self._live.add(child)
        self.observer.spawned(time.perf_counter() - started)
        return child

    async def _keep_filled(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._idle) < self.config.pool_size:
                try:
                    async with self._one_at_a_time:
                        self._idle.append(await self._spawn())
                except Exception as exc:
                    self.observer.spawn_failed(exc)
                    await asyncio.sleep(1.0)

    def _zygote_died(self) -> None:
        """Children of a dead zygote are killed: it is restarted, scrubbed, on demand."""
        for child in list(self._live):
            child.kill_now("its zygote died", innocent=True)

    async def _watch_idle_cpu(self) -> None:
        """Charge each child the CPU it used beyond its time serving requests (a
        single thread cannot use more); kill it past ``idle_cpu_seconds`` in one
        ``idle_check_interval``. An abandoned request still counts as work until the
        child answers it (then the reply is dropped)."""
        interval = self.config.idle_check_interval
        while True:
            await asyncio.sleep(interval)
            idle = set(self._idle)
            watched = [child for child in self._live if child not in idle and child.alive]
            # /proc reads off the loop: 200 children cost ~4 ms.
            ticks = await asyncio.to_thread(_cpu_ticks_of, [child.pid for child in watched])
            for child, now in zip(watched, ticks, strict=True):
                busy = child.busy_seconds()
                before = self._cpu.get(child)
                self._cpu[child] = (now, busy)
                if before is None or not child.alive:
                    continue
                excess = (now - before[0]) / _TICKS - (busy - before[1])
                if excess > self.config.idle_cpu_seconds:
                    child.kill_now(
                        f"it used {excess:.1f} s of CPU in {interval:g} s beyond serving "
                        "requests (a loop, timer or finaliser left running by character "
                        "code?)"
                    )


def directory_fingerprint(directory: str) -> Fingerprint:
    """(relative path, inode, mtime, size) of every file and folder below
    ``directory``, sorted; empty when it cannot be read or holds too many entries
    (then it never matches a load)."""
    found: list[tuple[str, int, int, int]] = []
    try:
        for root, folders, files in os.walk(directory):
            folders[:] = [name for name in folders if name != "__pycache__"]
            for name in (*folders, *files):
                path = os.path.join(root, name)
                info = os.stat(path)
                found.append((os.path.relpath(path, directory), info.st_ino,
                              info.st_mtime_ns, info.st_size))
                if len(found) > _FINGERPRINT_LIMIT:
                    return ()
    except OSError:
        return ()
    return tuple(sorted(found))


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_ticks_of(pids: list[int]) -> list[int]:
    return [_cpu_ticks(pid) for pid in pids]


def _cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])
