"""One reply of a character: from ``response.create`` to ``response.done``.

    response.created ─▶ [LLM stream, tool calls run in the session's sandbox] ─▶
    response.text.delta … response.text.done ─▶ response.done (completed)
    cancelled (response.cancel, a reload, another character): response.done (cancelled)
    the model's backend fails: error backend_unavailable, response.done (failed)
    the sandbox dies or hangs on a tool call: error sandbox_crashed / sandbox_timeout,
      the model reads why the tool has no answer, and the reply goes on

With a TTS, the reply is also spoken: text goes to the TTS as the model writes it,
``response.audio.delta`` events follow in 80 ms frames (pcm16, or the session's Ogg
Opus stream), paced at real time plus a small lead so that a barge-in leaves little
queued at the client; its text goes as ``response.audio_transcript.*``, as OpenAI
sends it for spoken replies.

The events are the conversation's one model, whoever the client is: the edge
(``server/realtime/dialects.py``) shows them to Unmute's clients as ``response.text.*``
in whole words (cut at ``TextComplete``), and drops the bookkeeping that
only they read (``unmute.response.audio.delta.ready``, ``unmute.additional_outputs``)
for OpenAI's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox import CallFailed, Sandbox, SandboxError

from .. import metrics
from ..audio.opus import OpusEncoder
from ..audio.pcm import SAMPLE_RATE, Samples, pcm16_bytes
from ..backends.errors import BackendUnavailable
from ..backends.llm import LLM
from ..backends.speech import AudioChunk, TextToSpeech
from ..backends.tool_loop import respond
from ..errors import ServerSideError, from_sandbox
from . import events
from .commands import Reply

log = logging.getLogger(__name__)

FRAME = 1920
"""Samples a ``response.audio.delta`` holds at most (80 ms at 24 kHz)."""

Send = Callable[[events.Outgoing], Awaitable[None]]


@dataclass(frozen=True)
class Speaking:
    """How a reply is spoken: by ``tts`` with ``voice``, encoded by ``out``, sent at
    most ``lead`` seconds ahead of real time (so a barge-in drops the rest)."""

    tts: TextToSpeech
    voice: str | None
    out: AudioOut
    lead: float = 0.5


async def run_reply(reply: Reply, llm: LLM, sandbox: Sandbox, send: Send,
                    speaking: Speaking | None = None) -> str | None:
    """Stream one reply; always ends with ``response.done``. With ``speaking``, the
    text is spoken as it streams, and is sent as its audio transcript, as in OpenAI's
    API. Returns the text of a completed reply, ``None`` for one that failed."""
    response_id, item_id = events.new_id("resp"), events.new_id("item")
    character, conversation = reply.character, reply.history
    await send(events.ResponseCreated(
        response=events.ResponseInfo(id=response_id, status="in_progress", voice=character)))
    status, text = "failed", ""
    messages: list[dict[str, Any]] = []
    first_new = 0
    transcript = speaking is not None
    started = time.perf_counter()
    speech = (_Speech(speaking, send, response_id, item_id, started)
              if speaking is not None else None)
    try:
        if speech is not None:
            speech.start()  # the TTS connects while the tools are fetched
        tools = await sandbox.tools(character)

        async def call_tool(name: str, arguments: dict[str, Any]) -> str:
            try:
                return await sandbox.call_tool(character, name, arguments)
            except CallFailed as exc:
                return f"tool {name} raised {exc.error_type}: {exc}"
            except SandboxError as exc:
                # The sandbox was restarted, its characters' state lost: the client
                # is told (DESIGN.md §4), the model reads why and the reply goes on.
                await send(events.error(from_sandbox(exc, f"calling the tool {name}")))
                return f"tool {name} failed: {exc}"

        messages = conversation.messages_for(reply.system_prompt)
        first_new = len(messages)
        try:
            # Closed here, not whenever it is collected: a TTS that failed mid-reply
            # ends the model's stream at once.
            async with contextlib.aclosing(
                    respond(llm, messages, tools, call_tool, reply.temperature)) as deltas:
                async for delta in deltas:
                    if not text:
                        metrics.LLM_FIRST_TOKEN.observe(time.perf_counter() - started)
                    text += delta
                    if speech is not None:
                        speech.check()  # a TTS that failed ends the reply now, not at its end
                        speech.say(delta)
                    await send(
                        events.AudioTranscriptDelta(response_id=response_id,
                                                    item_id=item_id, delta=delta)
                        if transcript
                        else events.TextDelta(response_id=response_id, item_id=item_id,
                                              delta=delta))
        finally:
            conversation.record(messages[first_new:])
        await send(events.TextComplete(response_id=response_id, item_id=item_id))
        if speech is not None:
            await speech.finish()
        await send(events.AdditionalOutputs(
            args={"chat_history": conversation.messages_for(reply.system_prompt)}))
        await send(
            events.AudioTranscriptDone(response_id=response_id, item_id=item_id,
                                       transcript=text) if transcript
            else events.TextDone(response_id=response_id, item_id=item_id, text=text))
        if speech is not None:
            await speech.done()
        status = "completed"
    except asyncio.CancelledError:
        status = "cancelled"
        # What the person saw of the unfinished round stays in the history; the
        # finished tool rounds are there already.
        recorded = "".join(m.get("content") or "" for m in messages[first_new:]
                           if m.get("role") == "assistant")
        if text[len(recorded):]:
            conversation.add_assistant_text(text[len(recorded):])
        raise
    except BackendUnavailable as exc:
        await send(events.error(exc))
    except SandboxError as exc:
        await send(events.error(from_sandbox(exc, "getting the tools")))
    except Exception:  # a defect: the client hears of it, the log has the traceback
        log.exception("a reply of %s failed", character)
        await send(events.error(ServerSideError("server_error",
                                                "the reply failed; the server logged why")))
    finally:
        if speech is not None:
            await speech.stop()
        part = {"type": "audio", "transcript": text} if transcript \
            else {"type": "text", "text": text}
        output = [events.MessageItem(
            id=item_id, role="assistant", content=[part],
            status="completed" if status == "completed" else "incomplete",
        )]
        await asyncio.shield(send(events.ResponseDone(response=events.ResponseInfo(
            id=response_id, status=status, voice=character, output=output))))
    return text if status == "completed" else None


class AudioOut(Protocol):
    """How a reply's samples become ``response.audio.delta`` payloads."""

    def encode(self, samples: Samples) -> bytes: ...

    def finish(self) -> bytes:
        """The rest, at the end of a reply."""

    def cancel(self) -> None:
        """A cancelled reply: what is held back is never sent."""


