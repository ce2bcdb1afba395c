"""The stage a chaos run plays on: the fake backends (tests/fakes) each behind a
``FaultProxy``, the fake model's script, the characters the sessions load, and the
server (``create_app``) run in this process with short backend timeouts."""

from __future__ import annotations

import collections
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from sandbox import ChildLimits, SandboxConfig
from server.app import LLM_BACKEND, SPEECH, create_app
from server.config import Config
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import FakeOpenAI, Reply, call, text, tool_calls

REPO = Path(__file__).resolve().parents[2]
BACKEND_TIMEOUT = 1.5
WORDS = [f"word{n} " for n in range(12)]
TURN_BOUND = 30.0
"""Seconds a turn may take before it counts as lost (a stall costs 1.5 s)."""
EMBEDDED_TURN_BOUND = 120.0
"""The same with the embedded model: sessions queue on one worker, and a new worker
reads each session's prompt afresh (seconds each on a busy 2-core machine)."""


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
