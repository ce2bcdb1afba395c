"""``chat --mic``: the microphone streamed to the session, and what comes back shown
and played on the speaker.

    microphone ─▶ input_audio_buffer.append, every 80 ms     (stream_microphone)
    transcript ─▶ stderr, text ─▶ stdout, audio ─▶ Speaker   (converse)
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, NoReturn

from scripts.client.audio import CHUNK_SAMPLES, SAMPLE_RATE
from scripts.client.connection import Connection
from scripts.client.errors import CannotStart, ServerError, note, report
from scripts.client.replies import HEARD_DELTA, HEARD_DONE, Heard, ReplyPrinter

PORTAUDIO_HINT = (
    "install PortAudio (Debian/Ubuntu: sudo apt-get install libportaudio2; "
    "Fedora: sudo dnf install portaudio; macOS: brew install portaudio), "
    "or speak from a file with `say --wav FILE`"
)


# Thin on purpose: the tests run without a sound card, so only the missing-PortAudio
# path is exercised; everything else here is sounddevice's documented raw streams.


def sound_devices() -> Any:
    """The ``sounddevice`` module, with a default input device; ``CannotStart`` says
    what to install or plug in otherwise."""
    try:
        import sounddevice  # here, not at the top: it loads PortAudio, only --mic needs it
    except ImportError:
        raise CannotStart("the microphone needs the sounddevice package: "
                          ".venv/bin/pip install sounddevice") from None
    except OSError as exc:  # sounddevice raises it when it finds no PortAudio library
        raise CannotStart(f"the microphone needs PortAudio, which is not installed "
                          f"({exc}); {PORTAUDIO_HINT}") from None
    try:
        sounddevice.query_devices(kind="input")
    except (sounddevice.PortAudioError, ValueError) as exc:
        raise CannotStart(f"no microphone: PortAudio finds no default input device ({exc})"
                          ) from None
    return sounddevice


class Microphone:
    """The default input device as pcm16 mono 24 kHz, in 80 ms blocks."""

    def __init__(self, sd: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._blocks: asyncio.Queue[bytes] = asyncio.Queue()
        try:
            self._stream = sd.RawInputStream(samplerate=SAMPLE_RATE, channels=1,
                                             dtype="int16", blocksize=CHUNK_SAMPLES,
                                             callback=self._captured)
            self._stream.start()
        except sd.PortAudioError as exc:
            raise CannotStart(f"cannot record from the microphone at 24 kHz mono: {exc}"
                              ) from None

    def _captured(self, data: Any, frames: int, time: Any, status: Any) -> None:
        # PortAudio's thread: hand the block to the event loop.
        self._loop.call_soon_threadsafe(self._blocks.put_nowait, bytes(data))

    async def read(self) -> bytes:
        return await self._blocks.get()

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


class Speaker:
    """Plays pcm16 mono 24 kHz on the default output device as it arrives; ``clear``
    drops what is not played yet (the reply was interrupted)."""

    def __init__(self, sd: Any) -> None:
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._stream = sd.RawOutputStream(samplerate=SAMPLE_RATE, channels=1,
                                          dtype="int16", callback=self._pull)
        self._stream.start()

    @classmethod
    def open(cls, sd: Any) -> Speaker | None:
        """The default output device, or None (with a note) if there is none."""
        try:
            sd.query_devices(kind="output")
            return cls(sd)
        except (sd.PortAudioError, ValueError) as exc:
            note(f"no sound output ({exc}): the replies are shown as text only")
            return None

    def play(self, pcm: bytes) -> None:
        with self._lock:
            self._pending += pcm

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def _pull(self, out: Any, frames: int, time: Any, status: Any) -> None:
        # PortAudio's thread: what is pending, then silence.
        with self._lock:
            n = min(len(out), len(self._pending))
            out[:n] = bytes(self._pending[:n])
            del self._pending[:n]
        out[n:] = bytes(len(out) - n)

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


async def stream_microphone(connection: Connection, mic: Microphone) -> NoReturn:
    while True:
        block = await mic.read()
        await connection.send({"type": "input_audio_buffer.append",
                               "audio": base64.b64encode(block).decode("ascii")})


INTERRUPTIONS = ("input_audio_buffer.speech_started", "unmute.interrupted_by_vad")
"""The person speaks: what is left of the reply's audio here is dropped. The server
cancels a reply it is still sending (``interrupted_by_vad``), but audio it has sent
may still be playing, as it comes faster than it plays."""


async def converse(connection: Connection, speaker: Speaker | None) -> NoReturn:
    """Show (and play) what the server sends while the person talks, without a time
    limit (a person may stay silent). An error answering the audio (it carries its
    ``event_id``: the only requests are appends) ends the chat with ``ServerError``;
    others, such as a failed reply, are printed."""
    heard = Heard()
    printer = ReplyPrinter(speaker_prefix=True, on_audio=speaker.play if speaker else None)
    while True:
        event = await connection.receive(bounded=False)
        kind = event["type"]
        if kind == "error":
            printer.end_line()
            error = ServerError(event)
            if error.event_id is not None:
                raise error
            report(error)
        elif kind in (HEARD_DELTA, HEARD_DONE):
            printer.end_line()
            heard.feed(event)
        elif kind in INTERRUPTIONS and speaker is not None:
            speaker.clear()
        elif printer.feed(event) and printer.status != "completed":
            note("(interrupted)" if printer.status == "cancelled"
                 else f"error: the reply ended with status {printer.status!r}")
