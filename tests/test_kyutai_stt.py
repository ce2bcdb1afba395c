"""server/backends/kyutai/stt.py against a fake that speaks moshi-server's STT protocol on
loopback (tests/fake_kyutai_stt.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from conftest import SCALE, free_port

from server.audio.pcm import SAMPLE_RATE, pcm16_to_float
from server.backends.errors import BackendUnavailable
from server.backends.kyutai.stt import FRAME_SAMPLES, SETTLE_STEPS, KyutaiSTT
from server.backends.speech import EndWord, Event, Flushed, Pause, STTStream, Word
from tests.fakes.kyutai_stt import FakeKyutaiSTT

CHUNK_SEC = 0.1
"""What a client sends at a time: 2400 samples, not a whole number of frames."""


@pytest.fixture
async def stt(fake_kyutai_stt: FakeKyutaiSTT) -> AsyncIterator[KyutaiSTT]:
    async with KyutaiSTT(fake_kyutai_stt.url, timeout=5 * SCALE) as client:
        yield client


async def speak(stream: STTStream, seconds: float) -> None:
    """Send ``seconds`` of audio in 100 ms chunks (the fake does not listen to it)."""
    chunk = np.full(int(CHUNK_SEC * SAMPLE_RATE), 0.01, dtype=np.float32)
    for _ in range(round(seconds / CHUNK_SEC)):
        await stream.send_audio(chunk)


async def take(stream: STTStream, until: Callable[[Event], bool],
               within: float = 5.0) -> list[Event]:
    """Events up to and including the first that satisfies ``until``."""
    taken: list[Event] = []
    async with asyncio.timeout(within * SCALE):
        async for event in stream:
            taken.append(event)
            if until(event):
                return taken
    raise AssertionError(f"the events ended without the one awaited: {taken}")


def heard_up_to(seconds: float) -> Callable[[Event], bool]:
    """Until the pause prediction for ``seconds`` of audio: everything the server
    says about the audio sent so far has arrived by then."""
    return lambda event: isinstance(event, Pause) and event.time >= seconds - 1e-6


def last_pause_time(audio_sec: float) -> float:
    """The time of the last Pause after ``audio_sec`` of audio (0.5 s delay)."""
    return int(audio_sec * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES / SAMPLE_RATE - 0.5


def words(events: list[Event]) -> list[Word]:
    return [event for event in events if isinstance(event, Word)]


# ── transcript ───────────────────────────────────────────────────────────────


async def test_words_arrive_with_their_start_times_as_audio_streams_in(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.script(("Hello", 0.5), ("there", 0.9), ("friend", 1.6), end=2.0)
    async with await stt.open() as stream:
        await speak(stream, 1.5)  # the server, 0.48 s behind, has heard up to ~1 s
        early = await take(stream, heard_up_to(last_pause_time(1.5)))
        await speak(stream, 0.7)
        later = await take(stream, heard_up_to(last_pause_time(2.2)))

    assert words(early) == [Word("Hello", 0.5), Word("there", 0.9)]
    assert words(later) == [Word("friend", 1.6)]
    said = [e for e in early + later if isinstance(e, Word | EndWord)]
    assert said[:3] == [Word("Hello", 0.5), EndWord(0.9), Word("there", 0.9)]
    sent = fake_kyutai_stt.connections[0].audio_messages
    assert set(sent) == {FRAME_SAMPLES}
    assert len(sent) == int(2.2 * SAMPLE_RATE) // FRAME_SAMPLES


async def test_pause_probability_rises_after_the_end_of_speech(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.script(("Hello", 0.5), ("there", 0.9), end=1.5)
    async with await stt.open() as stream:
        await speak(stream, 3.0)
        pauses = [e for e in await take(stream, heard_up_to(last_pause_time(3.0)))
                  if isinstance(e, Pause)]

    assert pauses[0].time == pytest.approx((SETTLE_STEPS + 1) * 0.08 - 0.5)
    speaking = [p.probability for p in pauses if 0.6 <= p.time < 1.4]
    after = [p.probability for p in pauses if p.time >= 1.6]
    assert speaking and max(speaking) < 0.1
    assert after and min(after) > 0.9


async def test_flush_brings_out_the_last_words(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.script(("Hello", 0.5), ("there", 0.9), end=1.3)
    async with await stt.open() as stream:
        await speak(stream, 1.4)  # 17.5 frames: half a frame waits in the client
        before = await take(stream, heard_up_to(last_pause_time(1.4)))
        async with asyncio.timeout(5 * SCALE):
            await stream.flush()
        flushed = await take(stream, lambda event: isinstance(event, Flushed))

    assert words(before) == [Word("Hello", 0.5)]
    assert words(flushed) == [Word("there", 0.9)]
    connection = fake_kyutai_stt.connections[0]
    assert connection.markers == [1]
    assert set(connection.audio_messages) == {FRAME_SAMPLES}  # the half frame was padded


async def test_flush_sends_more_silence_when_the_server_lags_longer(
        fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.delay_steps = 25  # 2 s, as stt-2.6b-en; the client assumes 0.5 s
    fake_kyutai_stt.script(("Hello", 0.5), ("there", 0.9), end=1.3)
    async with KyutaiSTT(fake_kyutai_stt.url, timeout=5 * SCALE) as stt:
        stream = await stt.open()
        await speak(stream, 1.4)
        async with asyncio.timeout(5 * SCALE):
            await stream.flush()
        flushed = await take(stream, lambda event: isinstance(event, Flushed))

    assert words(flushed) == [Word("Hello", 0.5), Word("there", 0.9)]


async def test_a_flush_gives_up_after_max_flush_sec_of_silence(
        fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.delay_steps = 50  # 4 s
    async with KyutaiSTT(fake_kyutai_stt.url, timeout=5 * SCALE, max_flush_sec=1.0) as stt:
        stream = await stt.open()
        await speak(stream, 0.5)
        with pytest.raises(BackendUnavailable, match="did not return a flush marker"):
            await stream.flush()


# ── the wire ─────────────────────────────────────────────────────────────────


async def test_the_api_key_goes_in_the_kyutai_api_key_header(
        fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.api_key = "sesame"
    async with KyutaiSTT(fake_kyutai_stt.url + "/", "sesame", timeout=5 * SCALE) as stt:
        stream = await stt.open()
        await stream.close()
    assert fake_kyutai_stt.connections[0].headers["kyutai-api-key"] == "sesame"


async def test_a_refused_key_says_which_header_to_fix(fake_kyutai_stt: FakeKyutaiSTT) -> None:
    async with KyutaiSTT(fake_kyutai_stt.url, "wrong", timeout=5 * SCALE) as stt:
        with pytest.raises(BackendUnavailable, match="refused the API key") as raised:
            await stt.open()
    assert "kyutai-api-key" in raised.value.message
    assert "authorized_ids" in raised.value.message
    assert "TROUPE_STT_API_KEY" in raised.value.message


async def test_audio_goes_out_as_float32_frames(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT) -> None:
    ramp = np.linspace(-1, 1, 2 * FRAME_SAMPLES + 100, dtype=np.float32)
    async with await stt.open() as stream:
        await stream.send_audio(ramp[:1000])
        await stream.send_audio(ramp[1000:])
        await stream.flush()
    connection = fake_kyutai_stt.connections[0]
    assert connection.audio_messages[:3] == [FRAME_SAMPLES] * 3
    received = np.array(connection.samples[:len(ramp)], dtype=np.float32)
    np.testing.assert_array_equal(received, ramp)  # float32 survives exactly
    assert connection.samples[len(ramp):3 * FRAME_SAMPLES] == [0.0] * (FRAME_SAMPLES - 100)


async def test_close_ends_the_events_and_the_client_closes_open_streams(
        fake_kyutai_stt: FakeKyutaiSTT) -> None:
    async with KyutaiSTT(fake_kyutai_stt.url, timeout=5 * SCALE) as stt:
        closed, left_open = await stt.open(), await stt.open()
        await closed.close()
        async with asyncio.timeout(5 * SCALE):
            assert [event async for event in closed] == []
        with pytest.raises(RuntimeError, match="closed"):
            await closed.send_audio(np.zeros(10, dtype=np.float32))
    async with asyncio.timeout(5 * SCALE):
        assert [event async for event in left_open] == []


async def test_stereo_audio_is_refused(stt: KyutaiSTT) -> None:
    async with await stt.open() as stream:
        with pytest.raises(ValueError, match="mono"):
            await stream.send_audio(np.zeros((2, 480), dtype=np.float32))


# ── failures ─────────────────────────────────────────────────────────────────


async def test_an_error_instead_of_ready_means_capacity(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.at_capacity = True
    with pytest.raises(BackendUnavailable, match="at capacity") as raised:
        await stt.open()
    assert "no free channels" in raised.value.message
    assert stt.url in raised.value.message


async def test_no_ready_is_bounded(fake_kyutai_stt: FakeKyutaiSTT) -> None:
    fake_kyutai_stt.ready = False  # moshi-server's plain Asr module
    async with KyutaiSTT(fake_kyutai_stt.url, timeout=0.3 * SCALE) as stt:
        with pytest.raises(BackendUnavailable, match="did not say Ready.*BatchedAsr"):
            await stt.open()


async def test_an_unreachable_server_is_named() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    async with KyutaiSTT(url, timeout=5 * SCALE) as stt:
        with pytest.raises(BackendUnavailable, match="cannot reach") as raised:
            await stt.open()
    assert f"{url}/api/asr-streaming" in raised.value.message


@pytest.mark.parametrize("abrupt", [True, False], ids=["cut", "closed"])
async def test_a_drop_mid_stream_fails_the_events_and_the_sends(
        stt: KyutaiSTT, fake_kyutai_stt: FakeKyutaiSTT, abrupt: bool) -> None:
    fake_kyutai_stt.script(("Hello", 0.1), end=2.0)
    fake_kyutai_stt.drop_after_sec = 0.8
    fake_kyutai_stt.drop_abruptly = abrupt
    async with await stt.open() as stream:
        with pytest.raises(BackendUnavailable, match="mid-stream|broke off") as raised:
            await speak(stream, 1.0)  # may already fail
            async with asyncio.timeout(5 * SCALE):
                async for _ in stream:
                    pass
        assert stt.url in raised.value.message
        with pytest.raises(BackendUnavailable):
            await stream.send_audio(np.zeros(FRAME_SAMPLES, dtype=np.float32))
        with pytest.raises(BackendUnavailable):
            await stream.flush()


# ── client audio ─────────────────────────────────────────────────────────────


def test_pcm16_becomes_float32_in_minus_one_to_one() -> None:
    data = np.array([0, 16384, -32768, 32767, -1], dtype="<i2").tobytes()
    samples = pcm16_to_float(data)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, np.array(
        [0.0, 0.5, -1.0, 32767 / 32768, -1 / 32768], dtype=np.float32))


def test_pcm16_with_half_a_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="2 bytes a sample"):
        pcm16_to_float(b"\x00\x01\x02")
