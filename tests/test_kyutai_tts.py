"""server/backends/kyutai/tts.py against a fake that speaks moshi-server's TTS WebSocket
protocol on loopback (tests/fake_kyutai.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import numpy as np
import pytest
from conftest import SCALE, free_port

from server.audio.pcm import SAMPLE_RATE, pcm16_bytes
from server.backends.errors import BackendUnavailable
from server.backends.kyutai.tts import KyutaiTTS, words
from server.backends.speech import AudioChunk, SpokenWord, TtsEvent
from tests.fakes.kyutai_tts import FRAME, FakeKyutaiTTS, tone

VOICE = "unmute-prod-website/p329_022.wav"


@pytest.fixture
async def tts(fake_kyutai_tts: FakeKyutaiTTS) -> AsyncIterator[KyutaiTTS]:
    client = KyutaiTTS(fake_kyutai_tts.url, timeout=10 * SCALE)
    await client.start()
    yield client
    await client.close()


async def stream(*chunks: str) -> AsyncIterator[str]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


async def speak_all(tts: KyutaiTTS, chunks: AsyncIterator[str],
                    voice: str | None = VOICE) -> list[TtsEvent]:
    async with asyncio.timeout(10 * SCALE):
        return [event async for event in tts.speak(chunks, voice)]


def spoken(events: Iterable[TtsEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, SpokenWord)]


def audio(events: Iterable[TtsEvent]) -> np.ndarray:
    chunks = [event.pcm for event in events if isinstance(event, AudioChunk)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


# ── a whole reply ────────────────────────────────────────────────────────────


async def test_words_and_audio_arrive_in_order(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    events = await speak_all(tts, stream("Hel", "lo there,", " gen", "eral ", "Kenobi."))

    assert spoken(events) == ["Hello", "there,", "general", "Kenobi."]
    per_word = fake_kyutai_tts.samples_per_word
    samples = audio(events)
    assert samples.dtype == np.float32
    assert len(samples) == 4 * per_word
    expected = np.concatenate([tone(i, per_word) for i in range(4)])
    np.testing.assert_array_equal(samples, expected)  # float32 on the wire: exact
    # Each word comes before its audio, frame by frame.
    kinds = ["word" if isinstance(e, SpokenWord) else len(e.pcm) for e in events]
    assert kinds == (["word"] + [FRAME] * fake_kyutai_tts.frames_per_word) * 4
    words_ = [e for e in events if isinstance(e, SpokenWord)]
    assert words_[1] == SpokenWord("there,", per_word / SAMPLE_RATE, 2 * per_word / SAMPLE_RATE)


async def test_one_word_per_message_then_eos(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    await speak_all(tts, stream("**Bold**  “quoted”\n", "and `code`"))

    (connection,) = fake_kyutai_tts.connections
    assert connection.received == [
        {"type": "Text", "text": "Bold"},
        {"type": "Text", "text": '"quoted"'},
        {"type": "Text", "text": "and"},
        {"type": "Text", "text": "code"},
        {"type": "Eos"},
    ]
    assert connection.violations == []


async def test_empty_text_sends_only_eos(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    assert await speak_all(tts, stream("", "  ")) == []
    assert fake_kyutai_tts.connections[0].received == [{"type": "Eos"}]


async def test_query_parameters_and_api_key(fake_kyutai_tts: FakeKyutaiTTS) -> None:
    fake_kyutai_tts.api_key = "sesame"
    client = KyutaiTTS(fake_kyutai_tts.url + "/api/tts_streaming", api_key="sesame",
                       cfg_alpha=2.0, seed=7, temperature=0.6, max_seq_len=512,
                       timeout=10 * SCALE)
    await client.start()
    try:
        await speak_all(client, stream("hi"), voice="voices/a b&c.wav")
        await speak_all(client, stream("hi"), voice=None)
    finally:
        await client.close()

    first, second = fake_kyutai_tts.connections
    assert first.query == {"format": "PcmMessagePack", "voice": "voices/a b&c.wav",
                           "cfg_alpha": "2.0", "seed": "7", "temperature": "0.6",
                           "max_seq_len": "512"}
    assert first.headers["kyutai-api-key"] == "sesame"
    assert "voice" not in second.query


async def test_default_query_is_unmutes(tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS) -> None:
    await speak_all(tts, stream("hi"))
    (connection,) = fake_kyutai_tts.connections
    assert connection.query == {"format": "PcmMessagePack", "voice": VOICE, "cfg_alpha": "1.5"}
    assert connection.headers["kyutai-api-key"] == "public_token"


# ── failures ─────────────────────────────────────────────────────────────────


async def test_wrong_api_key(fake_kyutai_tts: FakeKyutaiTTS) -> None:
    client = KyutaiTTS(fake_kyutai_tts.url, api_key="wrong", timeout=10 * SCALE)
    await client.start()
    try:
        with pytest.raises(BackendUnavailable, match="TROUPE_TTS_API_KEY") as raised:
            await speak_all(client, stream("hi"))
    finally:
        await client.close()
    assert raised.value.code == "backend_unavailable"
    assert fake_kyutai_tts.url in raised.value.message
    assert fake_kyutai_tts.rejected == 1


async def test_error_at_start_means_capacity(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    fake_kyutai_tts.refuse = True
    with pytest.raises(BackendUnavailable, match="at capacity") as raised:
        await speak_all(tts, stream("hi"))
    assert "no free channels" in raised.value.message
    (connection,) = fake_kyutai_tts.connections
    await asyncio.wait_for(connection.ended.wait(), 5 * SCALE)
    assert connection.received == []


async def test_drop_mid_stream(tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS) -> None:
    fake_kyutai_tts.drop_after_words = 2
    events: list[TtsEvent] = []
    with pytest.raises(BackendUnavailable, match="broke off mid-reply") as raised:
        async with asyncio.timeout(10 * SCALE):
            async for event in tts.speak(stream("one two three four"), VOICE):
                events.append(event)
    assert fake_kyutai_tts.url in raised.value.message
    assert spoken(events) == ["one", "two"]
    assert len(audio(events)) == 2 * fake_kyutai_tts.samples_per_word


async def test_silent_server_times_out(fake_kyutai_tts: FakeKyutaiTTS) -> None:
    fake_kyutai_tts.stall = True
    client = KyutaiTTS(fake_kyutai_tts.url, timeout=0.5 * SCALE)
    await client.start()
    try:
        with pytest.raises(BackendUnavailable, match="sent nothing"):
            await speak_all(client, stream("hello"))
    finally:
        await client.close()
    (connection,) = fake_kyutai_tts.connections
    await asyncio.wait_for(connection.closed_by_client.wait(), 5 * SCALE)


async def test_a_slow_text_source_is_not_a_silent_server(
    fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    """The server has nothing to say while the model has not written the next words
    (the fault suite found a model slow to answer blamed on the TTS): only its
    silence after the end of the text counts."""
    client = KyutaiTTS(fake_kyutai_tts.url, timeout=0.3 * SCALE)
    await client.start()

    async def slow() -> AsyncIterator[str]:
        yield "Well "
        await asyncio.sleep(1.0 * SCALE)  # over three timeouts of nothing to say
        yield "then."

    try:
        events = await speak_all(client, slow())
    finally:
        await client.close()
    assert spoken(events) == ["Well", "then."]


async def test_unreachable_server() -> None:
    client = KyutaiTTS(f"ws://127.0.0.1:{free_port()}", timeout=5 * SCALE)
    await client.start()
    try:
        with pytest.raises(BackendUnavailable, match="cannot reach") as raised:
            await speak_all(client, stream("hi"))
    finally:
        await client.close()
    assert "--tts" in raised.value.message


async def test_text_source_failure_ends_the_reply(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS
) -> None:
    async def failing() -> AsyncIterator[str]:
        yield "Hello "
        raise BackendUnavailable("the language model broke")

    with pytest.raises(BackendUnavailable, match="the language model broke"):
        await speak_all(tts, failing())
    (connection,) = fake_kyutai_tts.connections
    await asyncio.wait_for(connection.closed_by_client.wait(), 5 * SCALE)
    assert connection.texts == ["Hello"]
    assert {"type": "Eos"} not in connection.received


# ── barge-in ─────────────────────────────────────────────────────────────────


class Endless:
    """Text that never ends: a first word, then waits; notes when it is stopped."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    async def __call__(self) -> AsyncIterator[str]:
        try:
            yield "Listen "
            await asyncio.Event().wait()
            yield "never"
        finally:
            self.stopped.set()


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_stopping_early_closes_the_connection(
    tts: KyutaiTTS, fake_kyutai_tts: FakeKyutaiTTS, how: str
) -> None:
    text = Endless()
    heard = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(tts.speak(text(), VOICE)) as events:
            async for event in events:
                if isinstance(event, AudioChunk):
                    heard.set()
                    if how == "aclose":
                        return

    task = asyncio.create_task(consume())
    await asyncio.wait_for(heard.wait(), 10 * SCALE)
    if how == "cancel":
        task.cancel()
    done, _ = await asyncio.wait([task], timeout=5 * SCALE)
    assert task in done
    assert task.cancelled() == (how == "cancel")

    (connection,) = fake_kyutai_tts.connections
    await asyncio.wait_for(connection.closed_by_client.wait(), 5 * SCALE)
    await asyncio.wait_for(text.stopped.wait(), 5 * SCALE)
    assert connection.texts == ["Listen"]
    assert {"type": "Eos"} not in connection.received


# ── pure parts ───────────────────────────────────────────────────────────────


async def test_words_rechunks_at_spaces() -> None:
    pieces = ["  Good", "mor", "ning, ", "*dear*\tfri", "end", " : ", "bye"]
    assert [w async for w in words(stream(*pieces))] == [
        "Goodmorning,", "dear", "friend", ":", "bye"]


@pytest.mark.parametrize("samples", [
    np.zeros(0, np.float32),
    np.array([0.0, 0.5, -0.5, 1.0, -1.0], np.float32),
    tone(3, 1920),
])
def test_pcm16_bytes_round_trips(samples: np.ndarray) -> None:
    raw = pcm16_bytes(samples)
    assert len(raw) == 2 * len(samples)
    back = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32767.0
    np.testing.assert_allclose(back, samples, atol=1 / 32767)


def test_pcm16_bytes_clips() -> None:
    raw = pcm16_bytes(np.array([2.0, -3.0, 1.0], np.float32))
    assert np.frombuffer(raw, dtype="<i2").tolist() == [32767, -32767, 32767]
