"""What the server sends back: a reply streamed to stdout (its audio handed on), and
what it heard the person say, on stderr.

    ─▶ conversation.item.create, response.create              (talk)
    ◀─ response.output_text.delta / .done ─▶ stdout           (ReplyPrinter)
    ◀─ response.output_audio.delta ─▶ on_audio (pcm16 bytes)
    ◀─ conversation.item.input_audio_transcription.* ─▶ stderr  (Heard)
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Callable

from scripts.client.connection import Connection
from scripts.client.errors import Event, Failure, ServerError, note, report
from scripts.client.session import user_message

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
