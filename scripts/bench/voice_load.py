"""The voice part's third phase: N sessions at once on ``create_app`` in this process,
STT and TTS embedded, the LLM the built-in responder (or embedded: ``--load-llm``).

Sessions start 0.1 s apart, once ``/v1/ready`` says the models are warm; each says
the question and keeps streaming silence until its reply is done or ``LOAD_WINDOW``
after its end of speech. A task sleeping 10 ms
again and again records how late it wakes (2 s idle first, as a baseline). STT lag =
arrival of an STT-driven event minus the send time of the audio it is about
(``audio_start_ms`` of speech_started, ``audio_end_ms`` of speech_stopped, a
transcription delta's ``start_time``); a session whose transcript never came within
the window counts as not transcribed. Audio gaps: playing each reply from its first
delta, the time the player would have run dry. CPU: of this process (server and
clients) and of the server's child processes (model workers, zygote, sandbox
children).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from scripts.bench.common import BenchError, log
from scripts.bench.voice_client import (
    APPEND_SEC,
    Question,
    VoiceSession,
    audio_gaps,
    delta_seconds,
)
from scripts.measure import Spread, Watched, cpu_seconds, descendants, ms, own_cpu_seconds
from server.app import create_app
from server.config import EMBEDDED, Config

PROBE_SLEEP = 0.01
IDLE_PROBE = 2.0
"""Seconds the lateness probe runs on the idle in-process server first."""
READY_TIMEOUT = 120.0
"""Seconds the in-process server may take to warm its models up."""
LOAD_STAGGER = 0.1
LOAD_WINDOW = 20.0
"""Seconds after its end of speech that a load session waits for its reply to end."""


class LatenessProbe:
    """Sleeps ``PROBE_SLEEP`` again and again and records how late it wakes (ms)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(PROBE_SLEEP)
            self.samples.append((time.perf_counter() - before - PROBE_SLEEP) * 1000)

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass(frozen=True)
class LoadSession:
    stopped: float | None
    """ms from the end of speech to speech_stopped."""
    first_audio: float | None
    stt_lags: list[float]
    """ms: arrival of speech_started / transcription deltas / speech_stopped minus the
    send time of the audio they are about."""
    transcript: str | None
    done: bool
    gap: float
    """Seconds a player would have waited for reply audio."""
    audio: float
    """Seconds of reply audio received."""


@dataclass(frozen=True)
class LoadFigures:
    sessions: list[LoadSession]
    llm: str
    idle: Spread
    busy: Spread
    cpu_cores: float
    """CPU seconds this process used per wall second during the load."""
    workers_cores: float
    """The same for its child processes alive before the load began (the embedded
    models' workers, the zygote, the pooled sandbox children)."""
    seconds: float


async def measure_load(question: Question, count: int, llm: str) -> LoadFigures:
    config = Config(host="127.0.0.1", port=0, stt=EMBEDDED, tts=EMBEDDED,
                    llm=EMBEDDED if llm == EMBEDDED else None,
                    max_sessions=max(count, Config.max_sessions))
    runner = web.AppRunner(create_app(config), shutdown_timeout=2.0)
    log(f"load: in-process server, stt/tts embedded, llm {llm}: loading the models")
    before = set(descendants(os.getpid()))
    await runner.setup()
    probe = LatenessProbe()
    started: set[int] = set()
    try:
        started = set(descendants(os.getpid())) - before
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log(f"load: ready {await _until_ready(url):.1f} s after listening (the warm-up)")
        probe.start()
        await asyncio.sleep(IDLE_PROBE)
        idle = probe.take()
        log(f"load: {count} sessions, {LOAD_STAGGER:g} s apart, each until its reply is "
            f"done or {LOAD_WINDOW:g} s after its end of speech")
        workers = set(descendants(os.getpid())) - before
        cpu, wall = own_cpu_seconds(), time.perf_counter()
        workers_cpu = {pid: cpu_seconds(pid) for pid in workers}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sessions = await asyncio.gather(*(
                _load_session(http, url, question, n * LOAD_STAGGER) for n in range(count)))
        wall = time.perf_counter() - wall
        cpu_cores = (own_cpu_seconds() - cpu) / wall
        workers_cores = sum(cpu_seconds(pid) - used for pid, used in workers_cpu.items()) / wall
        busy = probe.take()
        started |= set(descendants(os.getpid())) - before
    finally:
        await probe.stop()
        await runner.cleanup()
        await _check_ended(started)
    return LoadFigures(sessions, llm, Spread.of(idle), Spread.of(busy), cpu_cores,
                       workers_cores, wall)


async def _until_ready(url: str) -> float:
    """Seconds until ``/v1/ready`` answers 200, as a balancer waits before it sends a
    replica sessions (the models' warm-up). Raises ``BenchError``."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        while time.perf_counter() - started < READY_TIMEOUT:
            async with http.get(f"{url}/v1/ready") as response:
                if response.status == 200:
                    return time.perf_counter() - started
            await asyncio.sleep(0.05)
    raise BenchError(f"the in-process server was not ready within {READY_TIMEOUT:g} s")


async def _check_ended(pids: set[int]) -> None:
    """Raises ``BenchError`` (after killing them) if any of ``pids`` (the in-process
    server's workers, sandbox children and zygote) outlives its clean-up by 5 s."""
    below = descendants(os.getpid())
    watched = Watched(os.getpid(), {pid: below[pid].started for pid in pids if pid in below})
    if leftovers := await asyncio.to_thread(watched.reap):
        raise BenchError("processes outlived the in-process server: "
                         f"{sorted(left.pid for left in leftovers)}")


async def _load_session(http: aiohttp.ClientSession, url: str, question: Question,
                        delay: float) -> LoadSession:
    await asyncio.sleep(delay)
    session = await VoiceSession.open(http, url)
    try:
        session.speak(question.frames)
        within = (question.end_index + 1) * APPEND_SEC + LOAD_WINDOW
        await session.wait_for("response.done", within=within, required=False)
    finally:
        await session.close()
    end = session.sent[question.end_index]
    lags = [at - session.sent_at(e["audio_start_ms"] / 1000)
            for at, e in session.all("input_audio_buffer.speech_started")]
    lags += [at - session.sent_at(e["start_time"])
             for at, e in session.all("conversation.item.input_audio_transcription.delta")]
    stopped = session.first("input_audio_buffer.speech_stopped")
    if stopped is not None:
        lags.append(stopped[0] - session.sent_at(stopped[1]["audio_end_ms"] / 1000))
    completed = session.first("conversation.item.input_audio_transcription.completed")
    audio = session.all("response.output_audio.delta")
    gap, seconds = audio_gaps([(at, delta_seconds(e)) for at, e in audio])
    return LoadSession(
        stopped=(stopped[0] - end) * 1000 if stopped else None,
        first_audio=(audio[0][0] - end) * 1000 if audio else None,
        stt_lags=ms(lags),
        transcript=completed[1]["transcript"] if completed else None,
        done=session.first("response.done") is not None,
        gap=gap,
        audio=seconds,
    )
