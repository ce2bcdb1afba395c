"""How long a session may last: idle, and in all (README "The front door").

    session opens ─▶ watch(): sleep until the nearer deadline, then look again
      nothing from the client for --idle-timeout     ─▶ close 1000 "idle for N s"
      open for --max-session                         ─▶ error session_expired, close 1000

``due`` decides on the monotonic clock without I/O; ``watch`` is the task that acts on
it. Only frames the client sends count as activity: WebSocket pings (which SDKs send on
their own every 20 s or so) keep a dead peer from lingering (``--heartbeat``), not an
idle one.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import Protocol

from aiohttp import WSCloseCode

from .. import metrics
from ..errors import TroupeError


class Expiry(enum.Enum):
    IDLE = "idle"
    MAX_LENGTH = "max_length"


@dataclass(frozen=True)
class Deadlines:
    idle: float | None
    """Seconds without a client frame before the session closes; None: never."""
    max_length: float | None
    """Seconds a session may last; None: no limit."""

    def due(self, started: float, last_heard: float, now: float) -> tuple[Expiry | None, float]:
        """What has expired at ``now`` (the session's length first), else None and the
        seconds until the next deadline could fall (``inf``: none is set)."""
        waits = []
        if self.max_length is not None:
            left = started + self.max_length - now
            if left <= 0:
                return Expiry.MAX_LENGTH, 0.0
            waits.append(left)
        if self.idle is not None:
            left = last_heard + self.idle - now
            if left <= 0:
                return Expiry.IDLE, 0.0
            waits.append(left)
        return None, min(waits, default=float("inf"))


class Watched(Protocol):
    """What ``watch`` needs of a session (``server.session.Session``)."""

    started: float
    last_heard: float

    async def send_error(self, error: TroupeError, event_id: str | None = None) -> None: ...

    def end(self, code: int, reason: str, why: str = "") -> None: ...


async def watch(session: Watched, deadlines: Deadlines) -> None:
    """Close ``session`` at its first deadline; returns then (cancel it when the
    session ends first)."""
    while True:
        expired, wait = deadlines.due(session.started, session.last_heard, time.monotonic())
        if expired is not None:
            metrics.SESSIONS_EXPIRED.labels(expired.value).inc()
        match expired:
            case Expiry.MAX_LENGTH:
                limit = _duration(deadlines.max_length or 0)
                await session.send_error(TroupeError(
                    "session_expired",
                    f"this session reached its maximum length of {limit} (--max-session); "
                    "open a new one to go on",
                ))
                session.end(WSCloseCode.OK, f"session expired after {limit}",
                            why="the maximum session length")
                return
            case Expiry.IDLE:
                idle = _duration(deadlines.idle or 0)
                session.end(WSCloseCode.OK, f"idle for {idle}: no event from the client",
                            why="the idle timeout")
                return
        if wait == float("inf"):
            return
        await asyncio.sleep(wait)


def _duration(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
