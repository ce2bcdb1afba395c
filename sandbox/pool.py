"""A pool of idle, already-contained children, so that no session waits for a boot.

One spawner task keeps ``pool_size`` children ready, starting them one at a time in
one thread (``Process.start()`` blocks, and bursts of starts would stall the loop).
``acquire()`` hands out a ready child at once, or spawns one when the pool is empty.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor

from .codecache import CodeCache
from .config import SandboxConfig
from .containment import make_host_undumpable
from .observer import Observer
from .process import ChildProcess, release_forkserver, start_forkserver

_READY_TIMEOUT = 10.0


class Pool:
    def __init__(self, config: SandboxConfig, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self._idle: collections.deque[ChildProcess] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        self._wake = asyncio.Event()
        self._refill: asyncio.Task[None] | None = None
        self._live: set[ChildProcess] = set()
        self.code_cache = CodeCache()

    async def start(self) -> None:
        """Start the fork server and fill the pool. Call once, before ``acquire``."""
        make_host_undumpable()
        start_forkserver(self.config.limits.safe_env)
        self._refill = asyncio.create_task(self._keep_filled(), name="sandbox-pool")
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
        await child.kill()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def live_pids(self) -> list[int]:
        """Every child of this pool still running, idle or handed out."""
        return [child.pid for child in self._live]

    async def close(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)
        for child in list(self._live):
            await self.release(child)
        self._idle.clear()
        self._executor.shutdown(wait=True)
        release_forkserver()

    async def _spawn(self) -> ChildProcess:
        started = time.perf_counter()
        child = await ChildProcess.spawn(self.config.limits, self._executor, _READY_TIMEOUT)
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
