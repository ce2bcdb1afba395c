"""Where the embedded models run: worker threads, never the event loop.

    session coroutine ──await run(fn, …)──▶ SPEECH pool (one thread per core)
                                           pocketsphinx, Silero VAD, piper, eSpeak NG
    session coroutine ──await run_llm(…)──▶ LLM thread (one: the model is shared)

Every model here releases the GIL while it computes (onnxruntime, ggml and the C
decoders are called through C extensions or ctypes), so threads use the cores and
the loop stays on time; ``make bench`` measures its lateness while 20 sessions
speak. A long language-model reply has its own thread so that it never queues
recognition or synthesis behind it.
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
_llm: ThreadPoolExecutor | None = None


def speech_pool() -> ThreadPoolExecutor:
    global _speech
    if _speech is None:
        _speech = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                     thread_name_prefix="speech")
    return _speech


def llm_pool() -> ThreadPoolExecutor:
    global _llm
    if _llm is None:
        _llm = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")
    return _llm


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a speech worker thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(speech_pool(), functools.partial(fn, *args, **kwargs))


async def run_llm(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the language model's thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(llm_pool(), functools.partial(fn, *args, **kwargs))
