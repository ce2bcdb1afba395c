"""Troupe's terminal client: list, load and talk to a session's characters, in text
or speech (a WAV file, or the microphone).

Run it from the checkout with the server running (``make run`` serves
http://127.0.0.1:8000 with the bundled characters)::

    .venv/bin/python -m scripts.client list
    .venv/bin/python -m scripts.client reload /srv/characters/pirates
    .venv/bin/python -m scripts.client reload default
    .venv/bin/python -m scripts.client say "hello there" --voice Bramble
    .venv/bin/python -m scripts.client say "Ahoy" --directory /srv/characters/pirates
    .venv/bin/python -m scripts.client say --wav question.wav --save-audio answer.wav
    .venv/bin/python -m scripts.client say "hi" --save-audio answer.wav
    .venv/bin/python -m scripts.client chat --voice Wren
    .venv/bin/python -m scripts.client chat --mic --voice Wren
    .venv/bin/python -m scripts.client --url ws://otherhost:8000/v1/realtime?model=x list

Each run opens one WebSocket session (``GET /v1/realtime?model=...``, subprotocol
``realtime``, the OpenAI GA dialect, so the URL needs a ``model`` parameter) and
closes it before exiting. Every session starts on the server's default characters;
``reload`` and ``say --directory`` only change that session's set, so ``list`` after
``reload`` in another run shows the default set again (``chat`` keeps one session).

Commands:

- ``list``: the session's characters, one a line: name, whether its file calls it
  good (yes / no / -) and its comment.
- ``reload DIR``: load DIR (absolute, under a root the server allows with
  ``--allowed-root``; a relative DIR is made absolute here; ``default`` is the server's
  own set) and print how many files loaded, each file's error and the duration.
- ``say TEXT [--voice NAME] [--directory DIR] [--save-audio OUT.wav]``: optionally
  reload DIR, select NAME, send TEXT as a user message and print the reply as it
  streams. Notes about the reload and the selection go to stderr, the reply alone to
  stdout. ``--save-audio`` writes the spoken reply to OUT.wav.
- ``say --wav IN.wav [--fast] [...]``: speak IN.wav to the character instead of
  typing. Any WAV (or other file ``soundfile`` reads), any rate and channels: it is
  mixed to mono and resampled to 24 kHz here. What the server heard goes to stderr as
  ``heard: ...``, the reply to stdout.
- ``chat [--voice NAME] [--directory DIR]``: read lines from stdin until end of input
  or ``/quit`` and print each streamed reply, with the commands ``/list``,
  ``/voice NAME``, ``/reload DIR`` and ``/help``. Selecting another character or
  reloading starts a new conversation (the server clears the history).
- ``chat --mic [--voice NAME] [--directory DIR]``: talk through the microphone. The
  server decides when you have finished (its turn detection) and answers; the reply is
  printed and played on the default output device (none: text only, with a note).
  Speaking over a reply interrupts it, so use headphones: the character hearing itself
  through the microphone interrupts itself. ``/quit``, the end of input or Ctrl-C ends it.

Speech, as it flows (all audio on the wire is pcm16, 24 kHz mono, base64)::

    say --wav IN.wav ─ mono, 24 kHz ─▶ input_audio_buffer.append, 80 ms each
                       (at real time; --fast: as fast as the connection takes it)
        ─▶ input_audio_buffer.commit (push-to-talk: the turn ends with the file)
        ◀─ conversation.item.input_audio_transcription.delta / .completed ─▶ stderr
        ─▶ response.create
        ◀─ response.output_text.delta ─▶ stdout
        ◀─ response.output_audio.delta ─▶ --save-audio OUT.wav (24 kHz mono pcm16)

    chat --mic: microphone ─▶ append every 80 ms; the server's turn detection answers
        on its own when you pause: transcript ─▶ stderr, text ─▶ stdout, audio ─▶ speaker

``--wav`` and ``--mic`` need a server with a speech-to-text backend (its ``--stt``
option; without one the server answers ``backend_unavailable``), and any reply audio
a text-to-speech backend (``--tts``); without it ``--save-audio`` fails with a note
(the reply text is still printed). The replies come
from the server's language model (``--llm``), or from its built-in responder, which
says it is not a model and repeats what it heard. Each command asks only for the reply
audio it uses (``session.update`` ``output_modalities``), so a text ``say`` costs the
server no speech synthesis.

The microphone goes through ``sounddevice`` (PortAudio). It is kept thin and is not
covered by the tests, which run without a sound card; only its absence (PortAudio not
installed: a note on what to install) is.

On a server with API keys, set ``TROUPE_API_KEY`` (it goes in ``Authorization: Bearer``;
never on the command line). A refused connection says why (HTTP 401, 403, 429, 503).

Every wait for the server has a limit (``--timeout``, 30 s: for an answer as a whole,
for a streamed reply between two of its events, and for the transcript once a file
is sent; not while the file or the microphone is streaming). Errors from the server
are printed to stderr as ``error: CODE: message``.

Exit status: 0 when everything asked for worked (``chat``: at ``/quit`` or the end of
input, even if the server refused some lines); 1 on an error event (``list``,
``reload``, ``say``; for ``chat --mic``, one answering the audio, such as no
speech-to-text), a reply that did not complete, nothing heard in the file, no reply
audio to save, a timeout, a refused or lost connection; 2 for a bad command line, or
something needed before anything is sent (an input file that is missing or not audio,
no directory for ``--save-audio``, no PortAudio or no microphone); 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import os
import stat
import sys
import threading
import wave
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, NoReturn, TypeVar

import aiohttp
import numpy as np
import numpy.typing as npt
import soundfile
from yarl import URL

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime?model=troupe-cli"
DEFAULT_TIMEOUT = 30.0
START_HINT = (
    "is the server running? Start it from the Troupe checkout with `make run` "
    "(or `.venv/bin/python -m server`), or point --url at a running server"
)
CHAT_HELP = (
    "type a message and press Enter; commands: /list, /voice NAME, /reload DIR, /help, "
    "/quit (or end the input). To speak instead, run `chat --mic`."
)
MIC_HELP = ("speak to the character (headphones keep it from hearing itself); "
            "/quit, the end of input or Ctrl-C ends the chat")
PORTAUDIO_HINT = (
    "install PortAudio (Debian/Ubuntu: sudo apt-get install libportaudio2; "
    "Fedora: sudo dnf install portaudio; macOS: brew install portaudio), "
    "or speak from a file with `say --wav FILE`"
)

SAMPLE_RATE = 24_000
"""The wire's pcm16: 24 kHz mono, little-endian int16."""
CHUNK_SEC = 0.08
CHUNK_SAMPLES = round(SAMPLE_RATE * CHUNK_SEC)

