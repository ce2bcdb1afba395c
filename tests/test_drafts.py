"""Preemptive generation, end to end: the embedded STT (Silero VAD + pocketsphinx)
hears steady piper speech streamed in as a client would; the model is a fake OpenAI
endpoint on loopback that answers "You said: <the last user message>.", so each reply
shows which request it answered. The turn-taking reports a pause once the STT's words
are all out, the reply is drafted then, and the end of the turn uses the draft.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from conftest import Realtime
from fakes.openai_chat import FakeOpenAI
from prometheus_client.parser import text_string_to_metric_families

from server.audio.pcm import pcm16_bytes
from server.backends.drafts import Drafting
from server.backends.embedded.tts import EmbeddedTTS
from server.backends.openai.chat import OpenAICompatibleLLM

pytestmark = pytest.mark.timeout(300)

APPEND = 1920
"""Samples per append: 80 ms."""


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    """Each sentence from its first sound to its last (piper pads them with silence)."""
    tts = EmbeddedTTS(steady=True)
    spoken = {}
    for text in ("What is your name?", "Tell me a story about the sea please."):
        audio = tts.synthesize_all(text)
        loud = np.flatnonzero(np.abs(audio) > 0.01)
        spoken[text] = audio[loud[0]:loud[-1] + 1]
    return spoken


@pytest.fixture
async def echo(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.echo = True
    return fake_openai


@pytest.fixture
def talk(make_server: Callable[..., Awaitable[TestClient]], echo: FakeOpenAI,
         ) -> Callable[..., Awaitable[tuple[str, str, dict[str, float]]]]:
    """Say ``audio`` in a new session of a server with the embedded STT and the echoing
    model; returns the turn's transcript, the reply and the drafts counted meanwhile."""

    async def talk(audio: np.ndarray, **options: Any) -> tuple[str, str, dict[str, float]]:
        client = await make_server(stt="embedded", llm=echo.base_url, **options)
        before = await drafts(client)
        ws = await client.ws_connect("/v1/realtime?model=troupe", protocols=("realtime",))
        session = Realtime(ws)
        assert (await session.receive())["type"] == "session.created"
        await session.send({"type": "session.update", "session": {"modalities": ["text"]}})
        await stream(session, audio)
        transcript = reply = ""
        while not reply:
            event = await session.receive(60)
            assert event["type"] != "error", event
            if event["type"] == "conversation.item.input_audio_transcription.completed":
                transcript = event["transcript"]
            elif event["type"] == "response.done":
                part = event["response"]["output"][0]["content"][0]
                reply = part.get("text") or part.get("transcript")
        await ws.close()
        after = await drafts(client)
        return transcript, reply, {outcome: after.get(outcome, 0) - before.get(outcome, 0)
                                   for outcome in ("used", "dropped")}

    return talk


async def stream(session: Realtime, audio: np.ndarray) -> None:
    """80 ms appends, at four times real time (the turn-taking runs on the audio's
    clock, so only the order of what happens counts, not the pace)."""
    data = pcm16_bytes(np.concatenate([audio, silence(2.0)]))
    for start in range(0, len(data), APPEND * 2):
        await session.send({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(data[start:start + APPEND * 2]).decode()})
        await asyncio.sleep(0.02)


async def drafts(client: TestClient) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    return {sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "reply_drafts" for sample in family.samples
            if sample.name == "reply_drafts_total"}


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * 24_000), np.float32)


async def test_the_turn_is_answered_from_the_draft_made_at_its_pause(
    talk: Callable[..., Awaitable[tuple[str, str, dict[str, float]]]],
    speech: dict[str, np.ndarray], echo: FakeOpenAI,
) -> None:
    transcript, reply, counted = await talk(
        np.concatenate([silence(0.5), speech["What is your name?"]]))

    assert transcript == "what is your name"
    assert reply == "You said: what is your name."
    assert counted == {"used": 1, "dropped": 0}
    assert len(echo.requests) == 1  # the draft's request was the reply's


async def test_when_the_person_goes_on_the_draft_is_dropped_and_the_whole_turn_answered(
    talk: Callable[..., Awaitable[tuple[str, str, dict[str, float]]]],
    speech: dict[str, np.ndarray], echo: FakeOpenAI,
) -> None:
    # A 0.5 s breath between the sentences: long enough for the STT to finish the
    # first (0.3 s: a draft of it), too short to end the turn (held 1 s here).
    transcript, reply, counted = await talk(np.concatenate([
        silence(0.5), speech["What is your name?"], silence(0.5),
        speech["Tell me a story about the sea please."]]), pause_hold=1.0)

    assert transcript.startswith("what is your name") and "sea" in transcript
    assert reply == f"You said: {transcript}."  # never the first sentence alone
    assert counted["used"] == 1 and counted["dropped"] >= 1  # (a pause mid-sentence: more)


async def test_without_preemptive_generation_the_reply_starts_at_the_end_of_the_turn(
    talk: Callable[..., Awaitable[tuple[str, str, dict[str, float]]]],
    speech: dict[str, np.ndarray], echo: FakeOpenAI,
) -> None:
    transcript, reply, counted = await talk(
        np.concatenate([silence(0.5), speech["What is your name?"]]),
        preemptive_generation=False)

    assert reply == f"You said: {transcript}."
    assert counted == {"used": 0, "dropped": 0}
    assert len(echo.requests) == 1


# ── the draft itself, against the same fake model ────────────────────────────


def asking(content: str) -> Callable[[], Awaitable[Any]]:
    async def request() -> Any:
        return [{"role": "user", "content": content}], [], 0.7
    return request


async def reply_to(llm: Drafting, content: str) -> str:
    said = []
    async for item in llm.stream([{"role": "user", "content": content}], [], 0.7):
        said.append(getattr(item, "text", ""))
    return "".join(said)


async def test_a_draft_of_another_request_is_not_used(echo: FakeOpenAI) -> None:
    model = OpenAICompatibleLLM(echo.base_url)
    llm = Drafting(model)
    llm.draft(asking("hello"))

    assert await reply_to(llm, "hello there") == "You said: hello there."
    llm.draft(asking("again"))
    assert await reply_to(llm, "again") == "You said: again."
    asked = [r["messages"][-1]["content"] for r in echo.requests]
    assert asked[-2:] == ["hello there", "again"]  # "again" asked once: by its draft
    await model.close()


async def test_a_dropped_draft_stops_its_completion(echo: FakeOpenAI) -> None:
    echo.pause = 0.05  # a model that writes slowly: it is still writing when dropped
    model = OpenAICompatibleLLM(echo.base_url)
    llm = Drafting(model)
    llm.draft(asking("a long story"))
    for _ in range(200):
        if echo.requests:
            break
        await asyncio.sleep(0.01)
    llm.drop()

    for _ in range(200):
        if not [t for t in asyncio.all_tasks() if t.get_name() == "reply-draft"]:
            break
        await asyncio.sleep(0.01)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "reply-draft"]
    assert await reply_to(llm, "a long story") == "You said: a long story."
    assert len(echo.requests) == 2  # asked again: nothing of the dropped draft was kept
    await model.close()
