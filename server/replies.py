"""One reply of a character: from ``response.create`` to ``response.done``.

    response.created ─▶ [LLM stream, tool calls run in the session's sandbox] ─▶
    response.text.delta … response.text.done ─▶ response.done (completed)
    cancelled (response.cancel, a reload, another character): response.done (cancelled)
    the model's backend fails: error backend_unavailable, response.done (failed)

Text only for now: the voice loop (speech in and out) is not built yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox import CallFailed, Sandbox, SandboxError

from . import protocol
from .conversation import Conversation
from .errors import ServerSideError
from .llm import LLM, BackendUnavailable, respond

Send = Callable[[protocol.ServerEvent], Awaitable[None]]
SendError = Callable[[ServerSideError], Awaitable[None]]


async def run_reply(
    *, send: Send, send_error: SendError, llm: LLM, sandbox: Sandbox, character: str,
    system_prompt: str, conversation: Conversation, temperature: float,
) -> None:
    """Stream one reply of ``character``; always ends with ``response.done``."""
    response_id, item_id = protocol.new_id("resp"), protocol.new_id("item")
    await send(protocol.ResponseCreated(
        response=protocol.ResponseInfo(id=response_id, status="in_progress", voice=character)))
    status, text = "failed", ""
    messages: list[dict[str, Any]] = []
    first_new = 0
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
                await send(protocol.TextDelta(response_id=response_id, item_id=item_id,
                                              delta=delta))
        finally:
            conversation.record(messages)
        await send(protocol.TextDone(response_id=response_id, item_id=item_id, text=text))
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
        await send_error(ServerSideError("backend_unavailable", str(exc)))
    except SandboxError as exc:
        await send_error(ServerSideError("sandbox_crashed", f"getting the tools: {exc}"))
    finally:
        output = [protocol.MessageItem(
            id=item_id, role="assistant", content=[{"type": "text", "text": text}],
            status="completed" if status == "completed" else "incomplete",
        )]
        await asyncio.shield(send(protocol.ResponseDone(response=protocol.ResponseInfo(
            id=response_id, status=status, voice=character, output=output))))


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