Event = dict[str, Any]
T = TypeVar("T")

# GA names first; the beta names are accepted too, they carry the same fields.
ITEM_ADDED = ("conversation.item.added", "conversation.item.created")
# A spoken reply's text comes as its audio transcript, as in OpenAI's API.
TEXT_DELTA = ("response.output_text.delta", "response.text.delta",
              "response.output_audio_transcript.delta", "response.audio_transcript.delta")
TEXT_DONE = ("response.output_text.done", "response.text.done",
             "response.output_audio_transcript.done", "response.audio_transcript.done")
AUDIO_DELTA = ("response.output_audio.delta", "response.audio.delta")
HEARD_DELTA = "conversation.item.input_audio_transcription.delta"
HEARD_DONE = "conversation.item.input_audio_transcription.completed"


class Failure(Exception):
    """The command cannot go on; the message says why, for stderr."""


class Closed(Failure):
    """The server closed the session; code 1000 is a normal end (a character that
    says goodbye closes it)."""

    def __init__(self, code: int | None, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"the server closed the connection (code {code})"
                         + (f": {reason}" if reason else ""))


class CannotStart(Failure):
    """Something the command needs before it sends anything is missing: an input file,
    a place for the output, PortAudio, a microphone (exit status 2)."""


class ServerError(Failure):
    """An ``error`` event from the server."""

    def __init__(self, event: Event) -> None:
        error = event.get("error")
        error = error if isinstance(error, dict) else {}
        self.code = str(error.get("code") or "unknown_error")
        self.message = str(error.get("message") or "(no message)")
        self.details: Any = error.get("details")
        self.event_id: Any = error.get("event_id")
        super().__init__(f"{self.code}: {self.message}")

    def report(self) -> str:
        """The code and message, then the details (a character's traceback) if any."""
        lines = [f"error: {self}"]
        if isinstance(self.details, dict) and isinstance(self.details.get("traceback"), str):
            lines.append(self.details["traceback"].rstrip())
        elif self.details is not None:
            lines.append(f"details: {json.dumps(self.details)}")
        return "\n".join(lines)


