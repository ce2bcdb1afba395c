"""What the load test's sessions do (``sessions.Session`` is how they talk):

    Reloader        reloads its owner's directories while a storm is on, each answer
                    (and a list right after it) checked against the directory asked for
    churn_cycle     open, one reload (checked), close
    loop_lag        how late this process's own event loop wakes: the load generator's
                    share of any lateness it measures
    stagger         when each of N sessions joins a ramp
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.loadtest.characters import Directories, check
from scripts.loadtest.sessions import Failed, Run, Session


@dataclass
class Reloader:
    """A session's reload loop over its ``owner``'s directories."""

    session: Session
    owner: str
    directories: Directories
    rate: float
    """Reloads a second; 0: back to back."""
    rng: random.Random

    async def run(self, active: asyncio.Event, stop: asyncio.Event) -> None:
        """Reload while ``active`` is set, until ``stop`` is."""
        paths = self.directories.per_owner[self.owner]
        current: Path | None = None
        next_at = time.monotonic()
        while not stop.is_set() and not self.session.closed:
            if not active.is_set():
                await _first(active.wait(), stop.wait())
                next_at = time.monotonic()
                continue
            choices = [p for p in paths if p != current] or paths
            current = self.rng.choice(choices)
            with contextlib.suppress(Failed):  # counted where it was seen
                await reload_and_check(self.session, self.owner, current, self.directories)
            if self.rate > 0:
                next_at = max(next_at + 1 / self.rate, time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                        await stop.wait()


async def _first(*waits: Any) -> None:
    """Wait for the first of ``waits`` (coroutines) to finish; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def reload_and_check(session: Session, owner: str, directory: Path,
                           directories: Directories, list_after: bool = True) -> None:
    """Reload ``directory``, time it, and check the reloaded set (and, with
    ``list_after``, a list right after it) is exactly the directory's. Raises
    ``Failed`` (the error is already counted)."""
    run = session.run
    started = time.monotonic()
    reloaded = await session.request(
        {"type": "session.characters.reload", "directory": str(directory)},
        "session.characters.reloaded")
    run.recorder.reload_ms.add(run.now(), (time.monotonic() - started) * 1000)
    if reloaded.duration_ms is not None:
        run.recorder.reload_server_ms.add(run.now(), reloaded.duration_ms)
    answers = [("session.characters.reloaded", reloaded)]
    if list_after:
        answers.append(("session.characters.listed", await session.request(
            {"type": "session.characters.list"}, "session.characters.listed")))
    expected = directories.names[directory]
    for what, event in answers:
        result = check(owner, directory, expected, [c.name for c in event.characters])
        run.recorder.reloads_checked += 1
        if result.violation:
            run.recorder.violation(result.details(session.id, what, round(run.now(), 2)))
        elif not result.exact:
            run.recorder.mismatch(result.details(session.id, what, round(run.now(), 2)))


async def churn_cycle(run: Run, owner: str, directory: Path, directories: Directories) -> None:
    """Connect, reload ``directory`` (checked), disconnect. Raises ``Failed``."""
    session = await Session.open(run)
    try:
        await reload_and_check(session, owner, directory, directories, list_after=False)
    finally:
        await session.close()


async def open_or_none(run: Run) -> Session | None:
    """``Session.open``, or None when it failed (the failure is counted)."""
    try:
        return await Session.open(run)
    except Failed:
        return None


async def loop_lag(run: Run, stop: asyncio.Event, every: float = 0.05) -> None:
    """How late this process's own event loop wakes up: the load generator's share
    of any lateness it measures."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(every)
        run.recorder.client_lag_ms.add(run.now(), max(0.0, time.monotonic() - before - every)
                                       * 1000)


def stagger(count: int, per_second: float, rng: random.Random) -> list[float]:
    """Start offsets (seconds) for ``count`` sessions ramped at ``per_second``, each
    jittered within its slot so that sessions do not speak in lockstep."""
    slot = 1 / per_second
    return [i * slot + rng.uniform(0, slot) for i in range(count)]


def reloader_count(sessions: int, fraction: float) -> int:
    """How many of ``sessions`` reload: ``fraction`` of them, at least one when the
    fraction is not 0, and never all (someone must stream for the comparison)."""
    if fraction <= 0 or sessions < 2:
        return 0
    return min(sessions - 1, max(1, round(sessions * fraction)))


def reloader_owner(index: int) -> str:
    return f"r{index:04d}"


def churn_owner(index: int) -> str:
    return f"w{index:04d}"
