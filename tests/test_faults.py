"""Fault injection: backends that lag, stall, cut, refuse or reset; sandbox children
killed or stopped mid-request; model workers killed mid-reply; the server stopped with
sessions open.

    session A ─┐                 ┌─ FaultProxy ─▶ fake Kyutai STT
    session B ─┴─▶ server ───────┼─ FaultProxy ─▶ fake OpenAI (one connection a request)
                   (in-process)  └─ FaultProxy ─▶ fake Kyutai TTS

For every fault: A gets one clear ``error`` (with a failed ``response.done`` when a
reply was hit), or none where the fault is absorbed (latency, a retried connect); A's
next turn works; B, the bystander, finishes its turn; and once both sessions closed
nothing is left: no process below the zygote that the pool does not know, no zombie,
no fd above the settled baseline, no ``session_id`` metric series, no open proxied
connection. Waits are bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestClient
from conftest import SCALE, MakeServer, character_source, write_directory
from fault_checks import (
    FRAME,
    Watched,
    codes,
    cpu_ticks,
    descendants,
    eventually,
    kinds,
    leftovers,
    open_fds,
    pid_alive,
    settled,
    speak,
    status,
)

from server.app import LLM_BACKEND, POOL, SESSIONS, SPEECH, VOICES
from server.backends.embedded import llm as embedded_llm
from server.backends.embedded import stt as embedded_stt
from server.config import Config
from tests.fakes.fault_proxy import Cut, Fault, FaultProxy, Latency, Refuse, Reset, Stall
from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, Reply, call, stall, text, tool_calls

BACKEND_TIMEOUT = 1.5 * SCALE
"""How long the server waits on a silent backend here (seconds in production)."""
WORDS = [f"word{n} " for n in range(12)]
"""Every reply of the fake model: long enough to be hurt in its middle."""
LLM_MIDWAY = 1000
"""Bytes of the model's answer (headers and a few chunks) before a fault."""
TTS_MIDWAY = 30_000
"""Bytes of the TTS's answer (three words of audio) before a fault."""


class Always(collections.deque[Reply]):
    """A fake model's script that never runs out."""

    def __init__(self, reply: Reply) -> None:
        super().__init__()
        self.reply = reply

    def __bool__(self) -> bool:
        return True

    def popleft(self) -> Reply:
        return self.reply


@dataclass
class Rig:
    """A server whose three backends are fakes behind fault proxies."""

    server: TestClient[Any, Any]
    proxies: dict[str, FaultProxy]
    fakes: list[Any]
    baseline: dict[int, str] = field(default_factory=dict)
    sessions: list[Watched] = field(default_factory=list)

    async def connect(self, path: str = "/v1/realtime?model=test") -> Watched:
        ws = await self.server.ws_connect(path, protocols=("realtime",))
        session = Watched(ws)
        self.sessions.append(session)
        await session.wait_for("session.created")
        mark = len(session.events)  # its first set is loaded before it answers this
        await session.send({"type": "session.characters.list"})
        await session.wait_for("session.characters.listed", mark)
        return session

    async def settle(self) -> dict[int, str]:
        """Wait until the server is at rest; its fds then (the baseline)."""
        if not await eventually(lambda: settled(self.server.app, self.proxies.values())):
            app = self.server.app
            raise AssertionError(
                f"not settled: sessions {list(app[SESSIONS])}, open links "
                f"{[(n, len(p.open_links)) for n, p in self.proxies.items()]}, pool idle "
                f"{app[POOL].idle}, children {app[POOL].live_pids}, voices "
                f"{app[VOICES].sandbox.pid}, idle {[c.pid for c in app[POOL]._idle]}")
        await self.metrics()  # the test client's pooled connection exists from here on
        return open_fds()

    async def metrics(self) -> str:
        async with self.server.get("/metrics") as response:
            return await response.text()

    async def assert_nothing_left(self, stop_listening: bool = True,
                                  within: float = 10.0) -> None:
        """Close the sessions, then check. ``stop_listening``: each first clears its
        input audio, which closes its speech-to-text stream; a session closed while
        it listens leaves the stream open under aiohttp's test server (see
        ``test_a_session_whose_handler_is_cancelled_closes_its_stream``)."""
        for session in self.sessions:
            if stop_listening and not session.ended.is_set():
                mark = len(session.events)
                await session.send({"type": "input_audio_buffer.clear"})
                await session.wait_for("input_audio_buffer.cleared", mark)
            await session.close()
        exposition = ""
        for _ in range(int(100 * SCALE)):  # series go when the server ends the session
            exposition = await self.metrics()
            if not self.server.app[SESSIONS] and "session_id=" not in exposition:
                break
            await asyncio.sleep(0.05)
        left = await leftovers(self.server.app, self.baseline, exposition,
                               self.proxies.values(), within)
        assert left.clean, left


