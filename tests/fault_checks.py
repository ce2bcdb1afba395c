"""What the fault-injection suite and ``make chaos`` look at: a session's events as a
client sees them, and what a server leaves behind after a fault.

    Watched(ws)           reads every event of a session in the background; ``wait``
                          for one, ``errors()``, ``close``
    Leftovers.measure()   processes below the zygote that are no sandbox of the pool,
                          zombie children of this process, file descriptors of this
                          process above a baseline, per-session metric series

Every wait is bounded (``SCALE`` stretches the bounds); nothing here reads a clock to
judge the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

SCALE = float(os.environ.get("TROUPE_TEST_TIMEOUT_SCALE", "1"))
FRAME = base64.b64encode(bytes(2 * 1920)).decode()
"""80 ms of pcm16 silence at 24 kHz, base64: one ``input_audio_buffer.append``."""

Event = dict[str, Any]


def say(words: str) -> Event:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": words}]}}


class Watched:
    """One session, read in the background: every event is kept in ``events``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[Event] = []
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.ended = asyncio.Event()
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message.type is aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(message.data))
                    self._new.set()
                elif message.type is aiohttp.WSMsgType.CLOSE:
                    self.close_reason = message.extra or ""
                    break
                elif message.type is not aiohttp.WSMsgType.BINARY:
                    break  # CLOSING, CLOSED, ERROR
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.close_code = self.ws.close_code
            self.ended.set()
            self._new.set()

    async def send(self, event: Event) -> None:
        await self.ws.send_str(json.dumps(event))

    async def wait(self, match: Callable[[Event], bool], after: int = 0,
                   within: float = 20.0) -> int:
        """The index of the first event from ``after`` on that ``match``es; raises
        ``AssertionError`` when the session ends or ``within`` seconds pass first."""
        try:
            async with asyncio.timeout(within * SCALE):
                while True:
                    for index in range(after, len(self.events)):
                        if match(self.events[index]):
                            return index
                    after = len(self.events)
                    if self.ended.is_set():
                        raise AssertionError(
                            f"the session ended ({self.close_code}) without it; got "
                            f"{kinds(self.events[-8:])}")
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(
                f"not within {within * SCALE:g} s; the last events: "
                f"{kinds(self.events[-8:])}") from None

    async def wait_for(self, kind: str, after: int = 0, within: float = 20.0) -> int:
        return await self.wait(lambda event: event["type"] == kind, after, within)

    async def turn(self, words: str, within: float = 20.0) -> list[Event]:
        """A text turn: the events from the message to its ``response.done``."""
        mark = len(self.events)
        await self.send(say(words))
        await self.send({"type": "response.create"})
        done = await self.wait_for("response.done", mark, within)
        return self.events[mark:done + 1]

    def errors(self, after: int = 0) -> list[Event]:
        return [event for event in self.events[after:] if event["type"] == "error"]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)


def kinds(events: list[Event]) -> list[str]:
    return [event["type"] + (f"({event['error']['code']})" if event["type"] == "error"
                             else "") for event in events]


def status(events: list[Event]) -> str | None:
    """The status of the last ``response.done`` among ``events``."""
    done = [event for event in events if event["type"] == "response.done"]
    return done[-1]["response"]["status"] if done else None


def codes(events: list[Event]) -> list[str]:
    return [event["error"]["code"] for event in events if event["type"] == "error"]


async def speak(session: Watched, stop: asyncio.Event, pace: float = 0.02) -> int:
    """Stream 80 ms frames of audio every ``pace`` seconds (faster than real time, as
    a client catching up does) until ``stop``; returns the frames sent."""
    sent = 0
    while not stop.is_set() and not session.ended.is_set():
        try:
            await session.send({"type": "input_audio_buffer.append", "audio": FRAME})
        except (aiohttp.ClientError, ConnectionError):
            break
        sent += 1
        await asyncio.sleep(pace)
    return sent


async def eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    """Whether ``check()`` holds within ``within`` seconds (polled)."""
    for _ in range(int(within * SCALE / 0.05)):  # polled: /proc has no events to wait on
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


# ── processes ────────────────────────────────────────────────────────────────


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Running or stopped, as opposed to gone or a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children_of(pids: set[int] | None = None) -> dict[int, list[tuple[int, str]]]:
    """Each process's children with their states."""
    tree: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None:
            tree.setdefault(int(fields[1]), []).append((int(entry.name), fields[0]))
    return tree


