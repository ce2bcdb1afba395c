"""Where the embedded text-to-speech runs: worker threads, never the event loop.

    session coroutine ──await threads.run(fn, …)──▶ SpeechThreads (one thread per core)
                                                    piper (onnxruntime), eSpeak NG

onnxruntime releases the GIL while it computes (measured: a loop-lateness probe beside
piper stayed under 4.3 ms), so threads are enough here. The speech-to-text and the
language model hold the GIL or clash with other libraries, so they run in worker
processes instead (``server.backends.embedded.workers``).

The backend that uses the threads owns them: they start with its first call and stop
when it closes (the app's clean-up closes it).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class SpeechThreads:
    """A pool of ``threads`` worker threads (default: one per core)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 2
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on one of the threads (started on first use)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.threads,
                                                thread_name_prefix="speech")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(fn, *args, **kwargs))

    async def close(self) -> None:
        """Drop the calls not started yet and wait, off the loop, for the running
        ones to end (a phrase takes well under a second); the threads then exit."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