def report(failure: Failure) -> None:
    text = failure.report() if isinstance(failure, ServerError) else f"error: {failure}"
    print(text, file=sys.stderr, flush=True)


def note(text: str) -> None:
    """Progress for the person (stderr, so stdout holds only what was asked for)."""
    print(text, file=sys.stderr, flush=True)




# ── the connection ───────────────────────────────────────────────────────────


class Connection:
    """One WebSocket session; every wait is limited to ``timeout`` seconds unless
    the caller bounds it otherwise (``receive(bounded=False)``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float,
                 verbose: bool = False) -> None:
        self._ws = ws
        self.timeout = timeout
        self._verbose = verbose
        self._ids = itertools.count(1)

    async def send(self, event: Event) -> str:
        """Send ``event`` with a fresh ``event_id`` (errors answering it carry it)."""
        event_id = f"cli_{next(self._ids)}"
        frame = json.dumps({**event, "event_id": event_id})
        if self._verbose:
            note(f">> {frame}" if event["type"] != "input_audio_buffer.append"
                 else f">> input_audio_buffer.append {event_id} ({len(event['audio'])} "
                 "base64 characters)")
        try:
            await self._ws.send_str(frame)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise Failure(f"the connection is closed, cannot send {event['type']}: {exc}") from None
        return event_id

    async def receive(self, bounded: bool = True) -> Event:
        """The next event; raises ``Failure`` on a timeout (only if ``bounded``) or a
        closed connection."""
        try:
            message = await self._ws.receive(timeout=self.timeout if bounded else None)
        except TimeoutError:
            raise Failure(f"no answer from the server within {self.timeout:g} s "
                          "(raise --timeout if it is just slow)") from None
        if message.type is aiohttp.WSMsgType.TEXT:
            if self._verbose:
                note(f"<< {message.data}")
            try:
                event = json.loads(message.data)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise Failure(f"the server sent a frame that is not an event: {message.data!r}")
            return event
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
            code = message.data if message.type is aiohttp.WSMsgType.CLOSE else self._ws.close_code
            raise Closed(code, str(message.extra or ""))
        if message.type is aiohttp.WSMsgType.ERROR:
            raise Failure(f"the connection failed: {message.data}")
        raise Failure(f"the server sent an unexpected {message.type.name} frame")

    async def expect(self, types: Iterable[str]) -> Event:
        """Skip events until one of ``types`` arrives, within ``timeout`` in all.
        An ``error`` event raises ``ServerError``: requests are answered in order and
        this client has only one outstanding at a time."""
        wanted = tuple(types)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    event = await self.receive()
                    if event["type"] == "error":
                        raise ServerError(event)
                    if event["type"] in wanted:
                        return event
        except TimeoutError:
            raise Failure(f"no {' or '.join(wanted)} from the server within "
                          f"{self.timeout:g} s (raise --timeout if it is just slow)") from None

    async def request(self, event: Event, *answers: str) -> Event:
        await self.send(event)
        return await self.expect(answers)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


@contextlib.asynccontextmanager
async def connect(url: str, limit: float, verbose: bool = False) -> AsyncIterator[Connection]:
    """Open a session at ``url`` and wait for ``session.created``; always closes it."""
    async with aiohttp.ClientSession() as http:
        key = os.environ.get("TROUPE_API_KEY")
        try:
            async with asyncio.timeout(limit):
                ws = await http.ws_connect(
                    url, protocols=("realtime",),
                    headers={"Authorization": f"Bearer {key}"} if key else None,
                    timeout=aiohttp.ClientWSTimeout(ws_close=limit),
                )
        except aiohttp.ClientConnectorError as exc:
            raise Failure(f"cannot connect to {url} ({describe_os_error(exc)}); "
                          f"{START_HINT}") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise Failure(refused(url, exc, key is not None)) from None
        except aiohttp.ClientError as exc:
            raise Failure(f"cannot connect to {url}: {exc}") from None
        except TimeoutError:
            raise Failure(f"{url} did not answer within {limit:g} s") from None
        connection = Connection(ws, limit, verbose)
        try:
            await connection.expect(["session.created"])
            yield connection
        finally:
            await connection.close()


def refused(url: str, exc: aiohttp.WSServerHandshakeError, sent_key: bool) -> str:
    """Why the server turned the handshake away, and what to do."""
    retry = exc.headers.get("Retry-After") if exc.headers else None
    later = f"; retry in {retry} s" if retry else ""
    match exc.status:
        case 401 if sent_key:
            return f"{url} refused the key in TROUPE_API_KEY (HTTP 401)"
        case 401:
            return (f"{url} needs an API key (HTTP 401): set TROUPE_API_KEY to a key of "
                    "this server")
        case 403:
            return f"{url} refused this client (HTTP 403: its Origin or Host is not allowed)"
        case 429:
            return f"{url} refused: too many connections for this key or address (HTTP 429){later}"
        case 503:
            return f"{url} refused: server full (HTTP 503){later}"
    return (f"{url} did not accept the WebSocket (HTTP {exc.status}); is this a Troupe "
            "server's /v1/realtime?")


def describe_os_error(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return exc.os_error.strerror or str(exc.os_error)


# ── requests ─────────────────────────────────────────────────────────────────


def absolute_directory(directory: str) -> str:
    """``default`` as is; a relative path from this process's current directory."""
    return directory if directory == "default" else os.path.abspath(directory)


