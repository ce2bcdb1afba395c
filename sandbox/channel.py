"""Host side of one child: its channel, a ``ChildProcess`` (``process.Spawner`` starts it).

    ChildProcess     requests out on the channel, replies in through loop.add_reader,
                     matched to their request by id; kill() = pidfd SIGKILL + reap

The child is untrusted: replies are decoded with a typed decoder; an oversized or
undecodable frame, or a reply to an id never asked, counts as the child dying. A
caller that goes away (cancelled) leaves its request behind as *abandoned*: the
child's late answer is dropped, never handed to the next caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from . import wire
from .config import ChildLimits


class ChildDied(Exception):
    """The channel closed or the child broke the protocol; the message says how."""


class Spawns(Protocol):
    """What ``ChildProcess.spawn`` needs of ``process.Spawner`` (which imports this
    module, so it is not named here)."""

    async def spawn(self, limits: ChildLimits) -> ChildProcess: ...


class ChildProcess:
    """One started child and its channel. One request at a time (callers serialise)."""

    def __init__(
        self, pid: int, pidfd: int, channel: socket.socket, exited: asyncio.Future[int | None],
        reaping: set[asyncio.Future[None]],
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._sock = channel
        self._exited = exited
        self._reaping = reaping
        self._loop = asyncio.get_running_loop()
        self._frames = wire.FrameBuffer()
        self._waiting: dict[int, asyncio.Queue[wire.Reply | None]] = {}
        self._progress: dict[int, Callable[[wire.Progress | wire.Compiled], None]] = {}
        self._abandoned: set[int] = set()
        self.dead_reason: str | None = None
        self.protections: list[str] = []
        self.requests = 0
        """Requests sent so far."""
        self._busy_seconds = 0.0
        self._busy_since: float | None = None
        self.innocent = False
        """Killed for a cause of ours (see ``kill_now``)."""
        self.abandoned_deadline = 10.0
        """Seconds an abandoned request may still run (the pool sets the call deadline)."""
        self.on_idle_death: Callable[[str], None] | None = None
        """Called with the reason when the child dies while no request is in flight
        (nobody waits to hear it otherwise); not when we kill it."""
        self._next_id = 0
        self._closed = False
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    @classmethod
    async def spawn(cls, spawner: Spawns, limits: ChildLimits, ready_timeout: float
                    ) -> ChildProcess:
        """Start a child through the zygote and wait for its first Pong."""
        started = await spawner.spawn(limits)
        try:
            async with asyncio.timeout(ready_timeout):
                replies = started.expect(0)
                reply = await started.receive(replies)
            if not isinstance(reply, wire.Pong):
                started._die(f"sent {type(reply).__name__} instead of its ready Pong")
                raise ChildDied(started.dead_reason)
            started.finish(0)
            started.protections = reply.protections
        except BaseException:
            await started.kill()
            raise
        return started

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and not self._closed

    @property
    def exitcode(self) -> int | None:
        """The exit code once the zygote reaped the child (minus the killing signal)."""
        if self._exited.done() and not self._exited.cancelled():
            return self._exited.result()
        return None

    @property
    def busy(self) -> bool:
        """A request is in flight."""
        return bool(self._waiting)

    def busy_seconds(self) -> float:
        """Wall-clock seconds spent with a request outstanding (awaited or abandoned),
        in the child's life: the most CPU a child without threads may use for its
        work (the watchdog charges it for the rest)."""
        ongoing = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_seconds + ongoing

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def expect(
        self, request_id: int,
        on_progress: Callable[[wire.Progress | wire.Compiled], None] | None = None,
    ) -> asyncio.Queue[wire.Reply | None]:
        """Start waiting for replies to ``request_id`` (before sending it).

        With ``on_progress``, the request's Progress and Compiled replies are handed to
        it as they are read, in the reader callback, and only the final reply is
        queued: a load of 20 files wakes its caller once, not 22 times (on a busy
        loop each wake-up waits for a whole iteration)."""
        replies: asyncio.Queue[wire.Reply | None] = asyncio.Queue()
        if on_progress is not None:
            self._progress[request_id] = on_progress
        self.requests += 1
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        if self.dead_reason is not None:
            replies.put_nowait(None)
        self._waiting[request_id] = replies
        return replies

    def finish(self, request_id: int, *, answered: bool = True) -> None:
        """Stop waiting for ``request_id``. Unanswered, its late replies are dropped."""
        self._waiting.pop(request_id, None)
        self._progress.pop(request_id, None)
        if not answered and self.alive:
            self._abandoned.add(request_id)
            self._loop.call_later(self.abandoned_deadline, self._still_abandoned, request_id)
        self._settle_busy()

    async def send_frame(self, message: wire.Message) -> None:
        if not self.alive:
            raise ChildDied(self.dead_reason or "the child was closed")
        try:
            await self._loop.sock_sendall(self._sock, wire.encode(message))
        except OSError as exc:
            self._die(f"the channel broke while sending: {exc}")
            raise ChildDied(self.dead_reason) from exc

    async def receive(self, replies: asyncio.Queue[wire.Reply | None]) -> wire.Reply:
        """The next reply on ``replies`` (from ``expect``). Raises ``ChildDied``."""
        reply = await replies.get()
        if reply is None:
            raise ChildDied(self.dead_reason or "the channel closed")
        return reply

    async def request(self, message: wire.Request) -> wire.Reply:
        """Send ``message`` and return the reply carrying its id. Raises ``ChildDied``.

        Cancel-safe: cancelled at any point, the request is abandoned and its reply,
        whenever it comes, is dropped."""
        replies = self.expect(message.id)
        answered = False
        try:
            await self.send_frame(message)
            reply = await self.receive(replies)
            answered = True
            return reply
        finally:
            self.finish(message.id, answered=answered)

    def exit_description(self) -> str:
        """How the process ended, for error messages (call after it died)."""
        code = self.exitcode
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with code {code}"

    async def wait_exit(self, within: float) -> None:
        """Wait up to ``within`` seconds for the process to end and be reaped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), within)

    def kill_now(self, reason: str, *, innocent: bool = False) -> None:
        """SIGKILL the child at once (no reaping: ``kill`` does that). ``innocent``:
        the cause is ours (the zygote died), not the character code it was running."""
        self.innocent = innocent
        self._die(reason)
        kill_pidfd(self._pidfd)

    async def kill(self) -> None:
        """SIGKILL the child, close the channel, and wait until it is reaped.

        Cancelling the caller does not stop the reaping: it runs in a shielded task
        that the spawner keeps until the process is gone and its fds are closed.
        """
        if self._closed:
            return
        self._closed = True
        self._die("the sandbox killed it")
        kill_pidfd(self._pidfd)
        self._sock.close()
        reaping = asyncio.ensure_future(self._reap())
        self._reaping.add(reaping)
        reaping.add_done_callback(self._reaping.discard)
        await asyncio.shield(reaping)

    async def _reap(self) -> None:
        await self.wait_exit(5.0)
        os.close(self._pidfd)

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
                self._route(wire.decode_reply(frame))
        except (wire.FrameTooLarge, msgspec.DecodeError, ChildDied, RecursionError) as exc:
            self._die(f"it broke the protocol: {exc or type(exc).__name__}")

    def _route(self, reply: wire.Reply) -> None:
        replies = self._waiting.get(reply.id)
        if replies is not None:
            on_progress = self._progress.get(reply.id)
            if on_progress is not None and isinstance(reply, wire.Progress | wire.Compiled):
                on_progress(reply)
            else:
                replies.put_nowait(reply)
        elif reply.id in self._abandoned:
            if wire.is_final(reply):
                self._abandoned.discard(reply.id)
                self._settle_busy()
        else:
            raise ChildDied(f"it answered request {reply.id}, which was never asked")

    def _still_abandoned(self, request_id: int) -> None:
        """An abandoned request must still end within the call deadline: a child
        looping on one would be charged no idle CPU (it counts as busy)."""
        if request_id in self._abandoned and self.alive:
            self.kill_now(f"it did not finish an abandoned request within "
                          f"{self.abandoned_deadline:g} s")

    def _settle_busy(self) -> None:
        """Stop the busy clock once no request is outstanding: neither awaited nor
        abandoned (the child is still working on an abandoned one)."""
        if not self._waiting and not self._abandoned and self._busy_since is not None:
            self._busy_seconds += time.monotonic() - self._busy_since
            self._busy_since = None

    def _die(self, reason: str) -> None:
        """Mark the child dead and SIGKILL it: a broken channel is never used again,
        and a child that broke the protocol must not go on running."""
        if self.dead_reason is None:
            self.dead_reason = reason
            kill_pidfd(self._pidfd)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
            for replies in self._waiting.values():
                replies.put_nowait(None)
            if not self._waiting and not self._closed and self.on_idle_death is not None:
                self.on_idle_death(reason)


def kill_pidfd(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)

