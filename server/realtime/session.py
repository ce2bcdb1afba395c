"""One WebSocket session: the client's events in, the dialogue's commands carried out.

    Connection (frames, bounded both ways) ─▶ jobs ─▶ worker ─▶ Dialogue (decides)
    Hearing (STT reader): speech, barge-in ─▶ Dialogue at once; end of turn, nudge ─▶ jobs
    Dialogue's commands ─▶ Executor (executor.py) ─▶ Speaker (replies), Hearing (audio),
                           CharacterSet (sandbox), send ─▶ Edge (the dialect) ─▶ Connection
    close: cancel the worker, stop the reply and the STT stream, kill the session's
           sandboxes, drop its metric series

A thin shell: what to do is the ``Dialogue``'s (``server/conversation/dialogue.py``);
the session runs one job at a time (each client event answered exactly once, in
order) and its ``Executor`` carries out the commands the dialogue returns.
The first job loads the default directory, so a client's first
``session.characters.list`` already sees its own characters. The limits on what a
client may queue or leave unread are the ``Connection``'s (``connection.py``); their
values are this module's constants (README "Limits").
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import msgspec
from aiohttp import WSCloseCode, web

from sandbox import Pool

from .. import metrics
from ..backends.llm import LLM
from ..backends.speech import SpeechToText, TextToSpeech
from ..config import Config
from ..conversation import events
from ..conversation.characters import CharacterSet
from ..conversation.dialogue import Dialogue
from ..conversation.hearing import Hearing
from ..conversation.listening import Listening
from ..conversation.settings import SessionSettings
from ..conversation.speaking import Speaker
from ..conversation.turns import Action
from ..errors import ServerSideError, TroupeError
from .connection import Connection, Limits
from .dialects import Dialect, Edge
from .executor import Executor
from .limits import ReloadLimit
from .resume import Claimed, Resumer, Snapshot

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
        stt: SpeechToText | None = None, *, resumer: Resumer | None = None,
        identity: str | None = None, claimed: Claimed | None = None,
    ) -> None:
        self.id = events.new_id("sess")
        self.ws = ws
        self.dialect = dialect
        self.config = config
        self.connection: Connection[_Turn | None] = Connection(ws, Limits(
            config.max_message_bytes, MAX_BACKLOG_EVENTS, MAX_BACKLOG_BYTES,
            MAX_DROPPED_EVENTS, MAX_OUTBOX_BYTES, SEND_TIMEOUT, MAX_INVALID_EVENTS,
            INVALID_WINDOW, CLOSE_TIMEOUT), self.id, log)
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
                               config.nudge_after or None, drafts=config.preemptive_generation,
                               pause_hold=config.pause_hold)
        self.speaker = Speaker(llm, tts, send, lead=config.audio_lead, label=self.id,
                               drafts=config.preemptive_generation)
        self._reloads = ReloadLimit(config.max_reloads_per_minute)
        self.started = time.monotonic()
        # Resuming (README "Resume"): the token shown to the client, what it carries on.
        self.resumer = resumer or Resumer(0)
        self.identity = identity
        self._token: str | None = None
        self._restoring: str | None = None
        """The directory the first job loads in place of the default one."""
        self._taken_over = False
        self._going_away = False
        self._kept = False
        self._ended = asyncio.Event()
        if claimed is not None:
            self._carry_on(claimed)
        self._executor = Executor(self.id, self.dialogue, self.characters, self.speaker,
                                  self.hearing, llm, send, _weakly(self._say_goodbye))

    @property
    def settings(self) -> SessionSettings:
        return self.dialogue.settings

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    @property
    def last_heard(self) -> float:
        """When the client last sent a frame (pings do not count)."""
        return self.connection.last_heard

    @last_heard.setter
    def last_heard(self, when: float) -> None:
        self.connection.last_heard = when

    def _carry_on(self, claimed: Claimed) -> None:
        """Restore a conversation whose connection ended: with its set still loaded
        when it was kept here, else its directory loads first."""
        snapshot = claimed.snapshot
        settings = msgspec.convert(snapshot.settings, SessionSettings)
        settings.session_id = self.id
        self.dialogue.restore(settings, snapshot.history, greeted=snapshot.greeted,
                              resumed_from=snapshot.session_id)
        if isinstance(claimed.characters, CharacterSet):
            self.characters = claimed.characters
            self.characters.adopt(f"session {self.id}", _weakly(self._sandbox_died))
            self.dialogue.characters = self.characters.characters
        else:
            self._restoring = snapshot.directory or "default"
        log.info("%s: carries on %s", self.id, snapshot.session_id)

    def snapshot(self) -> Snapshot:
        """What another connection needs to carry the conversation on."""
        return Snapshot(
            session_id=self.id, identity=self.identity, dialect=self.dialect.value,
            directory=self.characters.requested or self._restoring,
            settings=msgspec.to_builtins(self.settings),
            history=list(self.dialogue.history.messages), greeted=self.dialogue.greeted)

    async def take_over(self) -> None:
        """Its token was claimed by a new connection: this one closes (4000) and its
        conversation is handed over; returns once the session ended."""
        if not self.ws.closed and not self.connection.ended_by_us:
            self._taken_over = True
            self.end(4000, "resumed on another connection")
        await self._ended.wait()  # (a connection already closing decides for itself)

    async def go_away(self, reason: str) -> None:
        """The server shuts down: close with 1001, the conversation kept for resuming
        (with ``--state-url``, on another replica)."""
        self._going_away = True
        await self.ws.close(code=WSCloseCode.GOING_AWAY, message=reason.encode())

    async def run(self) -> None:
        """Serve the connection until the client leaves or the session closes it."""
        await self.connection.open()
        worker = asyncio.create_task(self._work(), name=f"{self.id}-worker")
        try:
            self._token = self.dialogue.resume_token = await self.resumer.issue(self)
            await self._executor.execute(self.dialogue.start())
            self.connection.jobs.put(None)  # the initial load of the default directory
            await self.connection.receive()
        finally:
            worker.cancel()
            self.speaker.stay()
            self.connection.stop()
            # Shielded: a handler cancelled mid-cleanup (a dropped connection under
            # handler_cancellation, a slow shutdown) still stops the reply and the STT
            # stream; the module keeps the task until it is done.
            teardown = asyncio.ensure_future(self._teardown(worker))
            _teardowns.add(teardown)
            teardown.add_done_callback(_teardowns.discard)
            await asyncio.shield(teardown)

    async def _teardown(self, worker: asyncio.Task[None]) -> None:
        try:
            await asyncio.gather(worker, return_exceptions=True)
            self.speaker.drop_draft()
            await self.speaker.cancel()
            await self.hearing.stop()
            await self._leave()
            self.dialogue.history.clear()  # now, whoever still holds the session
        finally:
            await self.connection.finish()
            self._ended.set()

    async def _leave(self) -> None:
        """Keep the conversation for resuming when the connection was lost (no close,
        or 1001: going away, the server draining) or taken over; not when either side
        ended it on purpose."""
        if self._token is None:
            return
        code = self.ws.close_code
        keep = self._taken_over or self._going_away or (
            not self.connection.ended_by_us and code not in (
                WSCloseCode.OK, WSCloseCode.POLICY_VIOLATION, 1005))
        token, self._token = self._token, None
        if await self.resumer.end(token, self, keep=keep, characters=self.characters):
            self._kept = True

    def end(self, code: int, reason: str, why: str = "", *, flush: bool = True) -> None:
        """Close the session (``Connection.end``)."""
        self.connection.end(code, reason, why, flush=flush)

    async def close(self) -> None:
        try:
            if not self._kept:  # else the resumer holds the set for the window
                await self.characters.close()
        finally:  # even when the server's shutdown cancels us: no series left behind
            metrics.forget_session(self.id)

    async def send(self, event: events.Outgoing) -> None:
        for shown in self._edge.out(event):
            await self.connection.send(shown)

    def _say_goodbye(self) -> None:
        self.end(WSCloseCode.OK, "the character said goodbye")

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

    # ── the ordered worker ───────────────────────────────────────────────────

    async def _work(self) -> None:
        while True:
            event = await self.connection.jobs.get()
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
            case None if self._restoring is not None:
                await self._executor.execute(self.dialogue.load(
                    self._restoring, answer=False, restoring=True))
            case None if self.characters.sandbox is None:
                await self._executor.execute(self.dialogue.load("default", answer=False))
            case None:
                pass  # a resumed conversation, its set still loaded
            case _Turn(action=action, listening=listening):
                await self._executor.turn(action, event.at, listening)
            case events.CharactersReload() if (
                    wait := self._reloads.take(time.monotonic())) is not None:
                limit = self._reloads.per_minute
                raise TroupeError(
                    "rate_limited",
                    f"more than {limit} reloads in a minute; try again in {wait:.0f} s",
                    details={"retry_after_s": round(wait, 1)},
                )
            case _:
                await self._executor.execute(self.dialogue.receive(event))

    async def _on_turn(self, action: Action, at: float) -> None:
        """From the STT reader, before the words that caused it are sent on. The start
        of speech and a barge-in are acted on at once; ending a turn and a nudge
        change the conversation, so they wait their turn behind the client's events."""
        listening = self.hearing.listening
        if listening is None:
            return
        if action in (Action.SPEECH_STARTED, Action.INTERRUPT):
            await self._executor.execute(self.dialogue.heard(action, at, listening.item_id))
        else:
            self.connection.jobs.put(_Turn(action, at, listening))


def _weakly(method: Callable[P, None]) -> Callable[P, None]:
    """``method``, without keeping its object alive (a cycle only the collector
    would break, holding the session's connection meanwhile)."""
    ref = weakref.WeakMethod(method)

    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        if (bound := ref()) is not None:
            bound(*args, **kwargs)
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
