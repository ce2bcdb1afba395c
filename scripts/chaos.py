"""``make chaos``: many sessions, repeated faults of every kind, one table.

    python -m scripts.chaos [--sessions 6] [--turns 3] [--rounds 3] [--only llm-stall,…]

    fakes (tests/fake_*.py) ◀── FaultProxy ◀── server (in this process, on 127.0.0.1,
                                                 aiohttp's AppRunner as ``run_app``)
                                                    ▲
                                  sessions (aiohttp clients) ───┘

Each phase opens ``--sessions`` sessions that take ``--turns`` turns each (typed, or
spoken for the speech-to-text phases) while an injector hurts ``--rounds`` backend
connections, sandbox children or model workers; then the sessions close and the server
settles. The last phase stops a ``python -m server`` process with SIGTERM while its
sessions talk. The table gives, per phase: faults injected, sessions disturbed (an
error, a turn not completed, or an unexpected close), turns completed and lost,
errors by code, and what was left once it settled: processes (strays below the zygote,
pool children nobody holds, zombies), this process's fds above the phase's start,
per-session metric series. The server's log goes to a file (its path is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sandbox import ChildLimits, SandboxConfig
from server.app import LLM_BACKEND, POOL, SESSIONS, SPEECH, create_app
from server.backends.embedded import llm as embedded_llm
from server.config import Config
from tests.fakes.fault_proxy import Cut, Fault, FaultProxy, Latency, Refuse, Reset, Stall
from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, Reply, call, text, tool_calls
from tests.fault_checks import (
    Watched,
    codes,
    cpu_ticks,
    descendants,
    eventually,
    leftovers,
    open_fds,
    pid_alive,
    settled,
    speak,
    status,
)

REPO = Path(__file__).resolve().parent.parent
BACKEND_TIMEOUT = 1.5
WORDS = [f"word{n} " for n in range(12)]
TURN_BOUND = 30.0
"""Seconds a turn may take before it counts as lost (a stall costs 1.5 s)."""
EMBEDDED_TURN_BOUND = 120.0
"""The same with the embedded model: sessions queue on one worker, and a new worker
reads each session's prompt afresh (seconds each on a busy 2-core machine)."""
MIDWAY = {"llm": 1000, "tts": 30_000}
FAULTS: dict[str, Callable[[int], Fault]] = {
    "latency": lambda midway: Latency(0.1),
    "stall": lambda midway: Stall(midway),
    "cut": lambda midway: Cut(midway),
    "reset": lambda midway: Reset(midway),
    "refused": lambda midway: Refuse(),
}
SANDBOX_FAULTS = ["kill-load", "kill-list", "kill-prompt", "kill-tool", "stop"]



Injector = Callable[[list["Player"], asyncio.Event], Coroutine[Any, Any, int]]
"""Hurts the sessions' backends or children while they play; returns how often."""


# ── the fakes and the server ─────────────────────────────────────────────────


class Answers(collections.deque[Reply]):
    """The fake model's script: a tool call when the person asks for a nap (and the
    character has tools), else the same words. It reads the request the fake has
    just recorded."""

    def __init__(self, fake: FakeOpenAI) -> None:
        super().__init__()
        self.fake = fake

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Reply:
        request = self.fake.requests[-1] if self.fake.requests else {}
        last = (request.get("messages") or [{}])[-1]
        if request.get("tools") and last.get("role") == "user" and "nap" in str(
                last.get("content")):
            return tool_calls(call("nap", "{}"))
        return text(*WORDS)


def napper(name: str, prompt: str = "") -> str:
    return textwrap.dedent(f"""
        import time
        CHARACTER_NAME = {name!r}
        VOICE_SOURCE = {{"source_type": "file", "path_on_server": "voices/{name}.wav"}}
        INSTRUCTIONS = {{"text": "You are {name}."}}
        METADATA = {{"good": True, "comment": None}}
        TOOLS = [{{"type": "function", "function": {{
            "name": "nap", "description": "Nap.",
            "parameters": {{"type": "object", "properties": {{}}}}}}}}]

        class PromptGenerator:
            def __init__(self, instructions):
                self.instructions = instructions

            def make_system_prompt(self):
                return self.instructions["text"]

            def handle_tool_call(self, name, arguments):
                time.sleep(3600)
                return "rested"
        """)