async def list_characters(connection: Connection) -> Event:
    return await connection.request({"type": "session.characters.list"},
                                    "session.characters.listed")


async def reload(connection: Connection, directory: str) -> Event:
    event = {"type": "session.characters.reload", "directory": absolute_directory(directory)}
    return await connection.request(event, "session.characters.reloaded")


async def select(connection: Connection, voice: str) -> str:
    """Select a character by name or voice path; returns the name the server chose."""
    updated = await connection.request(
        {"type": "session.update", "session": {"voice": voice}}, "session.updated")
    session = updated.get("session") or {}
    output = ((session.get("audio") or {}).get("output") or {})
    return str(output.get("voice") or session.get("voice") or voice)


async def configure(connection: Connection, *, speak: bool,
                    audio_input: Event | None = None) -> None:
    """Ask for reply audio only if it is used (the server then skips speech
    synthesis) and set the GA ``audio.input`` settings (turn detection) if given."""
    session: Event = {"type": "realtime",
                      "output_modalities": ["text", "audio"] if speak else ["text"]}
    if audio_input is not None:
        session["audio"] = {"input": audio_input}
    await connection.request({"type": "session.update", "session": session},
                             "session.updated")


PUSH_TO_TALK: Event = {"turn_detection": None}
"""The turn ends when the client commits the audio, and the reply waits for
``response.create``."""
SERVER_TURNS: Event = {"turn_detection": {"type": "server_vad"}}
"""The server ends the turn when the person pauses, and answers on its own."""


