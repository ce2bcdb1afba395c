"""The commands, ``list``, ``reload``, ``say`` and ``chat`` (text or ``--mic``): each
opens one session, does its part and returns the exit status; stdin is read without
blocking the event loop (``StdinLines``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from collections.abc import Coroutine
from typing import Any

from scripts.client.audio import check_output, read_speech, save_audio, send_speech
from scripts.client.connection import Connection, connect, first_of
from scripts.client.errors import Closed, Failure, ServerError, note, report
from scripts.client.mic import Microphone, Speaker, converse, sound_devices, stream_microphone
from scripts.client.output import print_listed, print_load_errors, print_reloaded, reload_summary
from scripts.client.replies import stream_reply, talk
from scripts.client.session import (
    PUSH_TO_TALK,
    SERVER_TURNS,
    configure,
    list_characters,
    reload,
    select,
)

CHAT_HELP = (
    "type a message and press Enter; commands: /list, /voice NAME, /reload DIR, /help, "
    "/quit (or end the input). To speak instead, run `chat --mic`."
)
MIC_HELP = ("speak to the character (headphones keep it from hearing itself); "
            "/quit, the end of input or Ctrl-C ends the chat")


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


async def until_quit() -> int:
    """0 at ``/quit`` or the end of input."""
    lines = StdinLines()
    while (line := await lines.readline()) is not None and line.strip() != "/quit":
        if line.strip():
            note(f"with --mic, {MIC_HELP}")
    return 0
