"""One reply of a character: from ``response.create`` to ``response.done``.

    response.created ─▶ [LLM stream, tool calls run in the session's sandbox] ─▶
    response.text.delta … response.text.done ─▶ response.done (completed)
    cancelled (response.cancel, a reload, another character): response.done (cancelled)
    the model's backend fails: error backend_unavailable, response.done (failed)

With a TTS, the reply is also spoken: text goes to the TTS as the model writes it and
``response.audio.delta`` (pcm16) events follow, then ``response.audio.done``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

from sandbox import CallFailed, Sandbox, SandboxError

from . import protocol
from .conversation import Conversation
from .errors import ServerSideError
from .kyutai_tts import AudioChunk, pcm16_bytes
from .llm import LLM, BackendUnavailable, respond
from .opus import OpusEncoder, Samples
from .speech import TextToSpeech

Send = Callable[[protocol.ServerEvent], Awaitable[None]]
SendError = Callable[[ServerSideError], Awaitable[None]]


async def run_reply(
    *, send: Send, send_error: SendError, llm: LLM, sandbox: Sandbox, character: str,
    system_prompt: str, conversation: Conversation, temperature: float,
    tts: TextToSpeech | None = None, voice: str | None = None,
    audio_out: AudioOut | None = None,
) -> str | None:
    """Stream one reply of ``character``; always ends with ``response.done``. With
    ``tts``, the text is spoken as it streams and the audio sent as pcm16. Returns
    the text of a completed reply, ``None`` for a failed one."""
    response_id, item_id = protocol.new_id("resp"), protocol.new_id("item")
    await send(protocol.ResponseCreated(
        response=protocol.ResponseInfo(id=response_id, status="in_progress", voice=character)))
    status, text = "failed", ""
    messages: list[dict[str, Any]] = []
    first_new = 0
    speech = (_Speech(tts, voice, send, response_id, item_id, audio_out or Pcm16Out())
              if tts is not None else None)
    try:
        tools = await sandbox.tools(character)

        async def call_tool(name: str, arguments: dict[str, Any]) -> str:
            try:
                return await sandbox.call_tool(character, name, arguments)
            except CallFailed as exc:
                return f"tool {name} raised {exc.error_type}: {exc}"
            except SandboxError as exc:
                return f"tool {name} failed: {exc}"

        messages = conversation.messages_for(system_prompt)
        first_new = len(messages)
        try:
            async for delta in respond(llm, messages, tools, call_tool, temperature):
                text += delta
                if speech is not None:
                    speech.say(delta)
                await send(protocol.TextDelta(response_id=response_id, item_id=item_id,
                                              delta=delta))
        finally:
            conversation.record(messages)
        await send(protocol.TextDone(response_id=response_id, item_id=item_id, text=text))
        if speech is not None:
            await speech.finish()
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
        await send_error(exc)
    except SandboxError as exc:
        await send_error(ServerSideError("sandbox_crashed", f"getting the tools: {exc}"))
    finally:
        if speech is not None:
            await speech.stop()
        output = [protocol.MessageItem(
            id=item_id, role="assistant", content=[{"type": "text", "text": text}],
            status="completed" if status == "completed" else "incomplete",
        )]
        await asyncio.shield(send(protocol.ResponseDone(response=protocol.ResponseInfo(
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
    """Text in as the model writes it, audio events out as the TTS speaks."""

    def __init__(self, tts: TextToSpeech, voice: str | None, send: Send,
                 response_id: str, item_id: str, audio_out: AudioOut) -> None:
        self._text: asyncio.Queue[str | None] = asyncio.Queue()
        self._send = send
        self._out = audio_out
        self._response_id, self._item_id = response_id, item_id
        self._finished = False
        self._task = asyncio.create_task(self._speak(tts, voice))

    def say(self, text: str) -> None:
        self._text.put_nowait(text)

    async def finish(self) -> None:
        """Wait until everything said so far has been spoken and sent."""
        self._text.put_nowait(None)
        await self._task
        await self._deliver(self._out.finish())
        self._finished = True
        await self._send(protocol.AudioDone(response_id=self._response_id,
                                            item_id=self._item_id))

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if not self._finished:
            self._out.cancel()

    async def _speak(self, tts: TextToSpeech, voice: str | None) -> None:
        async for event in tts.speak(self._chunks(), voice):
            if isinstance(event, AudioChunk):
                await self._deliver(self._out.encode(event.pcm))

    async def _deliver(self, payload: bytes) -> None:
        if payload:
            await self._send(protocol.AudioDelta(
                response_id=self._response_id, item_id=self._item_id,
                delta=base64.b64encode(payload).decode("ascii")))

    async def _chunks(self) -> AsyncGenerator[str, None]:
        while (text := await self._text.get()) is not None:
            yield text


def user_text(item: protocol.Item) -> str:
    """The text of a user message item; raises ``ValueError`` for anything else."""
    if item.type != "message" or item.role != "user":
        raise ValueError(f"only user messages can be added, not {item.type}/{item.role}")
    parts = [part.text or part.transcript or "" for part in item.content
             if part.type in ("input_text", "text", "input_audio")]
    text = " ".join(part for part in parts if part)
    if not text:
        raise ValueError("the message has no text (content parts of type input_text)")
    return text