class Pcm16Out:
    def encode(self, samples: Samples) -> bytes:
        return pcm16_bytes(samples)

    def finish(self) -> bytes:
        return b""

    def cancel(self) -> None:
        pass


class OpusOut:
    """One Ogg Opus stream for the whole session (Unmute's frontend decodes one),
    each reply padded to a whole Opus frame (< 40 ms of silence) at its end."""

    def __init__(self) -> None:
        self._encoder = OpusEncoder()

    def encode(self, samples: Samples) -> bytes:
        return self._encoder.encode(samples)

    def finish(self) -> bytes:
        return self._encoder.flush()

    def cancel(self) -> None:
        self._encoder.drop_pending()


class _Speech:
    """Text in as the model writes it, audio events out as the TTS speaks, paced at
    real time plus ``lead`` in frames of ``FRAME`` samples."""

    def __init__(self, speaking: Speaking, send: Send, response_id: str, item_id: str,
                 started: float) -> None:
        self._text: asyncio.Queue[str | None] = asyncio.Queue()
        self._started = started
        self._first_text: float | None = None
        self._send = send
        self._speaking = speaking
        self._response_id, self._item_id = response_id, item_id
        self._finished = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._speak())

    def check(self) -> None:
        """Raise what ended the speech early, if it did."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and (
                failure := task.exception()) is not None:
            raise failure

    def say(self, text: str) -> None:
        if self._first_text is None:
            self._first_text = time.perf_counter()
        self._text.put_nowait(text)

    async def finish(self) -> None:
        """Wait until everything said so far has been spoken and sent."""
        self._text.put_nowait(None)
        if self._task is not None:
            await self._task
        await self._deliver(self._speaking.out.finish(), 0)
        self._finished = True

    async def done(self) -> None:
        await self._send(events.AudioDone(response_id=self._response_id,
                                            item_id=self._item_id))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self._finished:
            self._speaking.out.cancel()

    async def _speak(self) -> None:
        loop = asyncio.get_running_loop()
        started, sent = 0.0, 0.0
        speaking = self._speaking
        async for event in speaking.tts.speak(self._chunks(), speaking.voice):
            if not isinstance(event, AudioChunk):
                continue
            for start in range(0, len(event.pcm), FRAME):
                frame = event.pcm[start:start + FRAME]
                if not sent:
                    started = loop.time()
                    now = time.perf_counter()
                    metrics.REPLY_FIRST_AUDIO.observe(now - self._started)
                    metrics.TTS_FIRST_AUDIO.observe(now - (self._first_text or now))
                ahead = sent - (loop.time() - started)
                if ahead > speaking.lead:
                    await asyncio.sleep(ahead - speaking.lead)
                await self._deliver(speaking.out.encode(frame), len(frame))
                sent += len(frame) / SAMPLE_RATE

    async def _deliver(self, payload: bytes, samples: int) -> None:
        if not payload:
            return
        await self._send(events.AudioDeltaReady(number_of_samples=samples))
        await self._send(events.AudioDelta(
            response_id=self._response_id, item_id=self._item_id,
            delta=base64.b64encode(payload).decode("ascii")))

    async def _chunks(self) -> AsyncGenerator[str, None]:
        while (text := await self._text.get()) is not None:
            yield text
