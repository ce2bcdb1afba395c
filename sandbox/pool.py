"""A pool of idle, already-contained children, so that no session waits for a boot.

The pool owns the zygote (``process.Spawner``) that forks every child. One refill
task keeps ``pool_size`` children ready, one spawn at a time; ``acquire()`` hands
out a ready child at once, or spawns one when the pool is empty. A watchdog reads
each handed-out child's CPU time and kills a child that burns CPU between requests
(a thread or finaliser left running by character code).

Warm directories: a directory a session loads is worth having ready for its next
load. After each load the pool loads it once more, in the background, into a
sandbox nobody uses, and keeps it (``warm_directories`` of them; when every place
is taken, only a directory loaded more often than the least recently loaded kept one
replaces it). The next load of that directory takes it over if the directory's
fingerprint (every file's inode, mtime and size) is unchanged: a reload becomes a
handover, and the load's CPU moves off the session's critical path. Still one child
per session: a warm child has served nobody before it is handed out.

Background work runs one piece at a time, after the answer to the load that caused
it had a few loop turns to leave: first the pool refilled (a session's next load may
need a child), then the warm loads queued. A load that finds its directory's warm
load running waits for it if the pool is empty; one still queued is dropped.
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
"""Seconds after which a kept directory nobody loaded gives its place to any other."""
WARM_MAX_RSS = 64 * 1024 * 1024
"""A warm child holding more memory than this after its load is not kept."""
_ANSWER_TURNS = 3
"""Loop iterations between a session's load and background work: the answer to the
load is pushed, then written by the session's sender."""
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
        self._preloads: dict[str, _Preload] = {}
        """Warm loads queued or running, oldest first, by directory."""
        self._background: set[asyncio.Task[None]] = set()
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

    async def take_warm(self, directory: str, max_characters: int) -> Sandbox | None:
        """The sandbox kept warm with ``directory``, if it is alive, loaded with the
        same limit and the directory's files are unchanged since; it is the caller's.

        A preload of ``directory`` already running is waited for when the pool has
        no idle child (a load now would wait for a spawn first); with one, the caller
        loads beside it, on the other core, and the preload is kept for the load
        after. One still queued is dropped: the caller loads now."""
        preload = self._preloads.get(directory)
        if directory not in self._warm and preload is not None:
            if not preload.started:
                del self._preloads[directory]
                return None
            if self._idle:
                return None
            await asyncio.shield(preload.done)
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
        """Note a load of ``directory`` by a session, and run ``preload`` in the
        background (which loads it into a spare sandbox and calls ``keep_warm``)
        unless it is kept or being made already, or it is not worth a place: when
        every place is taken, only a directory loaded twice since the least recently
        loaded kept one was last loaded (or that one is past ``WARM_WINDOW``) takes it.
        Repeated loads of a few directories always find them warm; loads spread over
        more directories than there are places do not churn them."""
        if self.config.warm_directories <= 0:
            return
        now = time.monotonic()
        before = self._loaded_at.pop(directory, None)
        self._loaded_at[directory] = now
        while len(self._loaded_at) > 64 * self.config.warm_directories:
            self._loaded_at.popitem(last=False)
        if directory in self._warm or directory in self._preloads:
            return
        if len(self._warm) + len(self._preloads) >= self.config.warm_directories:
            coldest = min(self._warm, key=lambda kept: self._loaded_at.get(kept, 0.0),
                          default=None)
            if coldest is None:
                return  # every place is being filled
            last_used = self._loaded_at.get(coldest, 0.0)
            if now - last_used < WARM_WINDOW and (before is None or before < last_used):
                return
        self._preloads[directory] = _Preload(preload)
        self._wake.set()

    async def keep_warm(self, directory: str, max_characters: int, fingerprint: Fingerprint,
                        sandbox: Sandbox) -> None:
        """Keep ``sandbox`` (loaded with ``directory``) for the next load of it,
        unless its load made it hold more than ``WARM_MAX_RSS`` (nobody's session
        pays for a warm child: it must stay cheap). Past ``warm_directories``, the
        kept directory least recently loaded by a session goes."""
        if sandbox.pid is None or _rss_bytes(sandbox.pid) > WARM_MAX_RSS:
            await sandbox.close()
            return
        previous = self._warm.pop(directory, None)
        self._warm[directory] = (sandbox, fingerprint, max_characters)
        evicted = [previous[0]] if previous is not None else []
        while len(self._warm) > self.config.warm_directories:
            coldest = min(self._warm, key=lambda kept: self._loaded_at.get(kept, 0.0))
            evicted.append(self._warm.pop(coldest)[0])
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
        """The background work, one piece at a time, each after the answers to the
        loads that caused it: the pool refilled to ``pool_size`` first, then the warm
        loads queued, oldest first. A warm load takes an idle child (the pool is full
        when it starts), so the pool is refilled after it too."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                await self._after_answers()
                if len(self._idle) < self.config.pool_size:
                    try:
                        self._idle.append(await self._spawn())
                    except Exception as exc:
                        self.observer.spawn_failed(exc)
                        await asyncio.sleep(1.0)
                    continue
                preload = next((p for p in self._preloads.values() if not p.started), None)
                if preload is None:
                    break
                preload.started = True
                try:
                    await preload.run()
                except Exception as exc:  # the preload reports its own load's failures
                    self.observer.spawn_failed(exc)
                finally:
                    self._preloads = {directory: queued for directory, queued
                                      in self._preloads.items() if queued is not preload}
                    preload.done.set_result(None)

    async def _after_answers(self) -> None:
        """Let the loop turn a few times, so that the answer to a session's load,
        pushed when the load returned, is written before background work competes
        with its sending for the two cores."""
        for _ in range(_ANSWER_TURNS):
            await asyncio.sleep(0)

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


class _Preload:
    """A warm load waiting for its turn in the background, or running
    (``started``); ``done`` once it is over, whatever came of it."""

    def __init__(self, run: Callable[[], Awaitable[None]]) -> None:
        self.run = run
        self.started = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def directory_fingerprint(directory: str) -> Fingerprint:
    """(relative path, inode, mtime, size) of every file and folder below
    ``directory`` (symbolic links followed, as ``os.stat`` does, but not descended
    into; ``__pycache__`` folders left out), sorted; empty when any of it cannot be
    read or it holds too many entries (then it never matches a load). One ``stat``
    per entry: it runs on the loop, before every handover."""
    found: list[tuple[str, int, int, int]] = []
    folders = [""]
    try:
        while folders:
            folder = folders.pop()
            with os.scandir(os.path.join(directory, folder)) as entries:
                for entry in entries:
                    is_folder = entry.is_dir()
                    if is_folder and entry.name == "__pycache__":
                        continue
                    info = entry.stat()
                    path = folder + entry.name
                    found.append((path, info.st_ino, info.st_mtime_ns, info.st_size))
                    if len(found) > _FINGERPRINT_LIMIT:
                        return ()
                    if is_folder and not entry.is_symlink():
                        folders.append(path + "/")
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
