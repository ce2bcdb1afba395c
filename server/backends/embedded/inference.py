"""Where the embedded text-to-speech runs: worker threads, never the event loop.

    session coroutine ──await run(fn, …)──▶ SPEECH pool (one thread per core)
                                           piper (onnxruntime), eSpeak NG

onnxruntime releases the GIL while it computes (measured: a loop-lateness probe beside
piper stayed under 4.3 ms), so threads are enough here. The speech-to-text and the
language model hold the GIL or clash with other libraries, so they run in worker
processes instead (``server.backends.embedded.workers``).
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

_speech: ThreadPoolExecutor | None = None


def speech_pool() -> ThreadPoolExecutor:
    global _speech
    if _speech is None:
        _speech = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                     thread_name_prefix="speech")
    return _speech


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a speech worker thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(speech_pool(), functools.partial(fn, *args, **kwargs))