@dataclass
class Stage:
    """Fakes behind proxies, and the server using them, in this process."""

    root: Path
    llm: FakeOpenAI = field(default_factory=lambda: FakeOpenAI(close_connections=True))
    tts: FakeKyutaiTTS = field(default_factory=lambda: FakeKyutaiTTS(frames_per_word=1))
    stt: FakeKyutaiSTT = field(default_factory=FakeKyutaiSTT)
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    app: web.Application | None = None
    url: str = ""
    turn_bound: float = TURN_BOUND

    async def start_fakes(self) -> None:
        self.llm.replies = Answers(self.llm)
        self.stt.script(("Hello", 0.2), ("there", 0.5), end=0.9)
        await self.llm.start(), await self.tts.start(), await self.stt.start()
        for name, url in (("llm", self.llm.base_url), ("tts", self.tts.url),
                          ("stt", self.stt.url)):
            self.proxies[name], self.urls[name] = await FaultProxy.before(url)

    async def start_server(self, **backends: str | None) -> None:
        cast = self.root / "cast"
        cast.mkdir(exist_ok=True)
        (cast / "tired.py").write_text(napper("Tired"))
        (cast / "ada.py").write_text(napper("Ada"))
        slow = self.root / "slow"
        slow.mkdir(exist_ok=True)
        (slow / "ada.py").write_text(napper("Ada"))
        (slow / "slow.py").write_text("while True:\n    pass\n")
        config = Config(
            port=0, characters_dir=REPO / "characters", allowed_roots=(self.root.resolve(),),
            max_reloads_per_minute=10_000, nudge_after=0.0, log_level="WARNING",
            llm=backends.get("llm"), tts=backends.get("tts"), stt=backends.get("stt"),
            sandbox=SandboxConfig(limits=ChildLimits(memory_mb=384), load_timeout=30.0,
                                  file_timeout=10.0, call_timeout=3.0, pool_size=2,
                                  warm_directories=0),
        )
        self.app = create_app(config)
        # As web.run_app: handlers are not cancelled when their connection drops.
        self.runner = web.AppRunner(self.app, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        llm = self.app[LLM_BACKEND].llm
        if hasattr(llm, "timeout"):
            llm.timeout = BACKEND_TIMEOUT
        speech = self.app[SPEECH]
        for backend in (speech.stt, speech.tts):
            if backend is not None and hasattr(backend, "timeout"):
                backend.timeout = BACKEND_TIMEOUT
        for backend in (speech.stt, speech.tts):
            if backend is not None and hasattr(backend, "heartbeat"):
                backend.heartbeat = 2 * BACKEND_TIMEOUT

    async def stop_server(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def close(self) -> None:
        await self.stop_server()
        for proxy in self.proxies.values():
            await proxy.close()
        for fake in (self.llm, self.tts, self.stt):
            await fake.close()


# ── one phase ────────────────────────────────────────────────────────────────


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


# ── the injectors ────────────────────────────────────────────────────────────


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
        answered = await _answer(session, mark, ("session.characters.reloaded", "error"))
        player.count("completed" if answered == "session.characters.reloaded" else None)
        mark = len(session.events)
        await session.send({"type": "session.characters.reload",
                            "directory": str(stage.root / "cast")})
        await _answer(session, mark, ("session.characters.reloaded", "error"))
        await _select(session, "Tired")
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
    answered = await _answer(session, mark, (expected, "error"))
    player.count("completed" if answered == expected else None)
    if kind == "kill-prompt":
        await _select(session, "Tired")


def sandbox_voice(stage: Stage, sandbox: Any) -> str | None:
    app = stage.app
    assert app is not None
    for session in app[SESSIONS].values():
        if session.characters.sandbox is sandbox:
            return str(session.settings.voice)
    return None


async def _answer(session: Watched, mark: int, kinds: tuple[str, ...]) -> str | None:
    try:
        index = await session.wait(lambda e: e["type"] in kinds, mark, within=TURN_BOUND)
    except AssertionError:
        return None
    return str(session.events[index]["type"])


async def _done(session: Watched, mark: int) -> str | None:
    try:
        index = await session.wait_for("response.done", mark, within=TURN_BOUND)
    except AssertionError:
        return None
    return str(session.events[index]["response"]["status"])


async def _select(session: Watched, voice: str) -> None:
    mark = len(session.events)
    await session.send({"type": "session.update", "session": {"type": "realtime",
                                                              "voice": voice}})
    await _answer(session, mark, ("session.updated", "error"))


# ── the phases ───────────────────────────────────────────────────────────────


async def backend_phases(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    for backend in ("llm", "tts", "stt"):
        for kind, make in FAULTS.items():
            name = f"{backend}-{kind}"
            if not wanted(args, name):
                continue
            fault = make(MIDWAY.get(backend, 0))

            async def play(players: list[Player], spoken: bool = backend == "stt") -> None:
                await asyncio.gather(*(player.spoken_turns(args.turns) if spoken
                                       else player.text_turns(args.turns)
                                       for player in players))

            rows.append(await run_phase(stage, name, args, play,
                                        backend_injector(stage, backend, fault, args.rounds)))
            print(format_row(rows[-1]), flush=True)


async def sandbox_phases(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    for kind in SANDBOX_FAULTS:
        name = f"sandbox-{kind}"
        if not wanted(args, name):
            continue

        async def setup(players: list[Player]) -> None:
            for player in players:
                mark = len(player.session.events)
                await player.session.send({"type": "session.characters.reload",
                                           "directory": str(stage.root / "cast")})
                await _answer(player.session, mark, ("session.characters.reloaded", "error"))
                await _select(player.session, "Tired")

        async def play(players: list[Player]) -> None:
            await asyncio.gather(*(player.text_turns(args.turns) for player in players))

        rows.append(await run_phase(stage, name, args, play,
                                    sandbox_injector(stage, kind, args.rounds), setup))
        print(format_row(rows[-1]), flush=True)


async def embedded_phase(root: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    """The embedded model's worker killed mid-reply, the STT workers mid-stream."""
    stage = Stage(root, turn_bound=EMBEDDED_TURN_BOUND)
    await stage.start_server(llm="embedded", stt="embedded", tts=None)
    app = stage.app
    assert app is not None
    llm, stt = app[LLM_BACKEND].llm, app[SPEECH].stt
    try:
        async with aiohttp.ClientSession() as http:  # the model's prompt cache warms
            (warm,) = await open_players(http, stage.url, 1, EMBEDDED_TURN_BOUND)
            await warm.text_turn("Hello.")
            await warm.session.close()

        async def play(players: list[Player]) -> None:
            stop = asyncio.Event()
            listening = asyncio.create_task(speak(players[0].session, stop, pace=0.08))
            try:
                await asyncio.gather(*(player.text_turns(args.turns, "Tell me about the sea.")
                                       for player in players))
            finally:
                stop.set()
                await listening

        async def inject(players: list[Player], playing: asyncio.Event) -> int:
            """Round 1: the model's worker and the speech-to-text workers killed; round
            2: the model's worker stopped (it hangs until its stall timeout)."""
            faults = 0
            for signum in (signal.SIGKILL, signal.SIGSTOP):
                # Mid-reply: once some session is receiving text.
                seen = sum(len(p.session.events) for p in players)

                def writing(seen: int = seen) -> bool:
                    return any(e["type"] == "response.output_text.delta"
                               for p in players for e in p.session.events[-3:]) and \
                        sum(len(p.session.events) for p in players) > seen

                if not await eventually(writing, 60) or playing.is_set():
                    break
                model: int | None = getattr(llm, "pid", None)
                if model is not None:
                    if signum is signal.SIGSTOP:  # short only while it writes
                        llm.stall_timeout = 3.0  # type: ignore[attr-defined]
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(model, signum)
                    faults += 1
                if signum is signal.SIGKILL and stt is not None:
                    for worker in list(getattr(stt, "pids", [])):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker, signal.SIGKILL)
                    faults += 1
                def ended(gone: int | None = model) -> bool:
                    return gone is None or not pid_alive(gone)

                await eventually(ended, 30)
                llm.stall_timeout = embedded_llm.STALL_TIMEOUT  # type: ignore[attr-defined]
                await asyncio.sleep(1.0)
            return faults

        sessions = args.sessions
        args.sessions = min(3, sessions)
        try:
            if wanted(args, "embedded-worker-kill-hang"):
                rows.append(await run_phase(stage, "embedded-worker-kill-hang", args, play,
                                            inject))
                print(format_row(rows[-1]), flush=True)
        finally:
            args.sessions = sessions
    finally:
        await stage.close()


async def sigterm_phase(stage: Stage, args: argparse.Namespace, rows: list[Row]) -> None:
    """``python -m server`` with the fakes, its sessions talking, idle or reloaded,
    stopped with SIGTERM: each session should get 1001 with a reason, and every
    process it started should go with it."""
    if not wanted(args, "server-sigterm"):
        return
    row = Row("server-sigterm")
    port = _free_port()
    env = {**os.environ, "TROUPE_LLM": stage.llm.base_url, "TROUPE_TTS": stage.tts.url,
           "TROUPE_STT": "none", "TROUPE_NUDGE_AFTER": "0",
           "TROUPE_DRAIN_TIMEOUT": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--port", str(port), "--allowed-root",
        str(stage.root), "--log-level", "ERROR", cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            pid = await _health_pid(http, url)
            players = await open_players(http, url, args.sessions)
            for index, player in enumerate(players):
                player.expected_close = True
                if index % 3 == 0:  # talking when the signal comes
                    await player.session.send({"type": "conversation.item.create", "item": {
                        "type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": "A story?"}]}})
                    await player.session.send({"type": "response.create"})
                elif index % 3 == 1:
                    mark = len(player.session.events)
                    await player.session.send({"type": "session.characters.reload",
                                               "directory": str(stage.root / "cast")})
                    await _answer(player.session, mark, ("session.characters.reloaded",))
            for player in players[::3]:
                await player.session.wait(lambda e: e["type"] == "response.output_audio.delta"
                                          or e["type"] == "response.done")
            started = descendants(pid)
            row.injected = 1
            os.kill(pid, signal.SIGTERM)
            for player in players:
                await eventually(player.session.ended.is_set, 30)
            await asyncio.wait_for(process.wait(), 60)
            await eventually(lambda: not any(pid_alive(p) for p in started), 30)
            row.sessions = len(players)
            row.disturbed = sum(
                1 for p in players if p.session.close_code != aiohttp.WSCloseCode.GOING_AWAY
                or not p.session.close_reason or codes(p.session.events))
            for player in players[::3]:
                cut = status(player.session.events) != "completed"
                row.turns_lost += cut
                row.turns_ok += not cut
            for player in players:
                row.errors.update(codes(player.session.events))
            row.procs = sum(pid_alive(p) for p in started)
            row.fds = row.series = "-"
            reasons = {p.session.close_reason for p in players}
            row.notes.append(f"closed {collections.Counter(p.session.close_code for p in players)}"
                             f" reasons {reasons}; exit {process.returncode}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    rows.append(row)
    print(format_row(row), flush=True)


async def _health_pid(http: aiohttp.ClientSession, url: str) -> int:
    for _ in range(600):
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{url}/v1/health") as response:
                if response.status == 200:
                    return int((await response.json())["pid"])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"python -m server did not come up on {url}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ── the table ────────────────────────────────────────────────────────────────

HEADER = (f"{'fault':<26} {'injected':>8} {'sessions':>8} {'disturbed':>9} "
          f"{'turns ok/lost':>13}  {'errors by code':<44} {'procs':>5} {'fds':>4} "
          f"{'series':>6}")


def format_row(row: Row) -> str:
    errors = ", ".join(f"{code} {n}" for code, n in sorted(row.errors.items())) or "-"
    line = (f"{row.name:<26} {row.injected:>8} {row.sessions:>8} {row.disturbed:>9} "
            f"{f'{row.turns_ok}/{row.turns_lost}':>13}  {errors:<44} {row.procs!s:>5} "
            f"{row.fds!s:>4} {row.series!s:>6}")
    return line + (f"  ({'; '.join(row.notes)})" if row.notes else "")


def wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.only or any(part in name for part in args.only.split(","))


async def main_async(args: argparse.Namespace) -> int:
    random.seed(args.seed)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="troupe-chaos-") as tmp:
        root = Path(tmp)
        stage = Stage(root)
        await stage.start_fakes()
        try:
            print(HEADER, flush=True)
            await stage.start_server(**stage.urls)
            await backend_phases(stage, args, rows)
            await sandbox_phases(stage, args, rows)
            await stage.stop_server()
            if not args.no_embedded:
                await embedded_phase(root, args, rows)
            await sigterm_phase(stage, args, rows)
        finally:
            await stage.close()
    left = [row.name for row in rows if any(
        isinstance(value, int) and value for value in (row.procs, row.fds, row.series))]
    print(f"\n{len(rows)} phases in {time.monotonic() - started:.0f} s; leftovers in: "
          f"{', '.join(left) or 'none'}")
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="faults injected per phase")
    parser.add_argument("--only", default="", help="phases whose name contains one of "
                        "these comma-separated words (e.g. llm,sandbox-kill)")
    parser.add_argument("--no-embedded", action="store_true",
                        help="skip the embedded models' phase (it loads real models)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "chaos.log",
                        help="the server's log (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, filemode="w", level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"server log: {args.log}", flush=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
