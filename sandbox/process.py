"""Host side of the children: the zygote that forks them (``Spawner``); each child's
channel is a ``ChildProcess`` (channel.py, whose names this module re-exports).

    Spawner.start()  python -I -c "sandbox.zygote.main(fd)", scrubbed environment,
                     one end of a SEQPACKET socket pair inherited (the only door)
    Spawner.spawn()  ── Spawn + channel fd ─▶ zygote ─▶ child
                     ◀─ Spawned(pid) + pidfd ─┘  later ◀─ Exited(pid, code)
                     ─▶ ChildProcess on our end of the channel

The zygote's messages are decoded with a typed decoder; one cut short or undecodable
means the zygote is broken: everything waiting on it fails and it starts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from . import zygote
from .channel import ChildDied as ChildDied
from .channel import ChildProcess as ChildProcess
from .channel import kill_pidfd
from .config import ChildLimits

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_ZYGOTE_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); from sandbox.zygote import main; main({fd})"
)


_T = TypeVar("_T")
_Started = tuple[int, int, "asyncio.Future[int | None]"]
"""pid, pidfd, exit code to come."""


class SpawnerGone(Exception):
    """The zygote is not running (it died, or was never started)."""


class Spawner:
    """The server's end of its zygote. Restarted on the next spawn if it dies."""

    def __init__(self, safe_env: tuple[str, ...], on_death: Callable[[], None]) -> None:
        self._safe_env = safe_env
        self._on_death = on_death
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._pending: dict[int, asyncio.Future[_Started]] = {}
        self._next_id = 0
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._lock = asyncio.Lock()
        self._decoder = msgspec.msgpack.Decoder(zygote.FromZygote)
        self.reaping: set[asyncio.Future[None]] = set()
        """Reaps of its children in progress, kept here so that a cancelled
        ``ChildProcess.kill`` still finishes its own."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the zygote (blocks ~50 ms while Python starts; once per server, and
        again after it died)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        environment = {name: os.environ[name] for name in self._safe_env if name in os.environ}
        try:
            with theirs:
                self._process = subprocess.Popen(
                    [sys.executable, "-I", "-c",
                     _ZYGOTE_BOOT.format(root=_PACKAGE_ROOT, fd=theirs.fileno())],
                    env=environment, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    cwd="/",
                )
            ours.setblocking(False)
            asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
        except BaseException:
            ours.close()
            raise
        self._control = ours

    async def spawn(self, limits: ChildLimits) -> ChildProcess:
        """A new child (not yet known to be ready). Raises ``SpawnerGone`` (the zygote
        died or refused) or ``OSError`` (out of fds or processes)."""
        async with self._lock:
            if self._control is None:
                self.start()
            control = self._control
            if control is None:
                raise SpawnerGone("the zygote did not start")
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._next_id += 1
            request_id = self._next_id
            answer: asyncio.Future[_Started] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = answer
            with theirs:
                try:
                    zygote.send(control, zygote.Spawn(id=request_id, limits=limits),
                                theirs.fileno())
                except OSError as exc:
                    del self._pending[request_id]
                    ours.close()
                    self._gone(f"the zygote's socket broke: {exc}")
                    raise SpawnerGone(str(exc)) from None
        try:
            pid, pidfd, exited = await answer  # cancelled: _on_readable kills the child
        except BaseException:
            ours.close()
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                kill_pidfd(answer.result()[1])  # answered, then the caller went away
                os.close(answer.result()[1])
            raise
        ours.setblocking(False)
        return ChildProcess(pid, pidfd, ours, exited, self.reaping)

    def close(self) -> None:
        """Stop the zygote: closing its socket makes it kill the children it still has
        and exit; killed only if it does not within 5 s."""
        process = self._process
        self._gone("the sandbox pool closed", reap=False)
        if process is not None:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _on_readable(self) -> None:
        control = self._control
        if control is None:
            return
        while True:
            try:
                data, ancillary, flags, _ = control.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._gone(f"the zygote's socket broke: {exc}")
                return
            if not data:
                self._gone("the zygote exited")
                return
            fd = zygote.receive_fd(ancillary)
            try:
                message = self._decoder.decode(data)
            except msgspec.DecodeError:
                message = None
            if message is None or flags & socket.MSG_CTRUNC:
                # Out of fds (the pidfd was dropped) or a broken zygote: its children
                # can no longer be told apart safely. Start afresh.
                if fd is not None:
                    os.close(fd)
                self._gone("the zygote's message was cut or undecodable")
                return
            self._dispatch(message, fd)

    def _dispatch(self, message: zygote.FromZygote, fd: int | None) -> None:
        match message:
            case zygote.Spawned(id=request_id, pid=pid):
                future = self._pending.pop(request_id, None)
                if fd is None or future is None or future.done():
                    if fd is not None:  # the caller went away: nobody will use it
                        kill_pidfd(fd)
                        os.close(fd)
                    if future is not None and not future.done():
                        future.set_exception(SpawnerGone("no pidfd came with the child"))
                    return
                # Resolved with the child's exit code (minus the signal) once it is
                # reaped, or None if the zygote dies before telling.
                exited = self._exits[pid] = asyncio.get_running_loop().create_future()
                future.set_result((pid, fd, exited))
            case zygote.SpawnFailed(id=request_id, message=text):
                if fd is not None:
                    os.close(fd)
                failed = self._pending.pop(request_id, None)
                if failed is not None and not failed.done():
                    failed.set_exception(SpawnerGone(text))
            case zygote.Exited(pid=pid, code=code):
                if fd is not None:
                    os.close(fd)
                if pid in self._exits:
                    _resolve(self._exits.pop(pid), code)

    def _gone(self, reason: str, *, reap: bool = True) -> None:
        """The zygote is unusable: fail what waits on it; the pool kills the children.
        ``reap``: kill and reap the zygote process now (it is broken)."""
        control, self._control = self._control, None
        if control is None:
            return
        with contextlib.suppress(ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(control.fileno())
        control.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(SpawnerGone(reason))
        exits, self._exits = self._exits, {}
        for exit_code in exits.values():
            _resolve(exit_code, None)
        process, self._process = self._process, None
        if process is not None and reap:
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()
        self._on_death()


def _resolve(future: asyncio.Future[_T], value: _T) -> None:
    if not future.done():
        future.set_result(value)
