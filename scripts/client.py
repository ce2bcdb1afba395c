"""Troupe's terminal client: list, load and talk to a session's characters, in text.

Run it from the checkout with the server running (``make run`` serves
http://127.0.0.1:8000 with the bundled characters)::

    .venv/bin/python -m scripts.client list
    .venv/bin/python -m scripts.client reload /srv/characters/pirates
    .venv/bin/python -m scripts.client reload default
    .venv/bin/python -m scripts.client say "hello there" --voice Bramble
    .venv/bin/python -m scripts.client say "Ahoy" --directory /srv/characters/pirates
    .venv/bin/python -m scripts.client chat --voice Wren
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
- ``say TEXT [--voice NAME] [--directory DIR]``: optionally reload DIR, select NAME,
  send TEXT as a user message and print the reply as it streams. Notes about the
  reload and the selection go to stderr, the reply alone to stdout.
- ``chat [--voice NAME] [--directory DIR]``: read lines from stdin until end of input
  or ``/quit`` and print each streamed reply, with the commands ``/list``,
  ``/voice NAME``, ``/reload DIR`` and ``/help``. Selecting another character or
  reloading starts a new conversation (the server clears the history).

Text only. Audio is **not supported yet**: no WAV files in or out, no microphone, no
playback, since the server's voice loop (speech-to-text and text-to-speech) is not
built. The replies come from the server's language model (``--llm``), or from its
built-in responder, which says it is not a model and repeats what it heard.

Every wait for the server has a limit (``--timeout``, 30 s: for an answer as a whole,
and for a streamed reply between two of its events). Errors from the server are
printed to stderr as ``error: CODE: message``.

Exit status: 0 when everything asked for worked (``chat``: at ``/quit`` or the end of
input, even if the server refused some lines); 1 on an error event (``list``,
``reload``, ``say``), a reply that did not complete, a timeout, a refused or lost
connection; 2 for a bad command line; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
from yarl import URL

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime?model=troupe-cli"
DEFAULT_TIMEOUT = 30.0
START_HINT = (
    "is the server running? Start it from the Troupe checkout with `make run` "
    "(or `.venv/bin/python -m server`), or point --url at a running server"
)
CHAT_HELP = (
    "type a message and press Enter; commands: /list, /voice NAME, /reload DIR, /help, "
    "/quit (or end the input). Text only: audio is not supported yet."
)

Event = dict[str, Any]

# GA names first; the beta names are accepted too, they carry the same fields.
ITEM_ADDED = ("conversation.item.added", "conversation.item.created")
TEXT_DELTA = ("response.output_text.delta", "response.text.delta")
TEXT_DONE = ("response.output_text.done", "response.text.done")


class Failure(Exception):
    """The command cannot go on; the message says why, for stderr."""


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
    """One WebSocket session; every wait is limited to ``timeout`` seconds."""

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
            note(f">> {frame}")
        try:
            await self._ws.send_str(frame)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise Failure(f"the connection is closed, cannot send {event['type']}: {exc}") from None
        return event_id

    async def receive(self) -> Event:
        """The next event; raises ``Failure`` on a timeout or a closed connection."""
        try:
            message = await self._ws.receive(timeout=self.timeout)
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
            reason = f": {message.extra}" if message.extra else ""
            raise Failure(f"the server closed the connection (code {code}){reason}")
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
        try:
            async with asyncio.timeout(limit):
                ws = await http.ws_connect(
                    url, protocols=("realtime",),
                    timeout=aiohttp.ClientWSTimeout(ws_close=limit),
                )
        except aiohttp.ClientConnectorError as exc:
            raise Failure(f"cannot connect to {url} ({describe_os_error(exc)}); "
                          f"{START_HINT}") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise Failure(f"{url} did not accept the WebSocket (HTTP {exc.status}); "
                          "is this a Troupe server's /v1/realtime?") from None
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


def user_message(text: str) -> Event:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": text}]}}


async def talk(connection: Connection, text: str, speaker_prefix: bool = False) -> bool:
    """Send ``text`` and stream the reply to stdout; True if it completed.
    Errors are printed; a timeout or a lost connection raises ``Failure``."""
    try:
        await connection.request(user_message(text), *ITEM_ADDED)
        request_id = await connection.send({"type": "response.create"})
    except ServerError as exc:
        report(exc)
        return False
    return await stream_reply(connection, request_id, speaker_prefix)


async def stream_reply(connection: Connection, request_id: str, speaker_prefix: bool) -> bool:
    """Print the reply to ``response.create`` (sent as ``request_id``) as it streams,
    until ``response.done``; each wait is limited by the connection's timeout."""
    streamed, ok, line_open = False, True, False
    while True:
        event = await connection.receive()
        kind = event["type"]
        if kind == "response.created" and speaker_prefix:
            print(f"{(event.get('response') or {}).get('voice') or '?'}: ", end="", flush=True)
            line_open = True
        elif kind in TEXT_DELTA:
            print(event.get("delta", ""), end="", flush=True)
            streamed = line_open = True
        elif kind in TEXT_DONE:
            print("" if streamed else event.get("text", ""), flush=True)
            line_open = False
        elif kind == "error":
            error = ServerError(event)
            if line_open:
                print(flush=True)
                line_open = False
            report(error)
            if error.event_id == request_id:
                return False  # response.create itself was refused: no reply follows
            ok = False
        elif kind == "response.done":
            if line_open:
                print(flush=True)
            status = (event.get("response") or {}).get("status")
            if status != "completed":
                note(f"error: the reply ended with status {status!r}")
            return ok and status == "completed"


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
    async with connect(args.url, args.timeout, args.verbose) as connection:
        await prepare(connection, args.directory, args.voice)
        return 0 if await talk(connection, args.text) else 1


async def run_chat(args: argparse.Namespace) -> int:
    async with connect(args.url, args.timeout, args.verbose) as connection:
        await prepare(connection, args.directory, args.voice)
        note(f"connected to {args.url}; {CHAT_HELP}")
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
        description="Talk to a running Troupe server in text: list and load the session's "
        "characters, send a message, chat. Audio is not supported yet: no WAV files in "
        "or out, no microphone (the server's voice loop is not built). Start a server "
        "with `make run`.",
        epilog="Exit status: 0 success; 1 an error from the server, a reply that did not "
        "complete, a timeout or no connection; 2 a bad command line. Examples: "
        "`list`, `reload /srv/characters/pirates`, `say \"hello there\" --voice Bramble`, "
        "`chat --voice Wren`.",
    )
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the server's realtime WebSocket; it needs a ?model= parameter "
                        "(default: %(default)s)")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for each answer from the server, and between "
                        "two events of a streamed reply (default: %(default)g)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every event sent (>>) and received (<<) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="print the session's characters: name, good, comment")
    reload_parser = commands.add_parser(
        "reload", help="load a directory of characters into a session and print the result")
    reload_parser.add_argument("directory", metavar="DIR",
                               help="absolute path under an allowed root, or 'default'")
    say = commands.add_parser("say", help="send one text message and print the reply "
                              "(text only; audio is not supported yet)")
    say.add_argument("text", metavar="TEXT")
    chat = commands.add_parser("chat", help="an interactive text chat on stdin "
                               "(/list, /voice NAME, /reload DIR, /quit)")
    for sub in (say, chat):
        sub.add_argument("--voice", metavar="NAME",
                         help="the character to talk to (name or voice path); default: the "
                         "server picks the first good one")
        sub.add_argument("--directory", metavar="DIR",
                         help="reload this directory into the session first")
    return parser


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
    try:
        return asyncio.run(RUNNERS[args.command](args))
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