def user_message(text: str) -> Event:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]}}


AudioSink = Callable[[bytes], None]


async def talk(connection: Connection, text: str, speaker_prefix: bool = False,
               on_audio: AudioSink | None = None) -> bool:
    """Send ``text`` and stream the reply to stdout (its audio to ``on_audio``); True
    if it completed. Errors are printed; a timeout or a lost connection raises
    ``Failure``."""
    try:
        await connection.request(user_message(text), *ITEM_ADDED)
        request_id = await connection.send({"type": "response.create"})
    except ServerError as exc:
        report(exc)
        return False
    return await stream_reply(connection, request_id, speaker_prefix, on_audio)


async def stream_reply(connection: Connection, request_id: str, speaker_prefix: bool,
                       on_audio: AudioSink | None = None) -> bool:
    """Print the reply to ``response.create`` (sent as ``request_id``) as it streams,
    until ``response.done``; each wait is limited by the connection's timeout."""
    printer, ok = ReplyPrinter(speaker_prefix, on_audio), True
    while True:
        event = await connection.receive()
        if event["type"] == "error":
            error = ServerError(event)
            printer.end_line()
            report(error)
            if error.event_id == request_id:
                return False  # response.create itself was refused: no reply follows
            ok = False
        elif printer.feed(event):
            if printer.status != "completed":
                note(f"error: the reply ended with status {printer.status!r}")
            return ok and printer.status == "completed"


class ReplyPrinter:
    """Shows replies on stdout as they stream and hands their audio (pcm16 bytes) to
    ``on_audio``; one reply at a time."""

    def __init__(self, speaker_prefix: bool, on_audio: AudioSink | None = None) -> None:
        self._speaker_prefix = speaker_prefix
        self._on_audio = on_audio
        self._streamed = self._line_open = False
        self.status: object = None
        """The last reply's ``response.status``."""

    def feed(self, event: Event) -> bool:
        """Show ``event`` if it belongs to a reply; True at ``response.done``."""
        kind = event["type"]
        if kind == "response.created":
            self._streamed = False
            if self._speaker_prefix:
                voice = (event.get("response") or {}).get("voice") or "?"
                print(f"{voice}: ", end="", flush=True)
                self._line_open = True
        elif kind in TEXT_DELTA:
            print(event.get("delta", ""), end="", flush=True)
            self._streamed = self._line_open = True
        elif kind in TEXT_DONE:
            print("" if self._streamed else event.get("text", ""), flush=True)
            self._line_open = False
        elif kind in AUDIO_DELTA and self._on_audio is not None:
            self._on_audio(decode_audio(event))
        elif kind == "response.done":
            self.end_line()
            self.status = (event.get("response") or {}).get("status")
            return True
        return False

    def end_line(self) -> None:
        """End a reply's line on stdout before something else is printed."""
        if self._line_open:
            print(flush=True)
            self._line_open = False


def decode_audio(event: Event) -> bytes:
    try:
        return base64.b64decode(str(event.get("delta", "")), validate=True)
    except binascii.Error as exc:
        raise Failure(f"the server sent {event['type']} that is not base64: {exc}") from None


class Heard:
    """What the server heard the person say, on stderr as ``heard: ...`` while it is
    transcribed."""

    PREFIX = "heard: "

    def __init__(self) -> None:
        self._line_open = False

    def feed(self, event: Event) -> str | None:
        """Show a transcription event; returns the transcript when it is complete."""
        if event["type"] == HEARD_DELTA:
            prefix = "" if self._line_open else self.PREFIX
            print(prefix + str(event.get("delta", "")), end="", file=sys.stderr, flush=True)
            self._line_open = True
        elif event["type"] == HEARD_DONE:
            transcript = str(event.get("transcript") or "")
            if not self._line_open:
                print(self.PREFIX + (transcript or "(no words)"), file=sys.stderr, flush=True)
            self.end_line()
            return transcript
        return None

    def end_line(self) -> None:
        if self._line_open:
            print(file=sys.stderr, flush=True)
            self._line_open = False


