"""One phase: its sessions play while an injector works, then close, and what the
server left once it settled goes into the phase's ``Row`` of the table."""

from __future__ import annotations

import argparse
import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from scripts.chaos.players import Player, open_players
from scripts.chaos.stage import Stage
from server.app import SESSIONS
from tests.fault_checks import codes, eventually, leftovers, open_fds, settled

Injector = Callable[[list[Player], asyncio.Event], Coroutine[Any, Any, int]]
"""Hurts the sessions' backends or children while they play; returns how often."""


@dataclass
class Row:
    name: str
    injected: int = 0
    sessions: int = 0
    disturbed: int = 0
    turns_ok: int = 0
    turns_lost: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    procs: int | str = 0
    fds: int | str = 0
    series: int | str = 0
    notes: list[str] = field(default_factory=list)


HEADER = (f"{'fault':<26} {'injected':>8} {'sessions':>8} {'disturbed':>9} "
          f"{'turns ok/lost':>13}  {'errors by code':<44} {'procs':>5} {'fds':>4} "
          f"{'series':>6}")


def format_row(row: Row) -> str:
    errors = ", ".join(f"{code} {n}" for code, n in sorted(row.errors.items())) or "-"
    line = (f"{row.name:<26} {row.injected:>8} {row.sessions:>8} {row.disturbed:>9} "
            f"{f'{row.turns_ok}/{row.turns_lost}':>13}  {errors:<44} {row.procs!s:>5} "
            f"{row.fds!s:>4} {row.series!s:>6}")
    return line + (f"  ({'; '.join(row.notes)})" if row.notes else "")


async def run_phase(stage: Stage, name: str, args: argparse.Namespace,
                    play: Callable[[list[Player]], Awaitable[None]],
                    inject: Injector,
                    setup: Callable[[list[Player]], Awaitable[None]] | None = None) -> Row:
    """Sessions play while the injector works; then they close and the server settles."""
    app = stage.app
    assert app is not None
    row = Row(name)
    await eventually(lambda: settled(app, stage.proxies.values()), 20)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stage.url}/metrics") as response:
            await response.read()
        baseline = open_fds()
        players = await open_players(http, stage.url, args.sessions, stage.turn_bound)
        if setup is not None:
            await setup(players)
        playing = asyncio.Event()
        injector = asyncio.create_task(inject(players, playing))
        try:
            await play(players)
        finally:
            playing.set()
            row.injected = await injector
        for proxy in stage.proxies.values():
            proxy.disarm()
        row.sessions = len(players)
        row.disturbed = sum(player.disturbed for player in players)
        for player in players:
            await player.session.close()
        row.turns_ok = sum(player.turns_ok for player in players)
        row.turns_lost = sum(player.turns_lost for player in players)
        for player in players:
            row.errors.update(codes(player.session.events))
        for _ in range(100):  # series go once the server has ended each session
            async with http.get(f"{stage.url}/metrics") as response:
                exposition = await response.text()
            if not app[SESSIONS] and "session_id=" not in exposition:
                break
            await asyncio.sleep(0.1)
        left = await leftovers(app, baseline, exposition, stage.proxies.values(), 20)
    row.procs = len(left.strays) + max(left.extra_children, 0) + len(left.zombies)
    row.fds = len(left.fds)
    row.series = len(left.series)
    if left.links:
        row.notes.append(f"{left.links} proxied connections open")
    if left.fds:
        kinds = collections.Counter(target.split(":")[0] for target in left.fds.values())
        row.notes.append("new fds: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    return row