def tune(server: TestClient[Any, Any]) -> None:
    """Backends give up on silence after ``BACKEND_TIMEOUT`` (read at each use)."""
    app = server.app
    app[LLM_BACKEND].llm.timeout = BACKEND_TIMEOUT
    speech = app[SPEECH]
    for backend in (speech.stt, speech.tts):
        if backend is not None:
            backend.timeout = BACKEND_TIMEOUT
    for backend in (speech.stt, speech.tts):  # a pong must come within half of it
        if backend is not None:
            backend.heartbeat = 2 * BACKEND_TIMEOUT


def steady(config: Config, **changes: Any) -> Any:
    """The test sandbox settings without warm directories: the children a server
    keeps at rest are then its idle pool and the server-wide set's, whatever a test
    loaded how often (``changes``: other settings)."""
    return msgspec.structs.replace(config.sandbox, warm_directories=0, **changes)


@pytest.fixture
async def rig(make_server: MakeServer, config: Config) -> AsyncIterator[Rig]:
    llm = FakeOpenAI(replies=Always(text(*WORDS)), close_connections=True)
    tts = FakeKyutaiTTS(frames_per_word=1)
    stt = FakeKyutaiSTT()
    stt.script(("Hello", 0.2), ("there", 0.5), end=0.9)
    await llm.start(), await tts.start(), await stt.start()
    proxies = {}
    proxies["llm"], llm_url = await FaultProxy.before(llm.base_url)
    proxies["tts"], tts_url = await FaultProxy.before(tts.url)
    proxies["stt"], stt_url = await FaultProxy.before(stt.url)
    server = await make_server(llm=llm_url, tts=tts_url, stt=stt_url, nudge_after=0.0,
                               sandbox=steady(config))
    tune(server)
    rig = Rig(server, proxies, [llm, tts, stt])
    warm = await rig.connect()
    assert status(await warm.turn("Warm up.")) == "completed"  # every client made
    await warm.close()
    rig.sessions.clear()
    rig.baseline = await rig.settle()
    try:
        yield rig
    finally:
        for session in rig.sessions:
            await session.close()
        for proxy in proxies.values():
            await proxy.close()
        for fake in (llm, tts, stt):
            await fake.close()


# ── the model and the TTS, hurt during a reply ───────────────────────────────


def attempts(rig: Rig, backend: str) -> int:
    """Connections a client tries before it gives up: the openai SDK retries
    ``max_retries`` times; aiohttp retries an idempotent request (a WebSocket
    handshake is a GET) once when the connection is reset or closed."""
    if backend == "llm":
        return 1 + int(rig.server.app[LLM_BACKEND].llm._client.max_retries)
    return 2


