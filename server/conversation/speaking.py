"""The character's side of a session: one reply at a time, its cancel, the goodbye.

    StartReply(reply) ─▶ Speaker.start ─▶ task: run_reply (LLM, tools, TTS) ─▶ finished(text)
    CancelReply ─▶ cancel() (waits for its response.done);  StopReply ─▶ stop() (at once)
    Part ─▶ part(close): close once the client played what it had queued
    DraftReply(reply) ─▶ draft(): the model starts on it (``backends/drafts.py``), and
        the next reply of the same request uses what it wrote;  DropDraft ─▶ drop_draft()

Audio goes out as pcm16 per reply, or as the session's one continuous Ogg Opus stream
(Unmute's frontend decodes one), kept here across replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from sandbox import Sandbox

from ..backends.drafts import Drafting, Request
from ..backends.llm import LLM
from ..backends.speech import TextToSpeech
from .commands import Reply
from .replies import AudioOut, OpusOut, Pcm16Out, Send, Speaking, run_reply

log = logging.getLogger(__name__)

Finished = Callable[[str | None], Coroutine[Any, Any, None]]
"""Told the text of a reply that completed (None: it failed), from its task."""
Ended = Callable[[Reply, "asyncio.Task[None]"], None]
"""Told when a reply's task is over, whatever ended it."""


class Speaker:
    def __init__(self, llm: LLM, tts: TextToSpeech | None, send: Send, *, lead: float,
                 label: str, drafts: bool = False) -> None:
        self._drafting = Drafting(llm) if drafts else None
        self.llm: LLM = self._drafting or llm
        self.tts = tts
        self._send = send
        self._lead = lead
        self._label = label
        self._reply: asyncio.Task[None] | None = None
        self._spoken = False
        """Whether the last reply started was spoken (a goodbye waits for its audio)."""
        self._opus_out: OpusOut | None = None
        self._parting: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self._reply is not None and not self._reply.done()

    def start(self, reply: Reply, sandbox: Sandbox, output_format: str,
              finished: Finished, ended: Ended) -> None:
        speaking = None
        if self.tts is not None and reply.spoken:
            speaking = Speaking(self.tts, self.tts.voice_for(reply.voice_source),
                                self._audio_out(output_format), self._lead)
        self._spoken = speaking is not None

        async def reply_and_finish() -> None:
            # The reply's coroutine is made inside the task: a task cancelled before
            # it starts would otherwise leave it never awaited.
            await finished(await run_reply(reply, self.llm, sandbox, self._send, speaking))

        task = asyncio.create_task(reply_and_finish(), name=f"{self._label}-reply")
        task.add_done_callback(lambda done: ended(reply, done))
        self._reply = task

    def draft(self, reply: Reply, sandbox: Sandbox) -> None:
        """Start the model on ``reply``'s request (its tools asked of ``sandbox``)."""
        if self._drafting is None:
            return

        async def request() -> Request:
            tools = await sandbox.tools(reply.character)
            return reply.history.messages_for(reply.system_prompt), tools, reply.temperature

        self._drafting.draft(request)

    def drop_draft(self) -> None:
        if self._drafting is not None:
            self._drafting.drop()

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the reply in progress, if any; returns it to wait on."""
        reply, self._reply = self._reply, None
        if reply is None or reply.done():
            return None
        reply.cancel()
        return reply

    async def cancel(self) -> bool:
        """Cancel the reply in progress and wait for its end (it sends its own
        response.done). If we are cancelled while waiting, the reply is not
        cancelled a second time in the middle of its clean-up."""
        reply = self.stop()
        if reply is None:
            return False
        await asyncio.wait({reply})
        return True

    def part(self, close: Callable[[], None]) -> None:
        """``close`` once the client played what it had queued (in a task of its own,
        which the reply's end does not cancel)."""
        self._parting = asyncio.create_task(self._part(close, self._lead if self._spoken else 0))

    def stay(self) -> None:
        """The session ends anyway: no goodbye to wait for."""
        if self._parting is not None:
            self._parting.cancel()
            self._parting = None

    @staticmethod
    async def _part(close: Callable[[], None], delay: float) -> None:
        await asyncio.sleep(delay)
        close()

    def _audio_out(self, output_format: str) -> AudioOut:
        """pcm16 per reply, or the session's one continuous Ogg Opus stream."""
        if output_format != "opus":
            return Pcm16Out()
        if self._opus_out is None:
            self._opus_out = OpusOut()
        return self._opus_out
