"""Speech from a file (read, mixed to mono, resampled to the wire's 24 kHz, streamed
in 80 ms appends) and a reply's audio written to a WAV file."""

from __future__ import annotations

import asyncio
import base64
import os
import wave
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import soundfile

from scripts.client.connection import Connection, first_of
from scripts.client.errors import CannotStart, Failure, ServerError, note
from scripts.client.replies import Heard

SAMPLE_RATE = 24_000
"""The wire's pcm16: 24 kHz mono, little-endian int16."""
CHUNK_SEC = 0.08
CHUNK_SAMPLES = round(SAMPLE_RATE * CHUNK_SEC)


# ── speech from a file ───────────────────────────────────────────────────────


def read_speech(path: str) -> bytes:
    """The audio of ``path`` (anything ``soundfile`` reads) as the wire's pcm16: mixed
    to mono, resampled to 24 kHz. Raises ``CannotStart`` if it is missing or not audio."""
    if not os.path.exists(path):
        raise CannotStart(f"{path}: no such file")
    if os.path.isdir(path):
        raise CannotStart(f"{path} is a directory, not a WAV file")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as exc:  # LibsndfileError is a RuntimeError
        raise CannotStart(f"cannot read {path} as audio (a WAV file, or another format "
                          f"libsndfile reads): {exc}") from None
    if len(samples) == 0:
        raise CannotStart(f"{path} holds no audio (0 samples)")
    mono = resample(samples.mean(axis=1), rate)
    return np.clip(np.round(mono * 32768), -32768, 32767).astype("<i2").tobytes()


def resample(samples: npt.NDArray[np.floating[Any]], rate: int,
             to_rate: int = SAMPLE_RATE) -> npt.NDArray[np.float64]:
    """``samples`` at ``rate`` as ``to_rate``, by linear interpolation; going down, a
    windowed-sinc low-pass first keeps what the new rate cannot carry from folding
    back into the speech band."""
    if rate == to_rate:
        return samples.astype(np.float64)
    taps = np.arange(-32, 33)
    if rate > to_rate and len(samples) > len(taps):  # shorter: too short to alias much
        cutoff = 0.5 * to_rate / rate  # cycles a sample, at the old rate
        kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
        samples = np.convolve(samples, kernel / kernel.sum(), mode="same")
    length = max(1, round(len(samples) * to_rate / rate))
    resampled: npt.NDArray[np.float64] = np.interp(
        np.arange(length) * (rate / to_rate), np.arange(len(samples)), samples)
    return resampled


async def send_speech(connection: Connection, pcm: bytes, paced: bool) -> str:
    """Stream ``pcm`` to a push-to-talk session, commit it and return the transcript
    (shown on stderr as it comes). An ``error`` raises ``ServerError``."""
    return await first_of(listen(connection), stream_audio(connection, pcm, paced))


async def stream_audio(connection: Connection, pcm: bytes, paced: bool) -> NoReturn:
    """Send ``pcm`` in 80 ms appends (at real time if ``paced``) and commit it, then
    give the server the connection's timeout to finish the transcript."""
    loop = asyncio.get_running_loop()
    start, chunk_bytes = loop.time(), 2 * CHUNK_SAMPLES
    for n, offset in enumerate(range(0, len(pcm), chunk_bytes)):
        if paced:
            await asyncio.sleep(start + n * CHUNK_SEC - loop.time())
        await connection.send({"type": "input_audio_buffer.append",
                               "audio": base64.b64encode(pcm[offset:offset + chunk_bytes])
                               .decode("ascii")})
    await connection.send({"type": "input_audio_buffer.commit"})
    await asyncio.sleep(connection.timeout)
    raise Failure(f"no transcript from the server within {connection.timeout:g} s of the "
                  "end of the audio (raise --timeout if it is just slow)")


async def listen(connection: Connection) -> str:
    """Events until the transcript of the committed audio, without a time limit (the
    audio is still going out). Any ``error`` answers the audio: ``ServerError``."""
    heard = Heard()
    while True:
        event = await connection.receive(bounded=False)
        if event["type"] == "error":
            heard.end_line()
            raise ServerError(event)
        transcript = heard.feed(event)
        if transcript is not None:
            return transcript


# ── reply audio to a file ────────────────────────────────────────────────────


def check_output(path: str) -> None:
    """Raises ``CannotStart`` unless a WAV file can be written at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CannotStart(f"--save-audio {path} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise CannotStart(f"--save-audio {path}: no directory {directory}")
    if not os.access(directory, os.W_OK):
        raise CannotStart(f"--save-audio {path}: cannot write in {directory}")


def save_audio(path: str, pcm: bytes) -> bool:
    """Write the reply's audio as a 24 kHz mono pcm16 WAV; False (with a note) if
    the server sent none."""
    if not pcm:
        note(f"error: the server sent no audio for the reply, so {path} was not written "
             "(the server speaks only with a text-to-speech backend: its --tts option)")
        return False
    try:
        with wave.open(path, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(pcm)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc}") from None
    note(f"saved {len(pcm) / 2 / SAMPLE_RATE:.2f} s of the reply's audio to {path}")
    return True