@pytest.mark.parametrize(("backend", "fault", "connections", "expected"), [
    pytest.param("llm", Latency(0.05), 1, None, id="llm-latency"),
    pytest.param("llm", Stall(LLM_MIDWAY), 1, "backend_unavailable", id="llm-stall"),
    pytest.param("llm", Cut(LLM_MIDWAY), 1, "backend_unavailable", id="llm-cut"),
    pytest.param("llm", Reset(LLM_MIDWAY), 1, "backend_unavailable", id="llm-reset"),
    pytest.param("llm", Stall(), 1, None, id="llm-silent-before-answering-is-retried"),
    pytest.param("llm", Refuse(), 1, None, id="llm-refused-once-is-retried"),
    pytest.param("llm", Refuse(), -1, "backend_unavailable", id="llm-refused"),
    pytest.param("tts", Latency(0.05), 1, None, id="tts-latency"),
    pytest.param("tts", Stall(TTS_MIDWAY), 1, "backend_unavailable", id="tts-stall"),
    pytest.param("tts", Stall(), 1, "backend_unavailable", id="tts-silent-at-connect"),
    pytest.param("tts", Cut(TTS_MIDWAY), 1, "backend_unavailable", id="tts-cut"),
    pytest.param("tts", Reset(TTS_MIDWAY), 1, "backend_unavailable", id="tts-reset"),
    pytest.param("tts", Refuse(), 1, None, id="tts-refused-once-is-retried"),
    pytest.param("tts", Refuse(), -1, "backend_unavailable", id="tts-refused"),
])
async def test_a_backend_fault_during_a_reply(
    rig: Rig, backend: str, fault: Fault, connections: int, expected: str | None
) -> None:
    a, b = await rig.connect(), await rig.connect()
    proxy = rig.proxies[backend]
    hurt = attempts(rig, backend) if connections == -1 else connections
    proxy.arm(fault, hurt)
    before = len(proxy.links)

    a_turn = asyncio.create_task(a.turn("Tell me something."))
    if hurt == 1:  # B's connection comes after A's, so the fault is A's alone
        await proxy.wait_for_links(before + 1, within=10 * SCALE)
        bystander = await b.turn("Meanwhile, hello.")
        hit = await a_turn
    else:  # A's retries take the armed faults one by one: B goes after them
        hit = await a_turn
        bystander = await b.turn("Meanwhile, hello.")
    after = await a.turn("Again, please.")

    assert proxy.armed == 0 and [link.fault for link in proxy.links[before:before + hurt]] \
        == [fault] * hurt
    if expected is None:
        assert codes(hit) == [] and status(hit) == "completed", kinds(hit)
    else:
        assert codes(hit) == [expected], kinds(hit)
        assert status(hit) == "failed"
        assert kinds(hit)[-2:] == [f"error({expected})", "response.done"]
        message = next(e for e in hit if e["type"] == "error")["error"]["message"]
        assert "127.0.0.1" in message  # it names the backend it could not use
    assert codes(bystander) == [] and status(bystander) == "completed", kinds(bystander)
    assert codes(after) == [] and status(after) == "completed", kinds(after)
    assert a.errors() == [e for e in hit if e["type"] == "error"]  # one, and only then
    await rig.assert_nothing_left()


async def test_an_idle_pooled_model_connection_reset_is_retried(
    make_server: MakeServer, config: Config
) -> None:
    """The model's server kept the connection alive; a reset while it sat in the
    client's pool (a restart, a NAT timeout) costs the next reply nothing."""
    llm = FakeOpenAI(replies=Always(text(*WORDS)))  # keep-alive, as real servers do
    await llm.start()
    proxy, url = await FaultProxy.before(llm.base_url)
    try:
        server = await make_server(llm=url, sandbox=steady(config))
        tune(server)
        rig = Rig(server, {"llm": proxy}, [llm])
        session = await rig.connect()
        assert status(await session.turn("First.")) == "completed"
        rig.baseline = open_fds()
        pooled = proxy.hurt_all(Reset())

        again = await session.turn("Second.")

        assert pooled and all(link.how == "reset" for link in pooled)
        assert len(proxy.open_links) == 1  # its successor, in the pool
        assert codes(again) == [] and status(again) == "completed", kinds(again)
        await session.close()
        # The new pooled connection replaces the one reset: the same count of fds.
        assert await eventually(lambda: len(open_fds()) <= len(rig.baseline))
    finally:
        await proxy.close()
        await llm.close()


async def test_the_tts_fails_while_the_model_still_writes(rig: Rig) -> None:
    """The model's words come slowly; the TTS connection is reset after its first
    words: the reply ends at once with the TTS's error, and the model's stream is
    closed with it."""
    a, b = await rig.connect(), await rig.connect()
    rig.fakes[0].pause = 0.1  # over a second to write the reply
    rig.proxies["tts"].arm(Reset(10_000))

    hit = await a.turn("Tell me something.")
    bystander = await b.turn("Hello.")
    after = await a.turn("Again?")

    assert codes(hit) == ["backend_unavailable"] and status(hit) == "failed", kinds(hit)
    assert "TTS" in a.errors()[0]["error"]["message"]
    said = [e for e in hit if e["type"] == "response.output_audio_transcript.delta"]
    assert 0 < len(said) < len(WORDS)  # cut while the model wrote
    assert status(bystander) == "completed" and status(after) == "completed"
    await rig.assert_nothing_left()


