"""One WebSocket connection's lifecycle.

    ws frames ─▶ receive loop ─ size / binary / JSON / schema checks ─▶ error event
                      │ valid event
                      ▼
                 backlog ─▶ worker: session.update, characters.list/reload, audio, …
                                  (one at a time, each answered exactly once)
    worker, reply, STT reader ─▶ outbox ─▶ writer ─▶ ws frames
    close: cancel the worker, kill the session's sandboxes, drop its metric series

The first job on the backlog loads the default directory, so a client's first
``session.characters.list`` already sees its own characters.

Limits (README "Limits"): every queue of a session is bounded, and nothing a
client does makes the server wait for it.

- The backlog holds at most ``MAX_BACKLOG_EVENTS`` events and ``MAX_BACKLOG_BYTES``
  of their frames. An event that finds it full is dropped: the first of a run gets
  an ``error`` (``rate_limited``), the others none; more than ``MAX_DROPPED_EVENTS``
  in a row close the session with 1008 "too many events while behind".
- The outbox holds at most ``MAX_OUTBOX_BYTES`` of events not yet written, and one
  frame may take the socket at most ``SEND_TIMEOUT`` seconds: past either, the
  client is not reading; the session closes with 1008 "client not reading", the
  events still queued dropped.
- More than ``MAX_INVALID_EVENTS`` refused frames (not JSON, not an event, too
  large, binary, nested too deep) in ``INVALID_WINDOW`` seconds: one ``error``
  (``rate_limited``), then a close with 1008 "too many invalid events". Below
  that, each gets its ``invalid_event`` (or ``message_too_large``) error.
- A close waits ``CLOSE_TIMEOUT`` seconds at most for the client's close frame,
  then resets the connection: what the client never read is freed at once.

The receive loop yields to the event loop after every frame, so a client that
sends as fast as loopback allows delays no other session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import struct
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web

from sandbox import CharacterInfo, Pool, SandboxError

from .. import metrics
from ..audio.opus import OpusDecoder
from ..backends.errors import BackendUnavailable
from ..backends.llm import LLM
from ..backends.speech import SpeechToText, TextToSpeech
from ..config import Config
from ..conversation import replies
from ..conversation.characters import CharacterSet, Loaded
from ..conversation.history import Conversation
from ..conversation.listening import Listening, Utterance
from ..conversation.turns import Action, State, TurnTaking
from ..errors import ServerSideError, TroupeError, from_sandbox
from . import dialects, protocol
from .dialects import Dialect, SessionSettings
from .limits import Backlog, Outbox, SlidingWindow

log = logging.getLogger(__name__)
T = TypeVar("T")

STT_RETRY = 2.0
"""Seconds after a speech-to-text failure before a new stream is tried."""
SILENCE_MARKER = "..."
"""The person's turn when they stayed silent (Unmute's marker): the character goes on."""
GOODBYE = "Bye!"
"""A reply ending with this closes the session once it has been spoken."""

# The limits below would be Config options; until then, module constants.
MAX_BACKLOG_EVENTS = 256
"""Client events waiting for the worker (20 s of 80 ms audio appends)."""
MAX_BACKLOG_BYTES = 4 * 1024 * 1024
"""Characters of the frames those events came from."""
MAX_DROPPED_EVENTS = 256
"""Events dropped in a row at a full backlog before the session is closed."""
MAX_OUTBOX_BYTES = 2 * 1024 * 1024
"""Characters of server events not yet written to the socket (30 s of pcm16 audio)."""
SEND_TIMEOUT = 10.0
"""Seconds one frame may wait for the client to take data before it is abandoned."""
MAX_INVALID_EVENTS = 32
"""Refused frames allowed in ``INVALID_WINDOW`` seconds; one more closes the session."""
INVALID_WINDOW = 10.0
CLOSE_TIMEOUT = 5.0
"""Seconds a close waits (flushing, then for the client's close frame) before a reset."""


_teardowns: set[asyncio.Future[None]] = set()
"""Session cleanups in progress, kept so that a cancelled handler's still finishes."""


class Session:
    def __init__(
        self, ws: web.WebSocketResponse, dialect: Dialect, model: str | None,
        pool: Pool, config: Config, llm: LLM, tts: TextToSpeech | None = None,
        stt: SpeechToText | None = None,
    ) -> None:
        self.id = protocol.new_id("sess")
        self.ws = ws
        self.dialect = dialect
        self.config = config
        self.settings = SessionSettings.initial(self.id, dialect, model)
        self.characters = CharacterSet(pool, config, f"session {self.id}",
                                       on_sandbox_death=_weakly(self._sandbox_died))
        self._notices: set[asyncio.Task[None]] = set()
        self.system_prompt: str | None = None
        self.llm = llm
        self.tts = tts
        self.stt = stt
        self._listening: Listening | None = None
        self._opus_out: replies.OpusOut | None = None
        self._refused_audio = False
        self._stt_retry_at = 0.0
        self._opus_in: OpusDecoder | None = None
        self._greeted = False
        self._parting: asyncio.Task[None] | None = None
        self.conversation = Conversation()
        self._reply: asyncio.Task[None] | None = None
        self.started = time.monotonic()
        self.last_heard = self.started  # the client's last frame (pings do not count)
        self._jobs: Backlog[protocol.ClientEventUnion | _Turn | None] = Backlog(
            MAX_BACKLOG_EVENTS, MAX_BACKLOG_BYTES)
        self._outbox = Outbox(MAX_OUTBOX_BYTES)
        self._writer: asyncio.Task[None] | None = None
        self._sending_since: float | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False
        self._refused = SlidingWindow(MAX_INVALID_EVENTS, INVALID_WINDOW)
        self._reloads: collections.deque[float] = collections.deque()

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> None:
        """Serve the connection until the client leaves or the session closes it."""
        writer = self._writer = asyncio.create_task(self._write(), name=f"{self.id}-writer")
        worker = asyncio.create_task(self._work(), name=f"{self.id}-worker")
        try:
            if self.dialect is not Dialect.UNMUTE:
                await self.send(protocol.SessionCreated(
                    session=dialects.render(self.dialect, self.settings)))
            self._jobs.put(None)  # the initial load of the default directory
            await self._receive()
        finally:
            worker.cancel()
            if self._parting is not None:
                self._parting.cancel()
            if self._closer is None:  # the client left: what it did not read goes
                self._outbox.close(drop=True)
            self._jobs.clear()
            # Shielded: a handler cancelled mid-cleanup (a dropped connection under
            # handler_cancellation, a slow shutdown) still stops the reply and the STT
            # stream; the module keeps the task until it is done.
            teardown = asyncio.ensure_future(self._teardown(worker, writer))
            _teardowns.add(teardown)
            teardown.add_done_callback(_teardowns.discard)
            await asyncio.shield(teardown)

    async def _teardown(self, worker: asyncio.Task[None], writer: asyncio.Task[None]) -> None:
        try:
            await asyncio.gather(worker, return_exceptions=True)
            await self._cancel_reply()
            await self._stop_listening()
            self.conversation.clear()  # now, whoever still holds the session
            if self._closer is not None:
                await asyncio.gather(self._closer, return_exceptions=True)
            # The writer ends by itself once its outbox is closed and the connection
            # over: cancelling it would leave its frame (the session) in a cycle.
            await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT)
        finally:
            if not writer.done():
                writer.cancel()  # a connection that outlived its close
            self._closing = True  # a late end() (the deadline watcher's) does nothing
            # Nothing the session started keeps it (and all it holds) in a cycle
            # until the collector comes round: it goes now.
            self._writer = self._closer = self._parting = None

    async def close(self) -> None:
        try:
            await self.characters.close()
        finally:  # even when the server's shutdown cancels us: no series left behind
            metrics.forget_session(self.id)

    async def send(self, event: protocol.ServerEvent) -> None:
        if self.dialect is Dialect.GA:
            event = protocol.to_ga(event)
        event_type = type(event).__struct_config__.tag
        assert isinstance(event_type, str)
        if self.ws.closed or not dialects.accepts(self.dialect, event_type):
            return
        metrics.WEBSOCKET_EVENTS.labels(event_type, "out").inc()
        if not self._outbox.push(protocol.encode(event)):
            self.end(WSCloseCode.POLICY_VIOLATION, "client not reading", flush=False,
                     why=f"{self._outbox.size} bytes of events wait for it (the limit "
                         f"is {MAX_OUTBOX_BYTES})")
        elif (since := self._sending_since) is not None and (
                time.monotonic() - since > SEND_TIMEOUT):
            self.end(WSCloseCode.POLICY_VIOLATION, "client not reading", flush=False,
                     why=f"a frame has waited {SEND_TIMEOUT:g} s for it to take data")

    def _sandbox_died(self, reason: str) -> None:
        """The sandbox died between requests: tell the client now (it restarts, with
        the same directory, on the session's next request)."""
        notice = asyncio.create_task(self.send_error(ServerSideError(
            "sandbox_crashed",
            f"the characters' sandbox was stopped: {reason}; it restarts on the next "
            "request with the same directory",
        )))
        self._notices.add(notice)
        notice.add_done_callback(self._notices.discard)

    async def send_error(self, error: TroupeError, event_id: str | None = None) -> None:
        await self.send(protocol.Error(error=protocol.ErrorDetails(
            type=error.error_type, code=error.code, message=error.message,
            param=error.param, details=error.details, event_id=event_id,
        )))

    # ── receiving ────────────────────────────────────────────────────────────

    async def _receive(self) -> None:
        limit = self.config.max_message_bytes
        async for message in self.ws:
            self.last_heard = time.monotonic()
            if message.type is WSMsgType.TEXT:
                if len(message.data) > limit:
                    await self._refuse("oversized", TroupeError(
                        "message_too_large",
                        f"a frame of {len(message.data)} bytes exceeds the limit of {limit}; "
                        "split audio into smaller input_audio_buffer.append events",
                    ))
                else:
                    await self._accept(message.data)
            elif message.type is WSMsgType.BINARY:
                await self._refuse("binary", TroupeError(
                    "invalid_event",
                    "binary frames are not accepted: send JSON text events "
                    "(audio goes base64-encoded in input_audio_buffer.append)",
                ))
            elif message.type is WSMsgType.ERROR:
                log.info("%s: connection error: %s", self.id, self.ws.exception())
                return
            if self._closing:
                return  # what the client sends now is read and discarded
            # Frames already buffered are read without a pause: let the others run.
            await asyncio.sleep(0)

    async def _accept(self, data: str) -> None:
        try:
            event = protocol.decode_client(data)
        except protocol.InvalidEvent as exc:
            await self._refuse("invalid", TroupeError("invalid_event", str(exc),
                                                      param=exc.param), exc.event_id)
            return
        event_type = type(event).__struct_config__.tag
        metrics.WEBSOCKET_EVENTS.labels(event_type, "in").inc()
        if self._jobs.offer(event, len(data)):
            return
        if self._jobs.dropped == 1:
            await self.send_error(TroupeError(
                "rate_limited",
                f"this session is {len(self._jobs)} events behind; this {event_type} and "
                "the events after it are dropped until it catches up: wait for answers "
                f"before sending more (after {MAX_DROPPED_EVENTS} dropped, it closes)",
                details={"backlog_events": len(self._jobs), "backlog_bytes": self._jobs.size},
            ), event.event_id)
        elif self._jobs.dropped > MAX_DROPPED_EVENTS:
            self.end(WSCloseCode.POLICY_VIOLATION, "too many events while behind",
                     why=f"{self._jobs.dropped} events dropped in a row")

    async def _refuse(self, kind: str, error: TroupeError, event_id: str | None = None) -> None:
        """A frame that is no event: its error, unless they come too often."""
        metrics.WEBSOCKET_EVENTS.labels(kind, "in").inc()
        if not self._refused.hit(time.monotonic()):
            await self.send_error(error, event_id)
            return
        await self.send_error(TroupeError(
            "rate_limited",
            f"more than {MAX_INVALID_EVENTS} invalid frames within {INVALID_WINDOW:g} s "
            f"(the last: {error.message}); the session closes",
        ), event_id)
        self.end(WSCloseCode.POLICY_VIOLATION, "too many invalid events",
                 why=f"more than {MAX_INVALID_EVENTS} in {INVALID_WINDOW:g} s")

    # ── sending and closing ──────────────────────────────────────────────────

    async def _write(self) -> None:
        """Write the outbox to the socket, in order; ``_sending_since`` says since
        when the frame being written waits for the client to take data (``send``
        gives up on a client past ``SEND_TIMEOUT``). Never cancelled while the
        connection lives: aiohttp's writes wait on one shared drain future, and a
        cancelled wait cancels it, failing the close frame's wait after it."""
        while (frame := await self._outbox.get()) is not None:
            self._sending_since = time.monotonic()
            try:
                await self.ws.send_str(frame)
            except ConnectionError:
                self._outbox.close(drop=True)  # the client is gone; the receive loop ends
                return
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
                # aiohttp's shared drain future was cancelled under us (a close that
                # timed out): the connection is over.
                self._outbox.close(drop=True)
                return
            finally:
                self._sending_since = None

    def end(self, code: int, reason: str, why: str = "", *, flush: bool = True) -> None:
        """Close the session, from a task of its own (the first call only counts):
        the events queued are sent first when ``flush``, else dropped. ``reason``
        goes in the close frame (at most 123 bytes), ``why`` only to the log."""
        if not self._closing:
            self._closing = True
            log.info("%s: closing with %d, %s: %s", self.id, code, reason, why)
            self._closer = asyncio.create_task(self._close(code, reason, flush),
                                               name=f"{self.id}-closer")

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        """Send what is queued (``flush``) or drop it, then the close frame, and
        wait for the client's; past ``CLOSE_TIMEOUT``, reset the connection."""
        self._outbox.close(drop=not flush)  # the writer ends after its current frame
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if flush and self._writer is not None:
                    await asyncio.wait({self._writer})
                await self.ws.close(code=code, message=reason.encode())
            if self.ws.exception() is None and self.ws.close_code not in (
                    None, WSCloseCode.ABNORMAL_CLOSURE):
                return  # the client answered: all it was sent, it read
        except TimeoutError:
            pass
        # The client does not read, so asyncio's transport.close() would keep what it
        # holds until it does; a reset frees it now (aiohttp exposes the socket only).
        log.info("%s: no close handshake within %g s; resetting", self.id, CLOSE_TIMEOUT)
        sock = self.ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)

    # ── the ordered worker ───────────────────────────────────────────────────

    async def _work(self) -> None:
        while True:
            event = await self._jobs.get()
            try:
                await self._handle(event)
            except TroupeError as exc:
                await self.send_error(exc, getattr(event, "event_id", None))
            except Exception:
                log.exception("%s: failed to handle %r", self.id, event)
                await self.send_error(
                    ServerSideError("server_error", "internal error; the server logged it"),
                    getattr(event, "event_id", None),
                )
            finally:
                self.characters.retire()

    async def _handle(self, event: protocol.ClientEventUnion | _Turn | None) -> None:
        match event:
            case _Turn():
                await self._turn(event)
            case None:
                await self._load("default", reply=False)
            case protocol.CharactersReload(directory=directory):
                self._check_reload_rate()
                await self._load(directory, reply=True)
            case protocol.CharactersList():
                await self._list()
            case protocol.SessionUpdate(session=fields):
                await self._update(fields)
            case protocol.ItemCreate(item=item):
                await self._add_item(item)
            case protocol.ResponseCreate():
                await self._start_reply()
            case protocol.ResponseCancel():
                if not await self._cancel_reply():
                    raise TroupeError("invalid_event", "no response is in progress to cancel")
            case protocol.AudioAppend(audio=audio):
                await self._append_audio(audio)
            case protocol.AudioCommit():
                self._refused_audio = False
                await self._commit_audio()
            case protocol.AudioClear():
                self._refused_audio = False
                await self._stop_listening()
                await self.send(protocol.AudioCleared())

    async def _load(self, directory: str, reply: bool) -> None:
        loaded = await self.characters.load(directory)
        await self._end_conversation()
        metrics.CHARACTER_LOAD_PER_SESSION.labels(self.id).inc()
        metrics.SESSION_CHARACTER_COUNT.labels(self.id).set(len(loaded.characters))
        if reply:
            await self.send(_reloaded(loaded))

    async def _list(self) -> None:
        if self.characters.sandbox is None:
            raise TroupeError(
                "no_valid_characters",
                "this session has no characters loaded; send session.characters.reload",
            )
        characters = await self._sandbox_call(self.characters.sandbox.list(),
                                              "listing the characters")
        await self.send(protocol.CharactersListed(
            directory=self.characters.directory,
            character_count=len(characters),
            characters=[_summary(c) for c in characters],
        ))

    async def _update(self, fields: protocol.SessionFields) -> None:
        voice = self.settings.requested_voice(fields)
        character = None
        if voice is not None:
            character = self.characters.find(voice)
            if character is None:
                names = ", ".join(c.name for c in self.characters.characters) or "none loaded"
                raise TroupeError(
                    "character_not_found",
                    f"no character {voice!r} in this session's set ({names}); "
                    "pick one from session.characters.list",
                    param="session.voice",
                )
        detecting = self.settings.turn_detection is not None
        self.settings.apply(fields)
        if (self.settings.turn_detection is not None) != detecting:
            await self._stop_listening()  # the next audio opens a stream in the new mode
        if character is not None and character.name != self.settings.voice:
            await self._end_conversation()
            assert self.characters.sandbox is not None
            self.system_prompt = await self._sandbox_call(
                self.characters.sandbox.system_prompt(character.name),
                f"getting the instructions of {character.name}",
            )
            self.settings.voice = character.name
            await self.llm.warm(self.system_prompt)
        rendered = dialects.render(self.dialect, self.settings)
        await self.send(protocol.SessionUpdated(session=rendered))
        if self.dialect is Dialect.UNMUTE and not self._greeted:
            # Unmute's character speaks first, once it knows who it is.
            self._greeted = True
            await self._start_reply()

    async def _add_item(self, item: protocol.Item) -> None:
        try:
            text = replies.user_text(item)
        except ValueError as exc:
            raise TroupeError("invalid_event", str(exc), param="item") from None
        self.conversation.add_user_text(text)
        await self.send(protocol.ItemCreated(previous_item_id=None, item=protocol.MessageItem(
            id=item.id or protocol.new_id("item"), role="user",
            content=[{"type": "input_text", "text": text}],
        )))

    async def _append_audio(self, audio: str) -> None:
        if self.stt is None:
            # Said once per buffer, not for each of a microphone's 12 appends a second.
            if self._refused_audio:
                return
            self._refused_audio = True
            raise ServerSideError(
                "backend_unavailable",
                "no speech-to-text is configured; start the server with --stt, "
                "or send text with conversation.item.create (further audio is dropped "
                "until input_audio_buffer.commit or clear)",
            )
        if time.monotonic() < self._stt_retry_at:
            return  # the failure was reported; audio is dropped until the retry
        opus = self._opus_decoder()
        if self._listening is not None and self._listening.audio_format != (
                "opus" if opus is not None else "pcm16"):
            await self._stop_listening()  # the format changed: a new stream
        try:
            if self._listening is None:
                turns = TurnTaking(
                    pause_hold=self.stt.pause_hold,
                    speech_starts_turn=self.stt.speech_starts_turn,
                    nudge_after=self.config.nudge_after or None,
                ) if self.settings.turn_detection is not None else None
                self._listening = await Listening.open(self.stt, self.send, turns,
                                                       self._on_turn, opus)
                if turns is not None and self._reply is not None and not self._reply.done():
                    turns.reply_started()
            await self._listening.append(audio)
        except BackendUnavailable as exc:
            # Said once; the next audio after STT_RETRY seconds opens a new stream.
            await self._stop_listening()
            self._stt_retry_at = time.monotonic() + STT_RETRY
            raise ServerSideError(exc.code, f"{exc.message} (audio is dropped for "
                                            f"{STT_RETRY:g} s, then a new stream opens)") from None

    def _opus_decoder(self) -> OpusDecoder | None:
        """The session's one Ogg Opus input stream, decoded across utterances."""
        if self.settings.input_audio_format != "opus":
            return None
        if self._opus_in is None:
            self._opus_in = OpusDecoder()
        return self._opus_in

    async def _on_turn(self, action: Action, at: float) -> None:
        """From the STT reader, before the words that caused it are sent on. The start
        of speech and a barge-in are acted on at once: the reply stops now, and the
        interrupting words follow ``speech_started`` (they belong to the person's
        turn, not to the reply). Ending a turn and a nudge change the conversation,
        so they wait their turn behind the client's events."""
        listening = self._listening
        if listening is None:
            return
        match action:
            case Action.SPEECH_STARTED:
                await self.send(protocol.SpeechStarted(item_id=listening.item_id,
                                                       audio_start_ms=int(at * 1000)))
            case Action.INTERRUPT:
                stopping = self._stop_reply()  # at once: no more text, audio or model
                await self.send(protocol.SpeechStarted(item_id=listening.item_id,
                                                       audio_start_ms=int(at * 1000)))
                await self.send(protocol.InterruptedByVad())
                if stopping is not None:
                    await asyncio.wait({stopping})  # its response.done goes out
            case _:
                self._jobs.put(_Turn(action, at, listening))

    async def _turn(self, turn: _Turn) -> None:
        listening = self._listening
        if listening is None or listening is not turn.listening or listening.turns is None:
            return  # the buffer was cleared, or the stream replaced, meanwhile
        if listening.turns.state is not State.REPLYING:
            return  # the person went on speaking: the next end of turn has it all
        at_ms = int(turn.at * 1000)
        match turn.action:
            case Action.END_TURN:
                await self.send(protocol.SpeechStopped(item_id=listening.item_id,
                                                       audio_end_ms=at_ms))
                utterance = listening.take()
                if utterance.transcript:
                    await self._cancel_reply()  # the person's new turn comes first
                    await self._commit_utterance(utterance)
                    await self._start_reply_or_listen(listening.turns)
                else:  # a noise, not words: nothing to answer
                    listening.turns.reply_ended()
            case Action.NUDGE:
                if self._reply is None or self._reply.done():
                    self.conversation.add_user_text(SILENCE_MARKER)
                    try:
                        await self._start_reply_or_listen(listening.turns)
                    except TroupeError as exc:  # nobody asked: no error event for it
                        log.info("%s: no nudge: %s", self.id, exc.message)

    async def _start_reply_or_listen(self, turns: TurnTaking) -> None:
        """Start the reply the turn-taking expects; if none starts, it listens."""
        try:
            started = await self._start_reply(turns)
        except BaseException:
            turns.reply_ended()
            raise
        if not started:
            turns.reply_ended()

    async def _commit_audio(self) -> None:
        listening = self._listening
        if listening is None:
            raise TroupeError("invalid_event", "the input audio buffer is empty; "
                              "send input_audio_buffer.append first")
        if listening.turns is None:  # push-to-talk: one stream per utterance
            self._listening = None
            try:
                utterance = await listening.commit()
            finally:
                await listening.close()
        else:
            utterance = await listening.commit()
        await self._commit_utterance(utterance)

    async def _commit_utterance(self, utterance: Utterance) -> None:
        item_id, transcript = utterance.item_id, utterance.transcript
        await self.send(protocol.AudioCommitted(item_id=item_id))
        await self.send(protocol.ItemCreated(previous_item_id=None, item=protocol.MessageItem(
            id=item_id, role="user",
            content=[{"type": "input_audio", "transcript": transcript}],
        )))
        await self.send(protocol.TranscriptionCompleted(
            item_id=item_id, transcript=transcript,
            usage={"type": "duration", "seconds": utterance.seconds}))
        if transcript:
            self.conversation.add_user_text(transcript)

    async def _stop_listening(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            await listening.close()

    async def _start_reply(self, turns: TurnTaking | None = None) -> bool:
        """Start a reply of the selected character. For ``turns``, only while it
        still expects one (the person may have gone on speaking meanwhile)."""
        if self._reply is not None and not self._reply.done():
            raise TroupeError(
                "invalid_event",
                "a response is already in progress; wait for response.done or send "
                "response.cancel",
            )
        sandbox = self.characters.sandbox
        character = self._speaker()
        if sandbox is None or character is None:
            raise TroupeError(
                "no_valid_characters",
                "this session has no character to answer; send session.characters.reload",
            )
        if self.system_prompt is None or self.settings.voice != character:
            self.system_prompt = await self._sandbox_call(
                sandbox.system_prompt(character), f"getting the instructions of {character}")
            self.settings.voice = character
        if turns is not None and turns.state is not State.REPLYING:
            return False
        speaking = None
        if self.tts is not None and "audio" in self.settings.modalities:
            info = self.characters.find(character)
            source = info.voice_source if info is not None else {}
            speaking = replies.Speaking(self.tts, self.tts.voice_for(source),
                                        self._audio_out(), self.config.audio_lead)
        # The reply's coroutine is made inside the task: a task cancelled before it
        # starts would otherwise leave it never awaited.
        self._reply = asyncio.create_task(self._reply_and_part(functools.partial(
            replies.run_reply, send=self.send, send_error=self.send_error, llm=self.llm,
            sandbox=sandbox,
            character=character, system_prompt=self.system_prompt,
            conversation=self.conversation, temperature=self.settings.temperature,
            speaking=speaking, unmute=self.dialect is Dialect.UNMUTE,
        ), speaking), name=f"{self.id}-reply")
        self._reply.add_done_callback(self._reply_ended)
        if self._listening is not None and self._listening.turns is not None:
            self._listening.turns.reply_started()
        return True

    async def _reply_and_part(self, reply: Callable[[], Coroutine[Any, Any, str | None]],
                              speaking: replies.Speaking | None) -> None:
        """One reply; a character that ends it with ``Bye!`` closes the session, as
        in Unmute (code 1000: a normal end), once its audio has played."""
        text = await reply()
        if text is not None and text.rstrip().endswith(GOODBYE):
            log.info("%s: the character said goodbye; closing", self.id)
            self._parting = asyncio.create_task(self._part(speaking.lead if speaking else 0))

    async def _part(self, delay: float) -> None:
        """Close once the client played what it had queued (in a task of its own,
        which the reply's end does not cancel)."""
        await asyncio.sleep(delay)
        self.end(WSCloseCode.OK, "the character said goodbye")

    def _audio_out(self) -> replies.AudioOut:
        """pcm16 per reply, or the session's one continuous Ogg Opus stream."""
        if self.settings.output_audio_format != "opus":
            return replies.Pcm16Out()
        if self._opus_out is None:
            self._opus_out = replies.OpusOut()
        return self._opus_out

    def _reply_ended(self, reply: asyncio.Task[None]) -> None:
        if self._listening is not None and self._listening.turns is not None:
            self._listening.turns.reply_ended()
        if not reply.cancelled() and (failure := reply.exception()) is not None:
            log.error("%s: a reply failed", self.id, exc_info=failure)

    def _speaker(self) -> str | None:
        """The selected character, else the first good one of the set."""
        if self.settings.voice is not None:
            return self.settings.voice
        characters = self.characters.characters
        good = [c for c in characters if c.good is not False] or characters
        return good[0].name if good else None

    async def _cancel_reply(self) -> bool:
        """Cancel the reply in progress and wait for its end (it sends its own
        response.done). If we are cancelled while waiting, the reply is not
        cancelled a second time in the middle of its clean-up."""
        reply = self._stop_reply()
        if reply is None:
            return False
        await asyncio.wait({reply})
        return True

    def _stop_reply(self) -> asyncio.Task[None] | None:
        """Cancel the reply in progress, if any; returns it to wait on."""
        reply, self._reply = self._reply, None
        if reply is None or reply.done():
            return None
        reply.cancel()
        return reply

    async def _end_conversation(self) -> None:
        """A new set or another character: the reply stops, the history goes."""
        await self._cancel_reply()
        self.conversation.clear()
        self.system_prompt = None
        self.settings.voice = None

    async def _sandbox_call(self, call: Awaitable[T], doing: str) -> T:
        try:
            return await call
        except SandboxError as exc:
            raise from_sandbox(exc, doing) from None

    def _check_reload_rate(self) -> None:
        now, limit = time.monotonic(), self.config.max_reloads_per_minute
        while self._reloads and now - self._reloads[0] >= 60:
            self._reloads.popleft()
        if len(self._reloads) >= limit:
            wait = 60 - (now - self._reloads[0])
            raise TroupeError(
                "rate_limited",
                f"more than {limit} reloads in a minute; try again in {wait:.0f} s",
                details={"retry_after_s": round(wait, 1)},
            )
        self._reloads.append(now)


def _summary(character: CharacterInfo) -> protocol.CharacterSummary:
    return protocol.CharacterSummary(character.name, character.good, character.comment)


def _reloaded(loaded: Loaded) -> protocol.CharactersReloaded:
    return protocol.CharactersReloaded(
        directory=loaded.directory,
        loaded_count=len(loaded.characters),
        error_count=len(loaded.errors),
        total_files=loaded.total_files,
        characters=[_summary(c) for c in loaded.characters],
        errors=[protocol.LoadError(e.file, e.error_type, e.message) for e in loaded.errors],
        duration_ms=loaded.duration_ms,
    )


def _weakly(method: Callable[[str], None]) -> Callable[[str], None]:
    """``method``, without keeping its object alive (a cycle only the collector
    would break, holding the session's connection meanwhile)."""
    ref = weakref.WeakMethod(method)

    def call(reason: str) -> None:
        if (bound := ref()) is not None:
            bound(reason)
    return call


@dataclass(frozen=True)
class _Turn:
    """A turn-taking decision, queued behind the client's events."""

    action: Action
    at: float
    listening: Listening
    """The stream that heard it: a turn from a stream since replaced is dropped."""

