"""The embedded offline backends, end to end: nothing else running.

Speech synthesized by the embedded TTS (piper) is streamed in as a client would,
heard by the embedded STT (Silero VAD + pocketsphinx), answered by the embedded
language model (SmolLM2 in llama.cpp) and spoken back. These tests load real models
(a few seconds each server), so they share them through one module-scoped server.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import SCALE, Realtime

from server.app import create_app
from server.audio.pcm import pcm16_bytes
from server.audio.resampling import StreamResampler
from server.backends.embedded import stt_worker
from server.backends.embedded.tts import EmbeddedTTS, phrases
from server.config import Config

pytestmark = pytest.mark.timeout(300)

SILENCE = np.zeros(24_000, np.float32)


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    # Steady: piper's random variation misheard "your" as "sure" in about one run of 40.
    tts = EmbeddedTTS(steady=True)
    return {text: tts.synthesize_all(text) for text in
            ("What is your name?", "Tell me a story about the sea please.")}


@pytest.fixture
async def embedded(config: Config) -> AsyncIterator[TestClient]:
    app = create_app(replace(config, stt="embedded", tts="embedded", llm="embedded"))
    async with TestClient(TestServer(app)) as client:
        yield client


async def open_session(client: TestClient) -> Realtime:
    ws = await client.ws_connect("/v1/realtime?model=troupe", protocols=("realtime",))
    session = Realtime(ws)
    assert (await session.receive())["type"] == "session.created"
    return session


async def stream(session: Realtime, audio: np.ndarray) -> None:
    """As a client: 80 ms appends of pcm16, as fast as the socket takes them."""
    data = pcm16_bytes(audio)
    for start in range(0, len(data), 3840):
        await session.send({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(data[start:start + 3840]).decode()})


async def until(session: Realtime, kind: str, within: float = 120.0) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await session.receive(within)
        events.append(event)
        assert event["type"] != "error", event
        if event["type"] == kind:
            return events


async def test_health_says_every_backend_is_embedded(embedded: TestClient) -> None:
    response = await embedded.get("/v1/health")
    body = await response.json()

    assert body["stt_up"] and body["tts_up"] and body["llm_up"]
    assert all(status.startswith("embedded:") for status in body["backends"].values())


async def test_spoken_question_is_heard_and_answered_with_speech(
    embedded: TestClient, speech: dict[str, np.ndarray],
) -> None:
    session = await open_session(embedded)

    await stream(session, np.concatenate([SILENCE, speech["What is your name?"], SILENCE]))
    heard = await until(session, "conversation.item.input_audio_transcription.completed")
    reply = await until(session, "response.done", within=120.0 * SCALE)

    kinds = [e["type"] for e in heard]
    assert "input_audio_buffer.speech_started" in kinds
    assert "input_audio_buffer.speech_stopped" in kinds
    transcript = heard[-1]["transcript"]
    assert "name" in transcript.split(), transcript
    assert reply[-1]["response"]["status"] == "completed"
    text = "".join(e["delta"] for e in reply
                   if e["type"] == "response.output_audio_transcript.delta")
    audio = b"".join(base64.b64decode(e["delta"]) for e in reply
                     if e["type"] == "response.output_audio.delta")
    assert text.strip()
    seconds = len(audio) / 2 / 24_000
    assert seconds > 0.5, f"{seconds:.2f} s of audio for {text!r}"
    samples = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
    assert float(np.sqrt(np.mean(samples ** 2))) > 0.01  # speech, not silence


async def test_ready_only_once_warm(embedded: TestClient) -> None:
    # Start-up reads the default character's prompt into the model's cache (seconds):
    # until then /v1/ready says "warming" (a balancer waits), /v1/health says alive.
    reasons = []
    for _ in range(int(600 * SCALE)):
        response = await embedded.get("/v1/ready")
        body = await response.json()
        if response.status == 200:
            break
        reasons.append(body["reasons"])
        assert (await embedded.get("/v1/health")).status == 200
        await asyncio.sleep(0.2)

    assert response.status == 200, reasons
    assert all(r == ["warming"] for r in reasons), reasons


async def test_speaking_over_the_reply_interrupts_it(
    embedded: TestClient, speech: dict[str, np.ndarray],
) -> None:
    session = await open_session(embedded)
    await session.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "Tell me a long story about the sea."}]}})
    await session.send({"type": "response.create"})
    await until(session, "response.output_audio.delta")

    await stream(session, np.concatenate([speech["Tell me a story about the sea please."],
                                          SILENCE]))
    events = await until(session, "unmute.interrupted_by_vad")
    events += await until(session, "response.done")

    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    assert events[-1]["response"]["status"] == "cancelled"
    assert "response.output_audio.delta" not in kinds[kinds.index("unmute.interrupted_by_vad"):]


# ── the pure parts ───────────────────────────────────────────────────────────


def test_phrases_are_spoken_a_sentence_at_a_time_and_the_first_sooner() -> None:
    assert phrases("Hello there. How are you? I am", final=False) == (
        ["Hello there.", "How are you?"], "I am")
    assert phrases("Well, I think that, you", final=False, first=True) == (
        ["Well, I think that,"], "you")
    assert phrases("Well, I think that, you", final=False) == ([], "Well, I think that, you")
    assert phrases("the *end*", final=True) == (["the end"], "")


def test_two_questions_apart_are_both_heard_and_quiet_is_silence(
    speech: dict[str, np.ndarray],
) -> None:
    # A quiet room (-70 dBFS) is silence without asking the VAD; speech after it is
    # heard from its first word, by a VAD that starts afresh.
    quiet = np.random.default_rng(3).normal(0, 3e-4, 24_000).astype(np.float32)
    audio = np.concatenate([quiet, speech["What is your name?"], quiet,
                            speech["Tell me a story about the sea please."], quiet])
    recogniser = stt_worker._Recogniser(stt_worker._Decoders())

    heard = [e for i in range(0, len(audio), 1920) for e in recogniser.hear(audio[i:i + 1920])]
    heard += recogniser.flush()

    words = [e.text for e in heard if isinstance(e, stt_worker.HeardWord)]
    assert words[:4] == ["what", "is", "your", "name"], words
    assert {"story", "sea"} <= set(words[4:]), words
    pauses = [e for e in heard if isinstance(e, stt_worker.HeardPause)]
    assert all(p.probability == 1.0 for p in pauses if p.time < 0.9)  # the first quiet


def test_steady_speech_sounds_the_same_on_every_run() -> None:
    first, second = (EmbeddedTTS(steady=True).synthesize_all("Hello there.") for _ in range(2))
    assert len(first) > 12_000 and np.array_equal(first, second)


def test_resampling_in_pieces_equals_resampling_at_once() -> None:
    rng = np.random.default_rng(7)
    audio = rng.uniform(-0.5, 0.5, 24_000).astype(np.float32)
    whole = StreamResampler(24_000, 16_000)(audio)
    pieces = StreamResampler(24_000, 16_000)
    chunked = np.concatenate([pieces(audio[i:i + 1920]) for i in range(0, len(audio), 1920)])

    assert len(whole) == len(chunked) == 16_000
    assert np.allclose(whole, chunked, atol=1e-5)