async def test_push_to_talk_commit_while_the_stt_stalls(rig: Rig) -> None:
    """Push-to-talk: the STT goes silent after hearing A, before the commit. The
    commit's flush is bounded: A is told once, and its next utterance goes to a new
    stream."""
    a = await rig.connect()
    mark = len(a.events)
    await a.send({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    await a.wait_for("session.updated", mark)
    proxy, fake = rig.proxies["stt"], rig.fakes[2]

    async def utterance() -> int:
        """1.6 s of audio (the fake's words end at 0.9 s), all of it at the STT."""
        start, streams = len(a.events), len(fake.connections)
        for _ in range(20):
            await a.send({"type": "input_audio_buffer.append", "audio": FRAME})
        assert await eventually(lambda: len(fake.connections) > streams and sum(
            fake.connections[-1].audio_messages) >= 20 * 1920)
        return start

    start = await utterance()
    proxy.hurt(proxy.links[-1], Stall())
    await a.send({"type": "input_audio_buffer.commit"})
    told = await a.wait_for("error", start, within=30)
    start = await utterance()
    await a.send({"type": "input_audio_buffer.commit"})
    heard = await a.wait_for("conversation.item.input_audio_transcription.completed", start)

    assert "flush" in a.events[told]["error"]["message"]
    assert a.events[heard]["transcript"] == "Hello there"
    assert codes(a.events) == ["backend_unavailable"]
    await rig.assert_nothing_left()


# ── the speech-to-text, hurt while the character answers ─────────────────────


@pytest.mark.parametrize(("fault", "expected"), [
    pytest.param(Latency(0.05), None, id="stt-latency"),
    pytest.param(Stall(), "backend_unavailable", id="stt-stall"),
    pytest.param(Cut(), "backend_unavailable", id="stt-cut"),
    pytest.param(Reset(), "backend_unavailable", id="stt-reset"),
    pytest.param(Refuse(), "backend_unavailable", id="stt-refused"),
])
async def test_a_speech_to_text_fault(rig: Rig, fault: Fault, expected: str | None) -> None:
    """A speaks; once its turn is answered the STT connection is hurt (a refusal hits
    its first connect). A is told once, its audio is dropped for a moment, then a new
    stream hears its next turn. B speaks meanwhile on its own connection."""
    a, b = await rig.connect(), await rig.connect()
    proxy = rig.proxies["stt"]
    before = len(proxy.links)
    if isinstance(fault, Refuse):
        proxy.arm(fault, attempts(rig, "stt"))
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    speaking = [asyncio.create_task(speak(a, stop_a))]
    try:
        await proxy.wait_for_links(before + 1, within=10 * SCALE)
        if not isinstance(fault, Refuse):
            first = await a.wait_for("response.created", within=20)
            proxy.hurt(proxy.links[before], fault)
            mark = first
        else:
            mark = 0
        speaking.append(asyncio.create_task(speak(b, stop_b)))
        heard_b = await b.wait(lambda e: e["type"] == "response.done"
                               and e["response"]["status"] == "completed", within=30)
        stop_b.set()
        if expected is not None:  # the next stream replays the script: a new turn
            told = await a.wait_for("error", mark, within=30)
            await a.wait(lambda e: e["type"] == "response.done"
                         and e["response"]["status"] == "completed", told, within=30)
        else:
            await a.wait(lambda e: e["type"] == "response.done", mark, within=30)
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(*speaking)
    after = await a.turn("And in writing?")

    assert codes(a.events) == ([expected] if expected else []), kinds(a.events)
    if expected:
        assert "speech-to-text" in a.errors()[0]["error"]["message"]
    transcripts = [e["transcript"] for e in a.events
                   if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcripts[-1] == "Hello there", transcripts  # the new stream heard it
    assert codes(b.events) == [] and status(b.events[:heard_b + 1]) == "completed"
    assert status(after) == "completed" and codes(after) == []
    assert status([e for e in a.events if e["type"] == "response.done"][:1]) == "completed"
    await rig.assert_nothing_left()


async def test_a_session_whose_handler_is_cancelled_closes_its_stream(rig: Rig) -> None:
    a = await rig.connect()
    stop = asyncio.Event()
    speaking = asyncio.create_task(speak(a, stop))
    await a.wait_for("response.done", within=20)
    stop.set()
    await speaking

    await a.close()  # the client goes; the server's handler is cancelled as it ends

    await rig.assert_nothing_left(stop_listening=False, within=3.0)


# ── sandbox children killed or stopped mid-request ───────────────────────────


def napper(name: str) -> str:
    """A character whose one tool, ``nap``, sleeps for an hour."""
    return character_source(name, body="import time\n") + textwrap.dedent("""
        TOOLS = [{"type": "function", "function": {
            "name": "nap", "description": "Nap.",
            "parameters": {"type": "object", "properties": {}}}}]

        PromptGenerator.handle_tool_call = (
            lambda self, name, arguments: time.sleep(3600) or "rested")
        """)


@dataclass
class SandboxRig:
    rig: Rig
    llm: FakeOpenAI
    directory: Path

    @property
    def app(self) -> Any:
        return self.rig.server.app

    def sandbox_of(self, session_index: int) -> Any:
        return list(self.app[SESSIONS].values())[session_index].characters.sandbox


@pytest.fixture
async def sandbox_rig(make_server: MakeServer, config: Config,
                      allowed_root: Path) -> AsyncIterator[SandboxRig]:
    llm = FakeOpenAI()
    await llm.start()
    sandbox = steady(config, call_timeout=10.0 * SCALE, file_timeout=10.0 * SCALE,
                     load_timeout=30.0 * SCALE)
    server = await make_server(llm=llm.base_url, sandbox=sandbox, nudge_after=0.0)
    tune(server)
    directory = write_directory(allowed_root, "cast", {
        "ada.py": character_source("Ada"),
        "tired.py": napper("Tired"),
    })
    rig = Rig(server, {}, [llm])
    rig.baseline = await rig.settle()
    try:
        yield SandboxRig(rig, llm, directory)
    finally:
        for session in rig.sessions:
            await session.close()
        await llm.close()


async def loaded(session: Watched, directory: Path) -> None:
    mark = len(session.events)
    await session.send({"type": "session.characters.reload", "directory": str(directory)})
    index = await session.wait(lambda e: e["type"] in (
        "session.characters.reloaded", "error"), mark)
    assert session.events[index]["type"] == "session.characters.reloaded", \
        session.events[index]


async def in_flight(sandbox: Any) -> None:
    """Until the sandbox's child has a request it has not answered. (The one private
    read of the suite: nothing public says a request is out.)"""
    assert await eventually(lambda: sandbox._child is not None and sandbox._child.busy)


async def select(session: Watched, name: str) -> int:
    mark = len(session.events)
    await session.send({"type": "session.update", "session": {"type": "realtime",
                                                              "voice": name}})
    return mark


@pytest.mark.parametrize("during", ["list", "system_prompt", "call_tool"])
async def test_a_sandbox_child_killed_mid_request(sandbox_rig: SandboxRig, during: str) -> None:
    s = sandbox_rig
    a, b = await s.rig.connect(), await s.rig.connect()
    await loaded(a, s.directory)
    sandbox = s.sandbox_of(0)
    victim = sandbox.pid
    if during == "call_tool":
        s.llm.script(tool_calls(call("nap", "{}")), text("I feel rested."),
                     text("Still here."), text("Hello, B."))
        await a.send({"type": "session.update", "session": {"type": "realtime",
                                                            "voice": "Tired"}})
        await a.wait_for("session.updated")
        mark = len(a.events)
        await a.send({"type": "response.create"})
        assert await eventually(lambda: len(s.llm.requests) >= 1)  # tools fetched
    else:
        s.llm.script(text("Still here."), text("Hello, B."))
        os.kill(victim, signal.SIGSTOP)  # it cannot answer before it dies
        mark = len(a.events)
        if during == "list":
            await a.send({"type": "session.characters.list"})
        else:
            await a.send({"type": "session.update", "session": {"type": "realtime",
                                                                "voice": "Ada"}})
    await in_flight(sandbox)
    os.kill(victim, signal.SIGKILL)

    told = await a.wait_for("error", mark)
    if during == "call_tool":  # the model reads why the tool failed and goes on
        done = await a.wait_for("response.done", mark)
        assert status(a.events[mark:done + 1]) == "completed"
        assert "call_tool" in s.llm.requests[-1]["messages"][-1]["content"]
    bystander = await b.turn("Hello from B.")
    if during == "system_prompt":
        await select(a, "Ada")
        await a.wait_for("session.updated", told)
    listed = len(a.events)
    await a.send({"type": "session.characters.list"})
    await a.wait_for("session.characters.listed", listed)
    after = await a.turn("Are you there?")

    assert codes(a.events[mark:]) == ["sandbox_crashed"], kinds(a.events[mark:])
    assert during in a.events[told]["error"]["message"]
    assert "SIGKILL" in a.events[told]["error"]["message"]
    assert not pid_alive(victim)
    assert sandbox.pid != victim  # restarted on the same directory
    assert status(bystander) == "completed" and codes(bystander) == []
    assert status(after) == "completed" and codes(after) == [], kinds(after)
    await s.rig.assert_nothing_left()


async def test_a_sandbox_child_killed_during_a_load(
    sandbox_rig: SandboxRig, allowed_root: Path
) -> None:
    """The child loading a directory is killed from outside while one file runs.
    By design the host cannot tell that from the file killing it: that file is
    reported as having crashed the sandbox, and the others load."""
    s = sandbox_rig
    a, b = await s.rig.connect(), await s.rig.connect()
    directory = write_directory(allowed_root, "slow", {
        "ada.py": character_source("Ada"),
        "slow.py": character_source("Slow", body="while True: pass\n"),
    })
    pool = s.app[POOL]
    seen: dict[int, int] = {}
    mark = len(a.events)
    await a.send({"type": "session.characters.reload", "directory": str(directory)})

    def loader() -> int | None:
        """The child burning CPU (it runs slow.py): 0.2 s more than when first seen."""
        for pid in pool.live_pids:
            seen.setdefault(pid, cpu_ticks(pid))
        busy = [pid for pid, first in seen.items() if cpu_ticks(pid) - first > 20]
        return busy[0] if busy else None

    assert await eventually(lambda: loader() is not None), a.events[mark:]
    victim = loader()
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    reloaded = await a.wait_for("session.characters.reloaded", mark)
    s.llm.script(text("Hello, B."), text("Loaded."))
    bystander = await b.turn("Hello from B.")
    after = await a.turn("Who is there?")

    event = a.events[reloaded]
    assert codes(a.events[mark:]) == []
    assert [c["name"] for c in event["characters"]] == ["Ada"]
    assert [(e["file"], e["error_type"]) for e in event["errors"]] == [("slow.py", "Crashed")]
    assert "SIGKILL" in event["errors"][0]["message"]
    assert not pid_alive(victim)
    assert status(bystander) == "completed"
    assert status(after) == "completed" and codes(after) == [], kinds(after)
    await s.rig.assert_nothing_left()


async def test_a_sandbox_child_that_stops_answering(
    make_server: MakeServer, config: Config
) -> None:
    """SIGSTOP: the child is alive but silent. The call's deadline passes, the child
    is killed (a stopped process dies of SIGKILL too) and reaped, a fresh one takes
    its place; A is told once, and its next turn works."""
    llm = FakeOpenAI(replies=Always(text(*WORDS)))
    await llm.start()
    try:
        server = await make_server(llm=llm.base_url, nudge_after=0.0, sandbox=steady(config))
        tune(server)
        rig = Rig(server, {}, [llm])
        rig.baseline = await rig.settle()
        a, b = await rig.connect(), await rig.connect()
        await a.turn("Hello.")  # the default set is loaded
        session = list(server.app[SESSIONS].values())[0]
        victim = session.characters.sandbox.pid
        os.kill(victim, signal.SIGSTOP)

        hit, bystander = await asyncio.gather(a.turn("Hello?"), b.turn("Hi."))
        after = await a.turn("Still there?")

        assert codes(hit) == ["sandbox_timeout"], kinds(hit)
        assert status(hit) == "failed"
        assert "tools" in a.errors()[0]["error"]["message"]
        assert await eventually(lambda: not pid_alive(victim))
        assert status(bystander) == "completed" and codes(bystander) == []
        assert status(after) == "completed" and codes(after) == []
        assert codes(a.events) == ["sandbox_timeout"]
        await rig.assert_nothing_left()
    finally:
        await llm.close()


async def test_a_tool_call_that_never_returns(
    make_server: MakeServer, config: Config, allowed_root: Path
) -> None:
    """The tool hangs (the child is alive, busy for an hour): past the call deadline
    the child is replaced, A is told ``sandbox_timeout``, the model reads why the tool
    has no answer and finishes the reply."""
    llm = FakeOpenAI()
    llm.script(tool_calls(call("nap", "{}")), text("I could not nap."), text("Hello, B."),
               text("Here."))
    await llm.start()
    try:
        server = await make_server(llm=llm.base_url, nudge_after=0.0, sandbox=steady(config))
        rig = Rig(server, {}, [llm])
        rig.baseline = await rig.settle()
        a, b = await rig.connect(), await rig.connect()
        await loaded(a, write_directory(allowed_root, "nap", {"tired.py": napper("Tired")}))
        victim = list(server.app[SESSIONS].values())[0].characters.sandbox.pid

        hit = await a.turn("Take a nap.")
        bystander = await b.turn("Hello.")
        after = await a.turn("Awake?")

        assert codes(hit) == ["sandbox_timeout"] and status(hit) == "completed", kinds(hit)
        assert "nap" in a.errors()[0]["error"]["message"]
        assert "call_tool" in llm.requests[1]["messages"][-1]["content"]
        assert await eventually(lambda: not pid_alive(victim))
        assert status(bystander) == "completed" and codes(bystander) == []
        assert status(after) == "completed" and codes(after) == []
        await rig.assert_nothing_left()
    finally:
        await llm.close()


# ── the embedded models' worker processes killed mid-reply ───────────────────


@pytest.mark.timeout(300)
async def test_embedded_model_workers_killed_or_hung_mid_reply(
    make_server: MakeServer, config: Config
) -> None:
    """The language model's worker is killed, then stopped (it hangs), while it writes
    A's reply; the speech-to-text worker likewise while A streams audio. Each fault
    is one ``backend_unavailable`` for A (a hung worker is killed once it has said
    nothing for its stall timeout); the next reply or stream starts new workers, and
    B's replies are whole."""
    server = await make_server(llm="embedded", stt="embedded", tts=None, nudge_after=0.0,
                               sandbox=steady(config))
    app = server.app
    llm, stt = app[LLM_BACKEND].llm, app[SPEECH].stt
    assert llm.pids and stt is not None and stt.pids
    rig = Rig(server, {}, [])
    warm = await rig.connect()
    await warm.turn("Hello.", within=120)
    await warm.close()
    rig.sessions.clear()
    rig.baseline = await rig.settle()
    a, b = await rig.connect(), await rig.connect()
    mark = len(a.events)
    gone: list[int] = []

    async def reply_hit_by(signum: signal.Signals) -> list[dict[str, Any]]:
        start = len(a.events)
        await a.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Tell me a long story about the sea."}]}})
        await a.send({"type": "response.create"})
        await a.wait(lambda e: e["type"] == "response.output_text.delta", start, within=120)
        gone.append(llm.pids[0])  # the busiest worker: the one writing A's reply
        # Short only while it writes: reading a new prompt is seconds of silence.
        llm.stall_timeout = 3.0 * SCALE
        os.kill(gone[-1], signum)
        done = await a.wait_for("response.done", start, within=60)
        llm.stall_timeout = embedded_llm.STALL_TIMEOUT
        return a.events[start:done + 1]

    async def stream_hit_by(signum: signal.Signals) -> dict[str, Any]:
        stop = asyncio.Event()
        streaming = asyncio.create_task(speak(a, stop, pace=0.04))
        try:
            assert await eventually(lambda: bool(_stt_streams(stt)), within=30)
            serving = [w.process for w in stt._workers if w.streams]  # A's stream's
            for process in serving:
                process.stall_timeout = 3.0 * SCALE
            old = [process.pid for process in serving]
            gone.extend(old)
            start = len(a.events)
            for pid in old:
                os.kill(pid, signum)
            told = await a.wait_for("error", start, within=60)
            # After a pause the audio goes to a new stream on restarted workers.
            assert await eventually(lambda: bool(_stt_streams(stt)) and not set(
                stt.pids) & set(old), within=60)
        finally:
            stop.set()
            await streaming
            for worker in stt._workers:
                worker.process.stall_timeout = embedded_stt.STALL_TIMEOUT
        return a.events[told]

    killed = await reply_hit_by(signal.SIGKILL)
    bystander = await b.turn("Say hello.", within=120)
    hung = await reply_hit_by(signal.SIGSTOP)
    again = await b.turn("Hello again.", within=120)
    stt_killed = await stream_hit_by(signal.SIGKILL)
    stt_hung = await stream_hit_by(signal.SIGSTOP)
    after = await a.turn("Hello again.", within=120)

    for hit in (killed, hung):
        assert codes(hit) == ["backend_unavailable"] and status(hit) == "failed", kinds(hit)
    assert "ended" in killed[-2]["error"]["message"]
    assert "stopped answering" in hung[-2]["error"]["message"]
    assert "speech-to-text process" in stt_killed["error"]["message"]
    assert "stopped answering" in stt_hung["error"]["message"]
    assert codes(a.events[mark:]) == ["backend_unavailable"] * 4, kinds(a.events[mark:])
    assert await eventually(lambda: not any(pid_alive(pid) for pid in gone))
    assert status(bystander) == "completed" and codes(bystander) == []
    assert status(after) == "completed" and codes(after) == [], kinds(after)
    assert status(again) == "completed" and codes(b.events) == []
    await rig.assert_nothing_left()


def _stt_streams(stt: Any) -> list[int]:
    """Streams the embedded speech-to-text's workers serve now."""
    return [stream for worker in stt._workers for stream in worker.streams]


# ── the server stopped with sessions open ────────────────────────────────────


async def test_sigterm_closes_every_session_with_a_reason_and_leaves_nothing(
    server_process: Callable[..., Any], allowed_root: Path
) -> None:
    """One session mid-reply (the model stalls), one idle, one with its own
    directory: SIGTERM gives each a close frame saying why, and every process the
    server started (the zygote, the sandboxes) is gone with it."""
    llm = FakeOpenAI()
    llm.script(stall("Once ", "upon "))
    await llm.start()
    directory = write_directory(allowed_root, "own", {"ada.py": character_source("Ada")})
    try:
        url = await server_process(env={"TROUPE_LLM": llm.base_url})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/health") as response:
                pid = (await response.json())["pid"]
            sessions = []
            for _ in range(3):
                ws = await http.ws_connect(f"{url}/v1/realtime?model=x",
                                           protocols=("realtime",))
                sessions.append(Watched(ws))
                await sessions[-1].wait_for("session.created")
            talking, idle, own = sessions
            await talking.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "A story?"}]}})
            await talking.send({"type": "response.create"})
            await talking.wait_for("response.output_text.delta")
            await loaded(own, directory)
            await idle.send({"type": "session.characters.list"})
            await idle.wait_for("session.characters.listed")
            started = descendants(pid)
            assert len(started) >= 4  # the zygote, its pool, the sessions' sandboxes

            os.kill(pid, signal.SIGTERM)
            for session in sessions:
                assert await eventually(session.ended.is_set, within=30)

            assert [s.close_code for s in sessions] == [aiohttp.WSCloseCode.GOING_AWAY] * 3
            assert {s.close_reason for s in sessions} == {
                "server shutting down; reconnect with your resume_token"}
            assert await eventually(lambda: not pid_alive(pid), within=30)
            assert await eventually(lambda: not any(pid_alive(p) for p in started), within=30)
            assert codes(talking.events) == [] and codes(idle.events) == []
    finally:
        await llm.close()
