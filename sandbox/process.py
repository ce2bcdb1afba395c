"""Host side of one child process: start it, talk to it, kill and reap it.

    ChildProcess.spawn()  ── thread: Process.start() via the fork server ──▶ child
         │                                                                    │
         ├─ request(Ping) ── wire.encode ─▶ socketpair ─▶ child.serve() ──────┤
         │◀─ FrameBuffer ◀─ loop.add_reader ◀──────── wire.write_frame ◀──────┘
         └─ kill(): SIGKILL to the child's process group, wait on the sentinel,
            close every fd (the fork server reaps the pid itself)

The child is untrusted: replies are decoded with a typed decoder, oversized or
undecodable frames and replies to the wrong request count as the child dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import context, popen_forkserver, reduction, resource_tracker, util
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from . import child, wire
from .config import ChildLimits

_context = multiprocessing.get_context("forkserver")
# forkserver_init comes last: it freezes what the others imported.
_context.set_forkserver_preload(["sandbox.child", "sandbox.forkserver_init"])
_forkserver_lock = threading.Lock()
_forkserver_users = 0


class _LeanPopen(popen_forkserver.Popen):
    """The fork server's Popen, minus re-running the server's main module in the child.

    The stock launch sends ``spawn.get_preparation_data()``, which makes every child
    re-import ``__main__`` when it is a file (a ``pytest`` or script entry point): 100+
    ms and tens of MiB per child (CPython gh-137996), and a script's side effects run
    in the sandbox. Children only need ``sandbox.child``, which the fork server has
    preloaded, so they get the bare preparation data instead. The rest mirrors
    ``popen_forkserver.Popen._launch`` of CPython 3.11-3.13.
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = {
            "name": process_obj._name,
            "authkey": bytes(multiprocessing.current_process().authkey),
            "sys_path": list(sys.path),
            "dir": os.getcwd(),
            "start_method": "forkserver",
        }
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = multiprocessing.forkserver.connect_to_new_process(
            self._fds  # type: ignore[attr-defined]  # set by popen_forkserver.Popen.__init__
        )
        parent_w = os.dup(w)  # the child's parent sentinel: closes when we close it
        self.finalizer = util.Finalize(
            self, util.close_fds, (parent_w, self.sentinel)  # type: ignore[attr-defined]
        )
        with open(w, "wb", closefd=True) as pipe:
            pipe.write(buf.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


class _SandboxProcess(_context.Process):  # type: ignore[misc,name-defined]
    @staticmethod
    def _Popen(process_obj: Any) -> _LeanPopen:
        return _LeanPopen(process_obj)


class ChildDied(Exception):
    """The channel closed or the child broke the protocol; ``reason`` says how."""


def start_forkserver(safe_env: tuple[str, ...]) -> None:
    """Start the fork server (once per server process) with a scrubbed environment,
    so that no child, not even through ``/proc/self/environ``, sees our secrets."""
    global _forkserver_users
    with _forkserver_lock:
        _forkserver_users += 1
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update({name: saved[name] for name in safe_env if name in saved})
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def release_forkserver() -> None:
    """Stop and reap the fork server (and its resource tracker) once its last user is
    done with it, so that neither outlives the server nor lingers as a zombie where
    pid 1 does not reap."""
    global _forkserver_users
    with _forkserver_lock:
        _forkserver_users -= 1
        if _forkserver_users == 0:
            multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
            # The fork server started a resource tracker beside it; we use no shared
            # resources it would track, so it goes too.
            resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


_reaping: set[asyncio.Future[None]] = set()
"""Reaps in progress, kept here so that a cancelled ``kill`` still finishes its own."""


class ChildProcess:
    """One started child and its channel. One request at a time (callers serialise)."""

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.pid: int = process.pid
        self._conn = conn
        self._sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._frames = wire.FrameBuffer()
        self._replies: asyncio.Queue[wire.Reply | None] = asyncio.Queue()
        self.dead_reason: str | None = None
        self._next_id = 1
        self._closed = False
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    @classmethod
    async def spawn(
        cls, limits: ChildLimits, executor: ThreadPoolExecutor, ready_timeout: float
    ) -> ChildProcess:
        """Start a child through the fork server and wait for its first Pong."""
        process, conn = await asyncio.get_running_loop().run_in_executor(
            executor, _start_process, msgspec.msgpack.encode(limits)
        )
        started = cls(process, conn)
        try:
            async with asyncio.timeout(ready_timeout):
                reply = await started.receive()
            if not isinstance(reply, wire.Pong):
                raise ChildDied(f"sent {type(reply).__name__} instead of its ready Pong")
        except BaseException:
            await started.kill()
            raise
        return started

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and not self._closed

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send_frame(self, message: wire.Message) -> None:
        if not self.alive:
            raise ChildDied(self.dead_reason or "the child was closed")
        try:
            await self._loop.sock_sendall(self._sock, wire.encode(message))
        except OSError as exc:
            self._die(f"the channel broke while sending: {exc}")
            raise ChildDied(self.dead_reason) from exc

    async def receive(self) -> wire.Reply:
        """The next reply. Raises ``ChildDied``."""
        if self.dead_reason is not None and self._replies.empty():
            raise ChildDied(self.dead_reason)
        reply = await self._replies.get()
        if reply is None:
            raise ChildDied(self.dead_reason or "the channel closed")
        return reply

    async def request(self, message: wire.Message) -> wire.Reply:
        """Send ``message`` and return the reply carrying its id. Raises ``ChildDied``."""
        await self.send_frame(message)
        reply = await self.receive()
        if reply.id != getattr(message, "id", None):
            self._die(f"answered request {reply.id} when {getattr(message, 'id', None)} was asked")
            raise ChildDied(self.dead_reason)
        return reply

    def exit_description(self) -> str:
        """How the process ended, for error messages (call after it died)."""
        code = self.process.exitcode
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with code {code}"

    async def wait_exit(self, within: float) -> None:
        """Wait up to ``within`` seconds for the process to end on its own (reads the sentinel)."""
        waiter = self._loop.create_future()
        sentinel = self.process.sentinel
        def exited() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_reader(sentinel, exited)
        try:
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            return
        finally:
            self._loop.remove_reader(sentinel)
        self.process.join(0)

    async def kill(self) -> None:
        """SIGKILL the child's process group, close the channel, and reap.

        Cancelling the caller does not stop the reaping: it runs in a shielded task
        that the module keeps until the process is gone and its fds are closed.
        """
        if self._closed:
            return
        self._closed = True
        self._die("the sandbox killed it")
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._sock.close()
        self._conn.close()
        reaping = asyncio.ensure_future(self._reap())
        _reaping.add(reaping)
        reaping.add_done_callback(_reaping.discard)
        await asyncio.shield(reaping)

    async def _reap(self) -> None:
        if self.process.exitcode is None:
            await self.wait_exit(5.0)
        if self.process.exitcode is not None:
            self.process.close()

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(256 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            self._die(f"the channel broke: {exc}")
            return
        if not data:
            self._die("the channel closed")
            return
        try:
            for frame in self._frames.feed(data):
                self._replies.put_nowait(wire.decode_reply(frame))
        except (wire.FrameTooLarge, msgspec.DecodeError) as exc:
            self._die(f"it broke the protocol: {exc}")

    def _die(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            self._loop.remove_reader(self._sock)
            self._replies.put_nowait(None)


def _start_process(encoded_limits: bytes) -> tuple[Any, Connection]:
    """Blocking part of a spawn, run in the spawner thread (Process.start blocks 1-30 ms)."""
    parent_conn, child_conn = _context.Pipe(duplex=True)
    process = _SandboxProcess(
        target=child.main, args=(child_conn, encoded_limits), name="troupe-sandbox", daemon=True
    )
    try:
        process.start()
    finally:
        child_conn.close()
    return process, parent_conn
