"""The sessions of a phase: ``Player`` takes typed or spoken turns and counts them;
``answer`` and ``select`` wait for the server's answer to one request."""

from __future__ import annotations

import asyncio
import random

import aiohttp

from scripts.chaos.stage import TURN_BOUND
from tests.fault_checks import Watched, codes, speak, status


class Player:
    """One session and its turns; the injector may borrow it between turns."""

    def __init__(self, session: Watched, bound: float = TURN_BOUND) -> None:
        self.session = session
        self.bound = bound
        """Seconds a turn may take before it counts as lost."""
        self.lock = asyncio.Lock()
        self.turns_ok = 0
        self.turns_lost = 0
        self.expected_close = False

    async def text_turns(self, count: int, words: str = "Hello?") -> None:
        for _ in range(count):
            async with self.lock:
                await self.text_turn(words)
            await asyncio.sleep(random.uniform(0.0, 0.3))

    async def text_turn(self, words: str) -> str | None:
        try:
            events = await self.session.turn(words, within=self.bound)
        except AssertionError:
            self.turns_lost += 1
            return None
        self.count(status(events))
        return status(events)

    def count(self, outcome: str | None) -> None:
        if outcome == "completed":
            self.turns_ok += 1
        else:
            self.turns_lost += 1

    async def spoken_turns(self, count: int) -> None:
        """Each turn on a fresh stream: clearing the buffer closes the last one, and
        the fake's script starts again on the next."""
        for _ in range(count):
            session = self.session
            mark = len(session.events)
            stop = asyncio.Event()
            try:
                await session.send({"type": "input_audio_buffer.clear"})
                await session.wait_for("input_audio_buffer.cleared", mark)
                speaking = asyncio.create_task(speak(session, stop))
                try:
                    done = await session.wait_for("response.done", mark, within=self.bound)
                finally:
                    stop.set()
                    await speaking
                self.count(session.events[done]["response"]["status"])
            except (AssertionError, aiohttp.ClientError, ConnectionError):
                self.turns_lost += 1
            await asyncio.sleep(random.uniform(0.0, 0.3))

    @property
    def disturbed(self) -> bool:
        return bool(codes(self.session.events) or self.turns_lost or (
            self.session.ended.is_set() and not self.expected_close))


async def open_players(http: aiohttp.ClientSession, url: str, count: int,
                       bound: float = TURN_BOUND) -> list[Player]:
    players = []
    for _ in range(count):
        ws = await http.ws_connect(f"{url}/v1/realtime?model=chaos", protocols=("realtime",))
        session = Watched(ws)
        await session.wait_for("session.created")
        mark = len(session.events)
        await session.send({"type": "session.characters.list"})
        await session.wait_for("session.characters.listed", mark)
        players.append(Player(session, bound))
    return players


async def answer(session: Watched, mark: int, kinds: tuple[str, ...]) -> str | None:
    try:
        index = await session.wait(lambda e: e["type"] in kinds, mark, within=TURN_BOUND)
    except AssertionError:
        return None
    return str(session.events[index]["type"])


async def select(session: Watched, voice: str) -> None:
    mark = len(session.events)
    await session.send({"type": "session.update", "session": {"type": "realtime",
                                                              "voice": voice}})
    await answer(session, mark, ("session.updated", "error"))
