"""The command line: options, their checks, the command's run and the exit status
(0, 1 a failure, 2 a bad command line or nothing to start with, 130 interrupted)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from yarl import URL

from scripts.client.commands import run_chat, run_list, run_reload, run_say
from scripts.client.errors import CannotStart, Failure, report

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime?model=troupe-cli"
DEFAULT_TIMEOUT = 30.0


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
