"""Ogg Opus in and out: real sphn encoding and decoding, no sockets."""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import pytest

from server.audio.opus import FRAME_SAMPLES, OpusDecoder, OpusEncoder
from server.audio.pcm import SAMPLE_RATE

Samples = npt.NDArray[np.float32]


class Page(NamedTuple):
    header_type: int
    granule: int
    serial: int
    sequence: int
    data: bytes


def pages(stream: bytes) -> list[Page]:
    """Split bytes that must hold whole Ogg pages only (what the frontend expects)."""
    found = []
    at = 0
    while at < len(stream):
        assert stream[at:at + 4] == b"OggS", f"no page at byte {at}"
        header_type, granule, serial, sequence = struct.unpack_from("<xxxxxBqII", stream, at)
        lacing_end = at + 27 + stream[at + 26]
        end = lacing_end + sum(stream[at + 27:lacing_end])
        assert end <= len(stream), "the last page is cut short"
        found.append(Page(header_type, granule, serial, sequence, stream[at:end]))
        at = end
    return found


def tone(hertz: float, samples: int, amplitude: float = 0.3) -> Samples:
    time = np.arange(samples) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * hertz * time)).astype(np.float32)


def encode_in_chunks(encoder: OpusEncoder, samples: Samples, chunk: int) -> list[bytes]:
    return [encoder.encode(samples[at:at + chunk]) for at in range(0, samples.size, chunk)]


def dominant_hertz(samples: Samples) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / SAMPLE_RATE)[spectrum.argmax()])


def best_correlation(decoded: Samples, original: Samples, max_lag: int) -> float:
    """Highest normalized correlation over the codec delays 0..max_lag."""
    window = original.size - max_lag
    reference = original[:window]
    return max(
        float(np.corrcoef(decoded[lag:lag + window], reference)[0, 1])
        for lag in range(max_lag + 1)
    )


def one_stream(seconds: float = 1.0) -> tuple[Samples, bytes]:
    samples = tone(440, int(seconds * SAMPLE_RATE))
    encoder = OpusEncoder()
    return samples, b"".join(encode_in_chunks(encoder, samples, 1234)) + encoder.flush()


def test_a_tone_survives_the_round_trip() -> None:
    samples, stream = one_stream()

    decoded = OpusDecoder().decode(stream)

    # Nothing is trimmed or added: sphn applies no pre-skip and 24000 is 25 frames.
    assert decoded.dtype == np.float32
    assert decoded.size == samples.size
    assert dominant_hertz(decoded) == pytest.approx(440, abs=2)
    assert best_correlation(decoded, samples, max_lag=480) > 0.95
    assert np.sqrt(np.mean(decoded**2)) == pytest.approx(np.sqrt(np.mean(samples**2)), rel=0.2)


def test_the_delay_is_the_codec_lookahead_not_the_declared_pre_skip() -> None:
    click = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    click[4800:5280] = np.random.default_rng(7).standard_normal(480).astype(np.float32) * 0.3
    encoder = OpusEncoder()
    stream = encoder.encode(click) + encoder.flush()

    decoded = OpusDecoder().decode(stream)
    found_at = int(np.correlate(decoded, click[4800:5280], "valid").argmax())

    head = pages(stream)[0].data[28:]
    assert head.startswith(b"OpusHead")
    assert struct.unpack_from("<H", head, 10)[0] == 3840  # 80 ms declared at 48 kHz
    assert 0 <= found_at - 4800 < 480  # but the audio comes out under 20 ms late


def test_slices_of_seven_bytes_decode_like_the_whole_stream() -> None:
    _, stream = one_stream()
    whole = OpusDecoder().decode(stream)

    decoder = OpusDecoder()
    sliced = [decoder.decode(stream[at:at + 7]) for at in range(0, len(stream), 7)]

    assert any(part.size == 0 for part in sliced)
    assert np.array_equal(np.concatenate(sliced), whole)


def test_every_encode_call_returns_whole_pages_only() -> None:
    encoder = OpusEncoder()
    results = encode_in_chunks(encoder, tone(300, SAMPLE_RATE), 700) + [encoder.flush()]

    assert b"" in results  # a call that completes no frame has nothing to send
    for result in results:
        pages(result)


def test_partial_frames_wait_and_flush_pads_them() -> None:
    encoder = OpusEncoder()

    assert encoder.encode(tone(440, FRAME_SAMPLES - 1)) == b""
    assert encoder.pending_samples == FRAME_SAMPLES - 1
    first = pages(encoder.encode(tone(440, 101)))
    assert encoder.pending_samples == 100
    padded = pages(encoder.flush())

    assert encoder.pending_samples == 0
    assert encoder.flush() == b""
    assert [page.data[28:36] for page in first[:2]] == [b"OpusHead", b"OpusTags"]
    # Granule positions count 48 kHz samples: one 960-sample frame each, none held by sphn.
    assert [page.granule for page in first[2:] + padded] == [1920, 3840]


