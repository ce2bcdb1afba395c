"""What hurts the sessions while they play: a backend's connections through its
``FaultProxy`` (latency, stall, cut, reset, refused) or a session's sandbox child
(killed mid-request, stopped)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from scripts.chaos.phase import Injector
from scripts.chaos.players import Player, answer, select
from scripts.chaos.stage import TURN_BOUND, Stage
from server.app import POOL, SESSIONS
from tests.fakes.fault_proxy import Fault, Refuse
from tests.fault_checks import Watched, cpu_ticks, eventually


async def _rounds(rounds: int, playing: asyncio.Event, one: Callable[[], Awaitable[bool]],
                  pause: float = 0.4) -> int:
    """``one()`` up to ``rounds`` times (a false return does not count) while the
    sessions play."""
    done = 0
    while done < rounds and not playing.is_set():
        await asyncio.sleep(random.uniform(0.1, pause))
        if playing.is_set():
            break
        if await one():
            done += 1
    return done


def backend_injector(stage: Stage, backend: str, fault: Fault, rounds: int) -> Injector:
    proxy = stage.proxies[backend]
    attempts = 3 if backend == "llm" else 2  # the SDK retries twice, aiohttp once

    async def inject(players: list[Player], playing: asyncio.Event) -> int:
        async def one() -> bool:
            if backend == "stt" and not isinstance(fault, Refuse):
                live = proxy.open_links
                if not live:
                    return False
                proxy.hurt(random.choice(live), fault)
                return True
            proxy.arm(fault, attempts if isinstance(fault, Refuse) else 1)
            # The next round once a connection took it (or the sessions are done).
            for _ in range(200):
                if proxy.armed == 0 or playing.is_set():
                    break
                await asyncio.sleep(0.05)
            return proxy.armed == 0

        return await _rounds(rounds, playing, one)

    return inject


def sandbox_injector(stage: Stage, kind: str, rounds: int) -> Injector:
    async def inject(players: list[Player], playing: asyncio.Event) -> int:
        app = stage.app
        assert app is not None

        async def one() -> bool:
            index = random.randrange(len(players))
            player = players[index]
            async with player.lock:
                if playing.is_set():
                    return False
                session = _server_session(app, index)
                if session is None or session.characters.sandbox is None:
                    return False
                await _sandbox_fault(stage, kind, player, session.characters.sandbox)
                return True

        return await _rounds(rounds, playing, one, pause=0.6)

    return inject


def _server_session(app: web.Application, index: int) -> Any:
    sessions = list(app[SESSIONS].values())
    return sessions[index] if index < len(sessions) else None


async def _in_flight(sandbox: Any) -> bool:
    """Until the child holds a request it has not answered (a private read, as in
    the fault tests: nothing public says so)."""
    return await eventually(lambda: sandbox._child is not None and sandbox._child.busy, 10)


async def _sandbox_fault(stage: Stage, kind: str, player: Player, sandbox: Any) -> None:
    """One fault on ``player``'s sandbox, and the request it hits counted as a turn."""
    session, pid = player.session, sandbox.pid
    mark = len(session.events)
    if kind == "kill-load":
        app = stage.app
        assert app is not None
        pool = app[POOL]
        seen: dict[int, int] = {}

        def loader() -> int | None:
            for child in pool.live_pids:
                seen.setdefault(child, cpu_ticks(child))
            busy = [child for child, first in seen.items() if cpu_ticks(child) - first > 20]
            return busy[0] if busy else None

        await session.send({"type": "session.characters.reload",
                            "directory": str(stage.root / "slow")})
        if await eventually(lambda: loader() is not None, 10) and (victim := loader()):
            os.kill(victim, signal.SIGKILL)
        answered = await answer(session, mark, ("session.characters.reloaded", "error"))
        player.count("completed" if answered == "session.characters.reloaded" else None)
        mark = len(session.events)
        await session.send({"type": "session.characters.reload",
                            "directory": str(stage.root / "cast")})
        await answer(session, mark, ("session.characters.reloaded", "error"))
        await select(session, "Tired")
        return
    if kind == "kill-tool":
        await session.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Take a nap."}]}})
        await session.send({"type": "response.create"})
        await eventually(lambda: any(e["type"] == "response.created"
                                     for e in session.events[mark:]), 10)
        await asyncio.sleep(0.1)  # the tools are fetched, the model asks for the nap
        if await _in_flight(sandbox):
            os.kill(pid, signal.SIGKILL)
        player.count(await _done(session, mark))
        return
    os.kill(pid, signal.SIGSTOP)
    if kind == "stop":  # never killed by us: the call's deadline does it
        await player.text_turn("Still there?")
        return
    if kind == "kill-list":
        await session.send({"type": "session.characters.list"})
        expected = "session.characters.listed"
    else:  # kill-prompt: choosing another character asks for its system prompt
        voice = "Ada" if sandbox_voice(stage, sandbox) != "Ada" else "Tired"
        await session.send({"type": "session.update",
                            "session": {"type": "realtime", "voice": voice}})
        expected = "session.updated"
    if await _in_flight(sandbox):
        os.kill(pid, signal.SIGKILL)
    answered = await answer(session, mark, (expected, "error"))
    player.count("completed" if answered == expected else None)
    if kind == "kill-prompt":
        await select(session, "Tired")


def sandbox_voice(stage: Stage, sandbox: Any) -> str | None:
    app = stage.app
    assert app is not None
    for session in app[SESSIONS].values():
        if session.characters.sandbox is sandbox:
            return str(session.settings.voice)
    return None


async def _done(session: Watched, mark: int) -> str | None:
    try:
        index = await session.wait_for("response.done", mark, within=TURN_BOUND)
    except AssertionError:
        return None
    return str(session.events[index]["response"]["status"])
