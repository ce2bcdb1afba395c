"""One WebSocket connection's lifecycle.

    ws frames ─▶ receive loop ─ size / binary / JSON / schema checks ─▶ error event
                      │ valid event
                      ▼
                 backlog ─▶ worker: session.update, characters.list/reload, audio, …
                                  (one at a time, each answered exactly once)
    worker, reply, STT reader ─▶ Edge (the dialect) ─▶ outbox ─▶ writer ─▶ ws frames
    close: cancel the worker, kill the session's sandboxes, drop its metric series

A thin shell: what to do is the ``Dialogue``'s (``server/conversation/dialogue.py``);
the session feeds it the client's events and the turns the ``Hearing`` reports, and
executes its commands with the ``Speaker``, the ``Hearing`` and the ``CharacterSet``.
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
import contextlib
import logging
import socket
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web

from sandbox import Pool, SandboxError

from .. import metrics
from ..backends.llm import LLM
from ..backends.speech import SpeechToText, TextToSpeech
from ..config import Config
from ..conversation import dialogue as d
from ..conversation import events
from ..conversation.characters import CharacterSet
from ..conversation.dialogue import Dialogue, Reply
from ..conversation.hearing import Hearing
from ..conversation.listening import Listening
from ..conversation.settings import SessionSettings
from ..conversation.speaking import Speaker
from ..conversation.turns import Action
from ..errors import ServerSideError, TroupeError, from_sandbox
from . import protocol
from .dialects import Dialect, Edge
from .limits import Backlog, Outbox, ReloadLimit, SlidingWindow

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

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
        self.id = events.new_id("sess")
        self.ws = ws
        self.dialect = dialect
        self.config = config
        self._edge = Edge(dialect)
        self.dialogue = Dialogue(SessionSettings(
            self.id, model, input_audio_format=dialect.audio_format,
            output_audio_format=dialect.audio_format), greets=dialect.greets)
        self.characters = CharacterSet(pool, config, f"session {self.id}",
                                       on_sandbox_death=_weakly(self._sandbox_died))
        self._notices: set[asyncio.Task[None]] = set()
        self.llm = llm
        # Weakly: the session is freed by reference counting as it ends, not left in a
        # cycle with its parts until the collector comes round.
        send = _weakly_async(self.send)
        self.hearing = Hearing(stt, send, _weakly_async(self._on_turn),
                               config.nudge_after or None)
        self.speaker = Speaker(llm, tts, send, lead=config.audio_lead, label=self.id)
        self.started = time.monotonic()
        self.last_heard = self.started  # the client's last frame (pings do not count)
        self._jobs: Backlog[events.ClientEventUnion | _Turn | None] = Backlog(
            MAX_BACKLOG_EVENTS, MAX_BACKLOG_BYTES)
        self._outbox = Outbox(MAX_OUTBOX_BYTES)
        self._writer: asyncio.Task[None] | None = None
        self._sending_since: float | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False
        self._refused = SlidingWindow(MAX_INVALID_EVENTS, INVALID_WINDOW)
        self._reloads = ReloadLimit(config.max_reloads_per_minute)

    @property
    def settings(self) -> SessionSettings:
        return self.dialogue.settings

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> None:
        """Serve the connection until the client leaves or the session closes it."""
        writer = self._writer = asyncio.create_task(self._write(), name=f"{self.id}-writer")
        worker = asyncio.create_task(self._work(), name=f"{self.id}-worker")
        try:
            await self._execute(self.dialogue.start())
            self._jobs.put(None)  # the initial load of the default directory
            await self._receive()
        finally:
            worker.cancel()
            self.speaker.stay()
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
            await self.speaker.cancel()
            await self.hearing.stop()
            self.dialogue.history.clear()  # now, whoever still holds the session
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
            self._writer = self._closer = None

    async def close(self) -> None:
        try:
            await self.characters.close()
        finally:  # even when the server's shutdown cancels us: no series left behind
            metrics.forget_session(self.id)

    async def send(self, event: events.Outgoing) -> None:
        for shown in self._edge.out(event):
            if self.ws.closed:
                return
            event_type = protocol.tag(type(shown))
            metrics.WEBSOCKET_EVENTS.labels(event_type, "out").inc()
            if not self._outbox.push(protocol.encode(shown)):
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
        await self.send(events.error(error, event_id))

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

    async def _handle(self, event: events.ClientEventUnion | _Turn | None) -> None:
        match event:
            case None:
                await self._execute(self.dialogue.load("default", answer=False))
            case _Turn(action=action, listening=listening):
                await self._turn(action, event.at, listening)
            case events.CharactersReload() if (
                    wait := self._reloads.take(time.monotonic())) is not None:
                limit = self._reloads.per_minute
                raise TroupeError(
                    "rate_limited",
                    f"more than {limit} reloads in a minute; try again in {wait:.0f} s",
                    details={"retry_after_s": round(wait, 1)},
                )
            case _:
                await self._execute(self.dialogue.receive(event))

    async def _on_turn(self, action: Action, at: float) -> None:
        """From the STT reader, before the words that caused it are sent on. The start
        of speech and a barge-in are acted on at once; ending a turn and a nudge
        change the conversation, so they wait their turn behind the client's events."""
        listening = self.hearing.listening
        if listening is None:
            return
        if action in (Action.SPEECH_STARTED, Action.INTERRUPT):
            await self._execute(self.dialogue.heard(action, at, listening.item_id))
        else:
            self._jobs.put(_Turn(action, at, listening))

    async def _turn(self, action: Action, at: float, listening: Listening) -> None:
        if not self.hearing.holds(listening):
            return
        try:
            if action is Action.END_TURN:
                await self._execute(self.dialogue.end_of_turn(listening.take(), at))
                return
            try:
                await self._execute(self.dialogue.nudge())
            except TroupeError as exc:  # nobody asked: no error event for it
                log.info("%s: no nudge: %s", self.id, exc.message)
                self.hearing.reply_ended()
        except BaseException:
            self.hearing.reply_ended()  # no reply: the turn-taking listens again
            raise

    # ── executing the dialogue's commands ────────────────────────────────────

    async def _execute(self, steps: d.Steps) -> None:
        """Run ``steps``, each command's result sent back in."""
        result: Any = None
        while True:
            try:
                command = steps.send(result)
            except StopIteration:
                return
            result = await self._do(command)

    async def _do(self, command: d.Command) -> Any:
        sandbox = self.characters.sandbox
        match command:
            case d.Send(event=event):
                await self.send(event)
            case d.Load(directory=directory):
                loaded = await self.characters.load(directory)
                metrics.CHARACTER_LOAD_PER_SESSION.labels(self.id).inc()
                metrics.SESSION_CHARACTER_COUNT.labels(self.id).set(len(loaded.characters))
                return loaded
            case d.ListCharacters() if sandbox is not None:
                return self.characters.listed(
                    await _sandbox_call(sandbox.list(), "listing the characters"))
            case d.Prompt(character=name) if sandbox is not None:
                return await _sandbox_call(sandbox.system_prompt(name),
                                           f"getting the instructions of {name}")
            case d.Warm(system_prompt=prompt):
                await self.llm.warm(prompt)
            case d.StartReply(reply=reply) if sandbox is not None:
                if reply.turn and not self.hearing.expects_reply:
                    return False  # the person went on speaking meanwhile
                self.speaker.start(reply, sandbox, self.settings.output_audio_format,
                                   self._finished, self._reply_ended)
                self.hearing.reply_started()
                return True
            case d.CancelReply():
                return await self.speaker.cancel()
            case d.StopReply():
                return self.speaker.stop()
            case d.AwaitReply(handle=asyncio.Task() as stopping):
                await asyncio.wait({stopping})
            case d.Part():
                log.info("%s: the character said goodbye; closing", self.id)
                self.speaker.part(lambda: self.end(WSCloseCode.OK, "the character said goodbye"))
            case d.Hear(audio=audio):
                await self.hearing.append(audio, self.settings, self.speaker.active)
            case d.Commit():
                return await self.hearing.commit()
            case d.ClearAudio():
                await self.hearing.clear()
            case d.StopListening():
                await self.hearing.stop()
            case d.Listen():
                self.hearing.reply_ended()
            case _:
                raise AssertionError(f"no sandbox for {command}")  # loaded before asked
        return None

    async def _finished(self, text: str | None) -> None:
        await self._execute(self.dialogue.finished(text))

    def _reply_ended(self, reply: Reply, task: asyncio.Task[None]) -> None:
        self.dialogue.reply_ended(reply.number)
        self.hearing.reply_ended()
        if not task.cancelled() and (failure := task.exception()) is not None:
            log.error("%s: a reply failed", self.id, exc_info=failure)


async def _sandbox_call(call: Awaitable[T], doing: str) -> T:
    try:
        return await call
    except SandboxError as exc:
        raise from_sandbox(exc, doing) from None


def _weakly(method: Callable[[str], None]) -> Callable[[str], None]:
    """``method``, without keeping its object alive (a cycle only the collector
    would break, holding the session's connection meanwhile)."""
    ref = weakref.WeakMethod(method)

    def call(reason: str) -> None:
        if (bound := ref()) is not None:
            bound(reason)
    return call


def _weakly_async(method: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """``_weakly``, for a coroutine method."""
    ref = weakref.WeakMethod(method)

    async def call(*args: P.args, **kwargs: P.kwargs) -> None:
        if (bound := ref()) is not None:
            await bound(*args, **kwargs)
    return call


@dataclass(frozen=True)
class _Turn:
    """A turn-taking decision, queued behind the client's events."""

    action: Action
    at: float
    listening: Listening
    """The stream that heard it: a turn from a stream since replaced is dropped."""