def test_drop_pending_forgets_the_partial_frame() -> None:
    encoder = OpusEncoder()
    encoder.encode(tone(440, FRAME_SAMPLES + 300))

    assert encoder.drop_pending() == 300
    assert encoder.flush() == b""


def test_two_replies_stay_one_decodable_stream() -> None:
    encoder = OpusEncoder()
    first = b"".join(encode_in_chunks(encoder, tone(440, 11_111), 1920)) + encoder.flush()
    second = b"".join(encode_in_chunks(encoder, tone(660, 11_111), 1920)) + encoder.flush()

    stream = pages(first + second)
    assert sum(page.header_type & 0x02 for page in stream) == 0x02  # one beginning
    assert {page.serial for page in stream} == {stream[0].serial}
    assert [page.sequence for page in stream] == list(range(len(stream)))
    assert [page.data[28:36] for page in stream].count(b"OpusHead") == 1

    decoder = OpusDecoder()
    one, two = decoder.decode(first), decoder.decode(second)
    reply_samples = 12 * FRAME_SAMPLES  # 11 111 padded up to whole frames
    assert one.size == two.size == reply_samples
    assert dominant_hertz(one[:10_000]) == pytest.approx(440, abs=3)
    assert dominant_hertz(two[480:10_480]) == pytest.approx(660, abs=3)


@pytest.mark.parametrize(
    ("garbage", "named"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40), "WAV"),
        (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01" + bytes(40), "WebM"),
        (b"hello, this is not audio at all" * 3, "OggS"),
        (bytes(range(200, 256)), "OggS"),
    ],
)
def test_garbage_is_a_clear_error(garbage: bytes, named: str) -> None:
    with pytest.raises(ValueError, match="not an Ogg Opus stream") as raised:
        OpusDecoder().decode(garbage)

    assert named in str(raised.value)
    assert "input_audio_format" in str(raised.value)


def test_the_decoder_recovers_after_garbage() -> None:
    _, stream = one_stream()
    expected = OpusDecoder().decode(stream)
    cut = pages(stream)[5].data
    middle = stream.index(cut)

    decoder = OpusDecoder()
    before = decoder.decode(stream[:middle])
    with pytest.raises(ValueError, match=f"lost Ogg page sync at byte {middle}"):
        decoder.decode(b"garbage in the middle")
    after = [decoder.decode(stream[at:at + 500]) for at in range(middle, len(stream), 500)]

    assert np.array_equal(np.concatenate([before, *after]), expected)


def test_an_ogg_stream_that_is_not_opus_is_named() -> None:
    _, stream = one_stream()
    vorbis = stream[:28] + b"\x01vorbis\x00" + stream[36:]

    with pytest.raises(ValueError, match=r"an Ogg stream but not Opus.*\\x01vorbis"):
        OpusDecoder().decode(vorbis)


def test_stale_pages_before_the_stream_begins_are_skipped() -> None:
    _, old = one_stream(0.5)
    _, new = one_stream(0.5)
    stale = b"".join(page.data for page in pages(old)[4:8])

    decoder = OpusDecoder()
    decoded = decoder.decode(stale + new)

    assert decoder.pages_skipped == 4
    assert np.array_equal(decoded, OpusDecoder().decode(new))


def test_a_corrupt_opus_packet_is_an_error_and_decoding_goes_on() -> None:
    _, stream = one_stream()
    victim = pages(stream)[6]
    at = stream.index(victim.data) + 27 + victim.data[26]
    corrupt = bytearray(stream)
    corrupt[at:at + 2] = bytes([corrupt[at] | 0x03, 0])  # code 3 packet with no frames

    end = stream.index(victim.data) + len(victim.data)

    decoder = OpusDecoder()
    with pytest.raises(ValueError, match="damaged Ogg Opus page"):
        decoder.decode(bytes(corrupt[:end]))
    rest = decoder.decode(bytes(corrupt[end:]))

    # The call that met the bad page returned nothing (its first four frames are
    # lost with it); every frame after it decodes.
    assert rest.size == SAMPLE_RATE - 5 * FRAME_SAMPLES


def test_encode_wants_mono() -> None:
    with pytest.raises(ValueError, match="mono"):
        OpusEncoder().encode(np.zeros((2, 960), dtype=np.float32))
