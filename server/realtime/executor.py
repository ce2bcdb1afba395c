"""The dialogue's commands carried out on one session's parts.

    Dialogue steps ─▶ Executor.execute ─▶ each command ─▶ its part; its result sent back in
      Send ─▶ the session's send (its Edge, its Connection)
      Load, ListCharacters, Prompt ─▶ the CharacterSet and its sandbox     Warm ─▶ the LLM
      StartReply, DraftReply, DropDraft, CancelReply, StopReply, AwaitReply, Part ─▶ Speaker
      Hear, Commit, ClearAudio, StopListening, Listen ─▶ Hearing
    turn(action) ─▶ a queued end of turn, nudge or draft, once it still holds

What to do is the ``Dialogue``'s; the ``Session`` (``session.py``) owns the connection,
the order of the jobs and the lifetime of the parts, and hands each job here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sandbox import Sandbox, SandboxError

from .. import metrics
from ..backends.llm import LLM
from ..conversation import commands as do
from ..conversation import events
from ..conversation.characters import CharacterSet
from ..conversation.commands import Reply
from ..conversation.dialogue import Dialogue
from ..conversation.hearing import Hearing
from ..conversation.listening import Listening
from ..conversation.speaking import Speaker
from ..conversation.turns import Action, State
from ..errors import TroupeError, from_sandbox

log = logging.getLogger(__name__)
T = TypeVar("T")

Send = Callable[[events.Outgoing], Awaitable[None]]


class Executor:
    def __init__(self, label: str, dialogue: Dialogue, characters: CharacterSet,
                 speaker: Speaker, hearing: Hearing, llm: LLM, send: Send,
                 part: Callable[[], None]) -> None:
        self.label = label
        self.dialogue = dialogue
        self.characters = characters
        self.speaker = speaker
        self.hearing = hearing
        self.llm = llm
        self._send = send
        self._part = part
        """Close the session normally: the character said goodbye."""

    async def execute(self, steps: do.Steps) -> None:
        """Run ``steps``, each command's result sent back in."""
        result: Any = None
        while True:
            try:
                command = steps.send(result)
            except StopIteration:
                return
            result = await self._do(command)

    async def turn(self, action: Action, at: float, listening: Listening) -> None:
        """A turn-taking decision queued behind the client's events: the end of the
        person's turn, a nudge, or a draft (``PAUSED``, ``GOES_ON``)."""
        if action in (Action.PAUSED, Action.GOES_ON):
            await self._draft(action, listening)
            return
        if not self.hearing.holds(listening):
            return
        nudge = action is Action.NUDGE
        try:
            await self.execute(self.dialogue.nudge() if nudge
                               else self.dialogue.end_of_turn(listening.take(), at))
        except BaseException as exc:
            self.hearing.reply_ended()  # no reply: the turn-taking listens again
            if not (nudge and isinstance(exc, TroupeError)):
                raise
            log.info("%s: no nudge: %s", self.label, exc.message)  # nobody asked: no error

    async def _draft(self, action: Action, listening: Listening) -> None:
        """Preemptive generation: a pause that may end the turn drafts the reply; the
        person going on drops it. A failure here is the turn's to report, if it ends."""
        if not self.hearing.holds(listening, state=State.HEARING):
            return
        try:
            await self.execute(self.dialogue.paused(listening.transcript)
                               if action is Action.PAUSED else self.dialogue.went_on())
        except TroupeError as exc:
            log.info("%s: no draft: %s", self.label, exc.message)

    async def _do(self, command: do.Command) -> Any:
        settings = self.dialogue.settings
        match command:
            case do.Send(event=event):
                await self._send(event)
            case do.Load(directory=directory):
                loaded = await self.characters.load(directory)
                metrics.CHARACTER_LOAD_PER_SESSION.labels(self.label).inc()
                metrics.SESSION_CHARACTER_COUNT.labels(self.label).set(len(loaded.characters))
                return loaded
            case do.ListCharacters():
                return self.characters.listed(
                    await _sandbox_call(self._sandbox().list(), "listing the characters"))
            case do.Prompt(character=name):
                return await _sandbox_call(self._sandbox().system_prompt(name),
                                           f"getting the instructions of {name}")
            case do.Warm(system_prompt=prompt):
                await self.llm.warm(prompt)
            case do.StartReply(reply=reply):
                if reply.turn and not self.hearing.expects_reply:
                    return False  # the person went on speaking meanwhile
                self.speaker.start(reply, self._sandbox(), settings.output_audio_format,
                                   self._finished, self._reply_ended)
                self.hearing.reply_started()
                return True
            case do.DraftReply(reply=reply):
                self.speaker.draft(reply, self._sandbox())
            case do.DropDraft():
                self.speaker.drop_draft()
            case do.CancelReply():
                return await self.speaker.cancel()
            case do.StopReply():
                return self.speaker.stop()
            case do.AwaitReply(handle=asyncio.Task() as stopping):
                await asyncio.wait({stopping})
            case do.Part():
                log.info("%s: the character said goodbye; closing", self.label)
                self.speaker.part(self._part)
            case do.Hear(audio=audio):
                await self.hearing.append(audio, settings, self.speaker.active)
            case do.Commit():
                return await self.hearing.commit()
            case do.ClearAudio():
                await self.hearing.clear()
            case do.StopListening():
                await self.hearing.stop()
            case do.Listen():
                self.hearing.reply_ended()
        return None

    def _sandbox(self) -> Sandbox:
        """The set's sandbox (the dialogue asks for it once a set is loaded)."""
        if self.characters.sandbox is None:
            raise TroupeError("no_valid_characters", "this session has no characters "
                              "loaded; send session.characters.reload")
        return self.characters.sandbox

    async def _finished(self, text: str | None) -> None:
        await self.execute(self.dialogue.finished(text))

    def _reply_ended(self, reply: Reply, task: asyncio.Task[None]) -> None:
        self.dialogue.reply_ended(reply.number)
        self.hearing.reply_ended()
        if not task.cancelled() and (failure := task.exception()) is not None:
            log.error("%s: a reply failed", self.label, exc_info=failure)


async def _sandbox_call(call: Awaitable[T], doing: str) -> T:
    try:
        return await call
    except SandboxError as exc:
        raise from_sandbox(exc, doing) from None