def descendants(root: int) -> set[int]:
    """Live (not zombie) processes below ``root``."""
    tree = children_of()
    found: set[int] = set()
    todo = [root]
    while todo:
        for child, state in tree.get(todo.pop(), []):
            if state != "Z":
                found.add(child)
            todo.append(child)
    return found


def zombies(parent: int | None = None) -> list[int]:
    """Children of ``parent`` (this process) that died and were never reaped."""
    return [pid for pid, state in children_of().get(parent or os.getpid(), [])
            if state == "Z"]


def cpu_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12]) if fields is not None else 0


def kill(pid: int, signum: signal.Signals = signal.SIGKILL) -> None:
    os.kill(pid, signum)


# ── file descriptors and metrics ─────────────────────────────────────────────


def open_fds(pid: int | None = None) -> dict[int, str]:
    """This process's (or ``pid``'s) open fds and what each points at."""
    found: dict[int, str] = {}
    base = f"/proc/{pid or 'self'}/fd"
    for name in os.listdir(base):
        try:
            found[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            pass  # the listing's own fd, closed already
    return found


SERIES = re.compile(r'^[a-z_]+\{[^}]*session_id="[^"]*"[^}]*\} ', re.M)


def session_series(exposition: str) -> list[str]:
    """The lines of a ``/metrics`` answer that carry a ``session_id`` label."""
    return [match.group(0).strip() for match in SERIES.finditer(exposition)]


@dataclass
class Leftovers:
    """What a fault left behind once the sessions closed and things settled."""

    strays: set[int] = field(default_factory=set)
    """Processes below the zygote that are no child of the pool."""
    extra_children: int = 0
    """Pool children beyond its idle ones and the server-wide set's."""
    zombies: list[int] = field(default_factory=list)
    fds: dict[int, str] = field(default_factory=dict)
    """Descriptors open now that were not at the baseline."""
    series: list[str] = field(default_factory=list)
    links: int = 0
    """Proxied connections still open."""

    @property
    def clean(self) -> bool:
        return not (self.strays or self.extra_children > 0 or self.zombies or self.fds
                    or self.series or self.links)

    def row(self) -> str:
        return (f"procs {len(self.strays) + max(self.extra_children, 0) + len(self.zombies)}"
                f" fds {len(self.fds)} series {len(self.series)}")


# ── an in-process server after a fault ───────────────────────────────────────


def settled(app: Any, proxies: Any = ()) -> bool:
    """No session open, no proxied connection open, the sandbox pool refilled."""
    from server.app import POOL, SESSIONS

    pool = app[POOL]
    return (not app[SESSIONS] and not any(proxy.open_links for proxy in proxies)
            and pool.idle >= pool.config.pool_size and extra_children(pool) == 0)


def extra_children(pool: Any) -> int:
    """Children of the pool beyond its idle ones, the server-wide set's and the warm
    directories' (``sandbox.Pool`` keeps some directories loaded in spare children)."""
    warm = len(getattr(pool, "warm_directories", ()))
    return len(pool.live_pids) - int(pool.config.pool_size) - 1 - warm


async def leftovers(app: Any, baseline: dict[int, str], exposition: str,
                    proxies: Any = (), within: float = 10.0) -> Leftovers:
    """What is left once the server has had ``within`` seconds to settle; ``baseline``:
    ``open_fds()`` taken when it was settled before the fault."""
    from server.app import POOL

    pool = app[POOL]
    await eventually(lambda: settled(app, proxies), within)
    found = Leftovers()
    await eventually(lambda: not (descendants(pool.zygote_pid or 0) - set(pool.live_pids)),
                     within)
    found.strays = descendants(pool.zygote_pid or 0) - set(pool.live_pids)
    found.extra_children = extra_children(pool)
    await eventually(lambda: not zombies(), within)
    found.zombies = zombies()

    def new_fds() -> dict[int, str]:
        now = open_fds()
        return {fd: target for fd, target in now.items()
                if baseline.get(fd) != target}

    await eventually(lambda: len(open_fds()) <= len(baseline), within)
    if len(open_fds()) > len(baseline):
        found.fds = new_fds()
    found.series = session_series(exposition)
    found.links = sum(len(proxy.open_links) for proxy in proxies)
    return found
