"""The server a load test runs against: one it starts (``--spawn-server``) or one
that runs already (``--url``), and what its HTTP side and ``/proc`` say about it.

    --spawn-server:
      python -m scripts.loadtest.fakes ─▶ fake STT, TTS, LLM on 127.0.0.1 (stdin held)
      python -m server --host 127.0.0.1 --port P --stt/--tts/--llm <the fakes>
                       --allowed-root <the run's temp dir> …  (a ServerProcess of
                       scripts/measure.py: env TROUPE_ADMIN_TOKEN=<random>)
      stop(): SIGTERM the server (it closes its sessions and its sandboxes), wait;
              any process that was ever below it and still runs is an orphan,
              killed by pid; then the fakes (stdin closed, SIGTERM), by pid.
    --url: the server's pid comes from /v1/health; /proc is read only when it is a
           process on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from scripts import measure

START_TIMEOUT = 60.0


class ServerProblem(Exception):
    """The server could not be started or reached: the run cannot measure anything."""


def http_base(ws_url: str) -> str:
    """``ws://host:port/v1/realtime?…`` → ``http://host:port``."""
    url = URL(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return str(url.with_scheme(scheme).with_path("").with_query(None)).rstrip("/")


def is_loopback(ws_url: str) -> bool:
    host = URL(ws_url).host or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


@dataclass
class Target:
    """The server under test, as the run sees it."""

    ws_url: str
    admin_token: str | None = None
    pid: int | None = None
    """Set when the server is a process on this machine whose /proc we can read."""
    spawned: Spawned | None = None

    @property
    def base(self) -> str:
        return http_base(self.ws_url)

    async def health(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(f"{self.base}/v1/health",
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def metrics(self, http: aiohttp.ClientSession) -> str:
        async with http.get(f"{self.base}/metrics",
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
            return await response.text()

    async def admin_sessions(self, http: aiohttp.ClientSession) -> list[dict[str, Any]] | None:
        """``GET /v1/sessions`` (each live session, its sandbox pid and PSS), or None
        without an admin token or when refused. The server reads every sandbox's
        memory as it answers: call it outside the measured part of a run."""
        if self.admin_token is None:
            return None
        try:
            async with http.get(f"{self.base}/v1/sessions",
                                headers={"Authorization": f"Bearer {self.admin_token}"},
                                timeout=aiohttp.ClientTimeout(total=30)) as response:
                if response.status != 200:
                    return None
                body: list[dict[str, Any]] = await response.json()
                return body
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def locate(self, http: aiohttp.ClientSession) -> None:
        """Ask ``/v1/health`` for the pid; keep it if that process is here, and the only
        one answering (behind a balancer, ``make cluster``, each request may reach
        another replica: one replica's /proc figures are not the cluster's). Raises
        ``ServerProblem`` when the server does not answer."""
        try:
            body = await self.health(http)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise ServerProblem(
                f"no Troupe server answers at {self.base}/v1/health ({exc or type(exc).__name__});"
                " start one (`make run`), or let the load test start its own with "
                "--spawn-server") from None
        pid = body.get("pid")
        for _ in range(3):
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                if (await self.health(http)).get("pid") != pid:
                    return
        if (isinstance(pid, int) and is_loopback(self.ws_url)
                and measure.stat(pid) is not None and "server" in measure.cmdline(pid)):
            self.pid = pid

    def track(self, below: dict[int, measure.Stat]) -> None:
        """Remember the processes ``below`` a server this run started, to find the
        ones that outlive it."""
        if self.spawned is not None and self.spawned.server is not None:
            self.spawned.server.watched.track(below)

    async def settle(self, http: aiohttp.ClientSession, baseline_children: int | None,
                     limit: float = 20.0) -> dict[str, Any]:
        """Wait (up to ``limit`` s) until the server has no session of ours left, its
        pool is full and the processes below it stop changing in number; returns
        the last ``/v1/health``."""
        deadline = time.monotonic() + limit
        previous: tuple[Any, ...] = ()
        steady = 0
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                body = await self.health(http)
            sandbox = body.get("sandbox", {})
            children = len(measure.descendants(self.pid)) if self.pid else None
            state = (body.get("sessions", {}).get("active"), sandbox.get("pool_idle"),
                     sandbox.get("children"), children)
            full = sandbox.get("pool_idle") == sandbox.get("pool_size")
            at_baseline = baseline_children is None or children == baseline_children
            steady = steady + 1 if state == previous else 0
            if full and steady >= 3 and (at_baseline or steady >= 20):
                return body
            previous = state
            await asyncio.sleep(0.1)
        return body


class Spawned:
    """The fakes and the server this run started, each stopped by its pid."""

    def __init__(self, allowed_root: Path, script: dict[str, Any], max_sessions: int,
                 audio_lead: float, extra_args: list[str], log_path: Path) -> None:
        self.allowed_root = allowed_root
        self.script = script
        self.max_sessions = max_sessions
        self.audio_lead = audio_lead
        self.extra_args = extra_args
        self.log_path = log_path
        """The server's and the fakes' output (replaced at each run)."""
        self.fakes: asyncio.subprocess.Process | None = None
        self.server: measure.ServerProcess | None = None
        self.fakes_pid: int | None = None

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, http: aiohttp.ClientSession) -> Target:
        """Start the fakes, then the server; returns once ``/v1/health`` says ok.
        Raises ``ServerProblem``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.fakes = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "scripts.loadtest.fakes", json.dumps(self.script),
                cwd=measure.REPO, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, preexec_fn=measure.die_with_parent,
            )
        assert self.fakes.stdout is not None
        try:
            line = await asyncio.wait_for(self.fakes.stdout.readline(), START_TIMEOUT)
            urls = json.loads(line)
        except (TimeoutError, ValueError):
            raise ServerProblem("the fake backends did not start (python -m "
                                f"scripts.loadtest.fakes):\n{self.log_tail()}") from None
        self.fakes_pid = int(urls["pid"])
        self.server = measure.ServerProcess([
            "--stt", urls["stt"], "--tts", urls["tts"], "--llm", urls["llm"],
            "--llm-model", urls["model"], "--allowed-root", str(self.allowed_root),
            "--max-sessions", str(self.max_sessions),
            "--max-reloads-per-minute", "1000000", "--audio-lead", f"{self.audio_lead:g}",
            "--log-level", "WARNING", *self.extra_args,
        ], self.log_path)
        try:
            await self.server.wait_healthy(http, START_TIMEOUT)
        except measure.ServerDidNotStart as exc:
            raise ServerProblem(str(exc)) from None
        ws_url = self.server.url.replace("http://", "ws://") + "/v1/realtime?model=loadtest"
        return Target(ws_url, self.server.admin_token, self.server.pid, self)

    async def stop(self) -> list[measure.Leftover]:
        """Stop the server, then the fakes; returns the processes that outlived the
        server (each then killed)."""
        orphans: list[measure.Leftover] = []
        if self.server is not None:
            orphans = await asyncio.to_thread(self.server.stop, 20.0)
        if self.fakes is not None:
            if self.fakes.stdin is not None:
                self.fakes.stdin.close()
            await _terminate(self.fakes)
        return orphans


async def _terminate(process: asyncio.subprocess.Process, limit: float = 20.0) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), limit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