async def first_of(*coroutines: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutines`` together; the result (or exception) of the first to end,
    once the others are cancelled."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(task for task in tasks if task in done).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


# ── the microphone and the speaker ───────────────────────────────────────────
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


async def until_quit() -> int:
    """0 at ``/quit`` or the end of input."""
    lines = StdinLines()
    while (line := await lines.readline()) is not None and line.strip() != "/quit":
        if line.strip():
            note(f"with --mic, {MIC_HELP}")
    return 0


# ── output ───────────────────────────────────────────────────────────────────


def print_characters(characters: list[Event]) -> None:
    if not characters:
        print("(no characters)")
        return
    names = [str(c.get("name")) for c in characters]
    width = max(len("NAME"), *(len(name) for name in names))
    print(f"{'NAME':<{width}}  GOOD  COMMENT")
    for name, character in zip(names, characters, strict=True):
        good = good_label(character.get("good"))
        comment = character.get("comment") or ""
        print(f"{name:<{width}}  {good:<4}  {comment}".rstrip())


def good_label(good: object) -> str:
    return "yes" if good is True else "no" if good is False else "-"


def print_listed(listed: Event) -> None:
    print(f"{listed.get('character_count')} characters in {listed.get('directory')}")
    print_characters(listed.get("characters") or [])


def reload_summary(reloaded: Event) -> str:
    errors = reloaded.get("error_count")
    return (f"loaded {reloaded.get('loaded_count')} of {reloaded.get('total_files')} files "
            f"from {reloaded.get('directory')}, {errors} error{'' if errors == 1 else 's'}, "
            f"in {float(reloaded.get('duration_ms') or 0):.0f} ms")


def print_reloaded(reloaded: Event) -> None:
    print(reload_summary(reloaded))
    print_characters(reloaded.get("characters") or [])
    print_load_errors(reloaded, sys.stdout)


def print_load_errors(reloaded: Event, stream: Any) -> None:
    for error in reloaded.get("errors") or []:
        print(f"error in {error.get('file')}: {error.get('error_type')}: "
              f"{error.get('message')}", file=stream)


# ── commands ─────────────────────────────────────────────────────────────────


async def run_list(args: argparse.Namespace) -> int:
    async with connect(args.url, args.timeout, args.verbose) as connection:
        print_listed(await list_characters(connection))
    return 0


async def run_reload(args: argparse.Namespace) -> int:
    async with connect(args.url, args.timeout, args.verbose) as connection:
        print_reloaded(await reload(connection, args.directory))
    return 0


async def prepare(connection: Connection, directory: str | None, voice: str | None) -> None:
    """``--directory`` and ``--voice`` of ``say`` and ``chat``; notes go to stderr."""
    if directory is not None:
        reloaded = await reload(connection, directory)
        note(reload_summary(reloaded))
        print_load_errors(reloaded, sys.stderr)
    if voice is not None:
        note(f"talking to {await select(connection, voice)}")


async def run_say(args: argparse.Namespace) -> int:
    speech = read_speech(args.wav) if args.wav is not None else None
    if args.save_audio is not None:
        check_output(args.save_audio)
    reply_audio = bytearray()
    on_audio = reply_audio.extend if args.save_audio is not None else None
    async with connect(args.url, args.timeout, args.verbose) as connection:
        await prepare(connection, args.directory, args.voice)
        await configure(connection, speak=on_audio is not None,
                        audio_input=PUSH_TO_TALK if speech is not None else None)
        if speech is None:
            ok = await talk(connection, args.text, on_audio=on_audio)
        else:
            if not await send_speech(connection, speech, paced=not args.fast):
                raise Failure(f"the server heard no words in {args.wav}, so there is "
                              "nothing to answer")
            request_id = await connection.send({"type": "response.create"})
            ok = await stream_reply(connection, request_id, False, on_audio)
    if args.save_audio is not None:
        ok = save_audio(args.save_audio, bytes(reply_audio)) and ok
    return 0 if ok else 1


async def run_chat(args: argparse.Namespace) -> int:
    if args.mic:
        return await run_mic_chat(args)
    async with connect(args.url, args.timeout, args.verbose) as connection:
        await prepare(connection, args.directory, args.voice)
        await configure(connection, speak=False)
        note(f"connected to {args.url}; {CHAT_HELP}")
        return await unless_ended(chat_lines(connection))


async def chat_lines(connection: Connection) -> int:
    lines = StdinLines()
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = await lines.readline()
        if line is None or line.strip() == "/quit":
            return 0
        if line.strip():
            await chat_line(connection, line.strip())


async def run_mic_chat(args: argparse.Namespace) -> int:
    sd = sound_devices()
    async with connect(args.url, args.timeout, args.verbose) as connection:
        await prepare(connection, args.directory, args.voice)
        speaker = Speaker.open(sd)
        try:
            await configure(connection, speak=speaker is not None, audio_input=SERVER_TURNS)
            mic = Microphone(sd)
            try:
                note(f"connected to {args.url}, listening; {MIC_HELP}")
                return await unless_ended(first_of(
                    until_quit(), converse(connection, speaker),
                    stream_microphone(connection, mic)))
            finally:
                mic.close()
        finally:
            if speaker is not None:
                speaker.close()


async def unless_ended(chat: Coroutine[Any, Any, int]) -> int:
    """The exit status of ``chat``; 0 if the server ends the session normally (code
    1000: the character said goodbye)."""
    try:
        return await chat
    except Closed as exc:
        if exc.code != 1000:
            raise
        note("the server ended the session" + (f": {exc.reason}" if exc.reason else ""))
        return 0


async def chat_line(connection: Connection, line: str) -> None:
    """One line of ``chat``: a command or a message. Server errors are printed and the
    chat goes on; a timeout or a lost connection raises ``Failure``."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    try:
        if command == "/list":
            print_listed(await list_characters(connection))
        elif command == "/voice" and argument:
            print(f"talking to {await select(connection, argument)}")
        elif command == "/reload" and argument:
            print_reloaded(await reload(connection, argument))
            print("(a new conversation)")
        elif command == "/help":
            note(CHAT_HELP)
        elif command in ("/voice", "/reload"):
            note(f"{command} needs an argument; {CHAT_HELP}")
        elif command.startswith("/"):
            note(f"unknown command {command}; {CHAT_HELP}")
        else:
            await talk(connection, line, speaker_prefix=True)
    except ServerError as exc:
        report(exc)


class StdinLines:
    """Lines of stdin without blocking the event loop where the loop can watch it
    (a terminal, a pipe); a regular file or ``/dev/null`` is read directly."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        self._buffer = b""
        self._eof = False
        self._pollable = not stat.S_ISREG(os.fstat(self._fd).st_mode)

    async def readline(self) -> str | None:
        """The next line without its newline; None at the end of input."""
        while b"\n" not in self._buffer and not self._eof:
            chunk = await self._read()
            self._eof = not chunk
            self._buffer += chunk
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")

    async def _read(self) -> bytes:
        if self._pollable:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            try:
                loop.add_reader(self._fd, ready.set_result, None)
            except (PermissionError, NotImplementedError):
                self._pollable = False  # epoll refuses character devices like /dev/null
            else:
                try:
                    await ready
                finally:
                    loop.remove_reader(self._fd)
        return os.read(self._fd, 65536)


# ── command line ─────────────────────────────────────────────────────────────


def positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.client",
        description="Talk to a running Troupe server: list and load the session's "
        "characters, send a message or a WAV file and print (and save) the reply, chat "
        "in text or through the microphone. Speech needs a server with a speech-to-text "
        "(its --stt) and a text-to-speech (its --tts). Start a server with `make run`.",
        epilog="Exit status: 0 success; 1 an error from the server, a reply that did not "
        "complete, nothing heard, no reply audio to save, a timeout or no connection; 2 a "
        "bad command line, an unreadable input file, or no PortAudio or microphone. "
        "Examples: `list`, `reload /srv/characters/pirates`, "
        "`say \"hello there\" --voice Bramble`, `say --wav in.wav --save-audio out.wav`, "
        "`chat --voice Wren`, `chat --mic`.",
    )
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the server's realtime WebSocket; it needs a ?model= parameter "
                        "(default: %(default)s)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for each answer from the server, between "
                        "two events of a streamed reply, and for the transcript once a "
                        "file is sent (default: %(default)g)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every event sent (>>) and received (<<) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="print the session's characters: name, good, comment")
    reload_parser = commands.add_parser(
        "reload", help="load a directory of characters into a session and print the result")
    reload_parser.add_argument("directory", metavar="DIR",
                               help="absolute path under an allowed root, or 'default'")
    say = commands.add_parser(
        "say", help="send one text message, or speak a WAV file (--wav), and print the "
        "reply (--save-audio: and save its audio)")
    say.add_argument("text", metavar="TEXT", nargs="?",
                     help="the message (leave it out with --wav)")
    say.add_argument("--wav", metavar="FILE",
                     help="speak this audio file instead (WAV or another format libsndfile "
                     "reads; any rate and channels); what the server heard goes to stderr")
    say.add_argument("--fast", action="store_true",
                     help="with --wav: send the audio as fast as possible, not at real time")
    say.add_argument("--save-audio", metavar="OUT.wav",
                     help="write the spoken reply to OUT.wav (24 kHz mono pcm16); the "
                     "server needs --tts")
    chat = commands.add_parser("chat", help="an interactive chat: text on stdin "
                               "(/list, /voice NAME, /reload DIR, /quit), or --mic")
    chat.add_argument("--mic", action="store_true",
                      help="speak through the microphone and hear the replies (needs "
                      "PortAudio; the server needs --stt, and --tts for the voice)")
    for sub in (say, chat):
        sub.add_argument("--voice", metavar="NAME",
                         help="the character to talk to (name or voice path); default: the "
                         "server picks the first good one")
        sub.add_argument("--directory", metavar="DIR",
                         help="reload this directory into the session first")
    return parser


def check_say(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command != "say":
        return
    if (args.text is None) == (args.wav is None):
        parser.error("say needs either TEXT or --wav FILE (one of them)")
    if args.fast and args.wav is None:
        parser.error("--fast only applies to --wav")


def check_url(parser: argparse.ArgumentParser, url: str) -> None:
    try:
        parsed = URL(url)
    except ValueError as exc:
        parser.error(f"--url {url!r} is not a URL: {exc}")
    if parsed.scheme not in ("ws", "wss", "http", "https") or not parsed.host:
        parser.error(f"--url {url!r} must be ws://HOST:PORT/v1/realtime?model=NAME")
    if "model" not in parsed.query:
        parser.error(f"--url {url!r} needs a ?model= parameter: this client speaks the "
                     "OpenAI GA dialect (without it the server speaks Unmute's, which "
                     "never sends response.done)")


RUNNERS = {"list": run_list, "reload": run_reload, "say": run_say, "chat": run_chat}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_url(parser, args.url)
    check_say(parser, args)
    try:
        return asyncio.run(RUNNERS[args.command](args))
    except CannotStart as exc:
        report(exc)
        return 2
    except Failure as exc:
        report(exc)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout was closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
