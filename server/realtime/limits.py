"""The bounded containers a session keeps for its client (sans-I/O; README "Limits").

    client frames ─▶ receive loop ─▶ Backlog ─▶ worker ─┐
                        │ refused frames: SlidingWindow  │ server events
    reply, STT reader ──┴────────────────────────────────┴─▶ Outbox ─▶ writer ─▶ socket
    session.characters.reload ─▶ ReloadLimit (per minute)

``Backlog.offer`` and ``Outbox.push`` never wait: they say no, and the session
decides what that means (an ``error``, then a close). Sizes are in characters of
the JSON text, close to the bytes it takes in memory.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

T = TypeVar("T")


class Backlog(Generic[T]):
    """What waits for the session's worker, in order: at most ``max_items`` items
    and ``max_size`` characters of the frames they came from (one item of any size
    when it is empty)."""

    def __init__(self, max_items: int, max_size: int) -> None:
        self.max_items = max_items
        self.max_size = max_size
        self.size = 0
        self.dropped = 0
        """Offers refused since the last one accepted: the current overflow, if any."""
        self._queue: asyncio.Queue[tuple[T, int]] = asyncio.Queue()

    def __len__(self) -> int:
        return self._queue.qsize()

    def offer(self, item: T, size: int) -> bool:
        """Queue a client's event; ``False`` (nothing queued) when full."""
        if len(self) and (len(self) >= self.max_items or self.size + size > self.max_size):
            self.dropped += 1
            return False
        self.dropped = 0
        self.size += size
        self._queue.put_nowait((item, size))
        return True

    def put(self, item: T) -> None:
        """Queue what the server decided itself (a turn): never refused, since its
        number is bounded by what was offered (a turn needs audio the worker took)."""
        self._queue.put_nowait((item, 0))

    async def get(self) -> T:
        item, size = await self._queue.get()
        self.size -= size
        return item

    def clear(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self.size = 0


class Outbox:
    """Frames for the client, in order, at most ``limit`` characters of them (one
    frame of any size when it is empty), taken by one writer."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._frames: collections.deque[str] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def push(self, frame: str) -> bool:
        """Queue ``frame``; ``False`` (nothing queued) when it would pass the limit.
        Once closed, frames are dropped."""
        if self._closed:
            return True
        if self._frames and self.size + len(frame) > self.limit:
            return False
        self._frames.append(frame)
        self.size += len(frame)
        self._ready.set()
        return True

    async def get(self) -> str | None:
        """The next frame; ``None`` once closed and empty."""
        while not self._frames:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        self.size -= len(frame)
        return frame

    def close(self, drop: bool) -> None:
        """Take no more frames; ``drop`` the ones waiting too."""
        self._closed = True
        if drop:
            self._frames.clear()
            self.size = 0
        self._ready.set()


class SlidingWindow:
    """Counts hits in the last ``seconds`` (of a clock the caller passes)."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._times: collections.deque[float] = collections.deque(maxlen=limit + 1)

    def hit(self, now: float) -> bool:
        """Count one at ``now``; ``True`` when that makes more than ``limit``."""
        while self._times and now - self._times[0] >= self.seconds:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) > self.limit


class ReloadLimit:
    """At most ``per_minute`` reloads in any 60 s (of a clock the caller passes)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._times: collections.deque[float] = collections.deque()

    def take(self, now: float) -> float | None:
        """Count a reload at ``now``; when that is one too many, count nothing and
        return the seconds until the next is allowed."""
        while self._times and now - self._times[0] >= 60:
            self._times.popleft()
        if len(self._times) >= self.per_minute:
            return 60 - (now - self._times[0])
        self._times.append(now)
        return None
