"""The voice part's second phase: ``python -m server`` with the defaults (``--stt``,
``--tts`` and ``--llm embedded``), one session at a time, each saying the embedded
TTS's own "What is your name?" after 0.5 s of silence, then silence. Silero VAD and
pocketsphinx end the turn after a held pause, SmolLM2 writes, piper speaks the first
sentence once it is written ("first sentence written": the text delta after which
``server.backends.embedded.tts.phrases`` has a phrase ready; a reply of one sentence
is only spoken at its end, which the client cannot see, so some runs lack that
step). Each session is closed at its first audio. The runs start once ``/v1/ready``
says 200 (the server warms its models up first: "warm-up", from healthy to ready);
the first run is the first turn the server ever heard, and counts like the others.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.common import BenchError, Client, log, serving
from scripts.bench.voice_client import Question, VoiceSession
from server.backends.embedded.tts import phrases
from server.config import EMBEDDED

REPLY_TIMEOUT = 120.0
"""Seconds an embedded reply may take to start (model loads, a busy worker)."""
READY_TIMEOUT = 120.0
"""Seconds the server may take from healthy to ready (its warm-up)."""


@dataclass(frozen=True)
class EmbeddedFigures:
    turns: list[dict[str, float]]
    transcripts: list[str]
    warm_up: float
    """Seconds from /v1/health ok to /v1/ready 200."""


async def measure_embedded(root: Path, question: Question, runs: int) -> EmbeddedFigures:
    turns, transcripts = [], []
    options = ["--stt", EMBEDDED, "--tts", EMBEDDED, "--llm", EMBEDDED]
    async with serving(root, options, backends_up=True) as client:
        warm_up = await _until_ready(client)
        log(f"embedded: ready {warm_up:.1f} s after healthy (warm-up)")
        for run in range(runs):
            turn, transcript = await _embedded_turn(client, question)
            log(f"embedded: run {run + 1}/{runs}: heard {transcript!r}, end of speech → "
                f"first audio {turn['first audio']:.0f} ms")
            turns.append(turn)
            transcripts.append(transcript)
    return EmbeddedFigures(turns, transcripts, warm_up)


async def _until_ready(client: Client) -> float:
    """Seconds until ``/v1/ready`` answers 200. Raises ``BenchError``."""
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT:
        async with client.http.get(f"{client.server.url}/v1/ready") as response:
            if response.status == 200:
                return time.perf_counter() - started
            reasons = (await response.json())["reasons"]
        await asyncio.sleep(0.05)
    raise BenchError(f"not ready {READY_TIMEOUT:g} s after healthy: {reasons}")


async def _embedded_turn(client: Client, question: Question) -> tuple[dict[str, float], str]:
    session = await VoiceSession.open(client.http, client.server.url)
    try:
        session.speak(question.frames)
        audio = await session.wait_for("response.output_audio.delta", within=REPLY_TIMEOUT)
        assert audio is not None
    finally:
        await session.close()
    end = session.sent[question.end_index]
    steps = {
        "speech_started": "input_audio_buffer.speech_started",
        "first transcript delta": "conversation.item.input_audio_transcription.delta",
        "speech_stopped": "input_audio_buffer.speech_stopped",
        "transcript completed": "conversation.item.input_audio_transcription.completed",
        "response.created": "response.created",
        "first text delta": "response.output_audio_transcript.delta",
        "first audio": "response.output_audio.delta",
    }
    turn = {name: (found[0] - end) * 1000 for name, kind in steps.items()
            if (found := session.first(kind)) is not None}
    if (sentence := _first_phrase(session)) is not None:
        turn["first sentence written"] = (sentence - end) * 1000
    completed = session.first("conversation.item.input_audio_transcription.completed")
    return turn, completed[1]["transcript"] if completed else ""


def _first_phrase(session: VoiceSession) -> float | None:
    """When the reply's text first held a phrase the embedded TTS speaks on its own
    (a sentence and the space after it, ``server.backends.embedded.tts.phrases``)."""
    text = ""
    for at, event in session.all("response.output_audio_transcript.delta"):
        text += event["delta"]
        if phrases(text, final=False)[0]:
            return at
    return None
