"""A character's reply from any language model, the tools it asks for run by the caller.

    respond(llm, messages, tools, call_tool, temperature)
      ┌─▶ llm.stream(messages, tools) ──▶ TextDelta … ─────────────────────▶ yield str
      │                               └─▶ ToolCallRequest …  (end of a completion)
      │   call_tool(name, arguments) ──▶ str   (an exception's message, bad JSON: too)
      │   messages += assistant {"tool_calls"} + one {"role": "tool"} per call
      └── ask again, at most max_tool_rounds times
          messages += {"role": "assistant", "content": text}   once it answers in text
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from .llm import LLM, TextDelta, ToolCallRequest, ToolRunner

log = logging.getLogger(__name__)

TOO_MANY_TOOL_ROUNDS = "Sorry, I kept reaching for my tools and could not finish that answer."


async def respond(
    llm: LLM,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    call_tool: ToolRunner,
    temperature: float,
    max_tool_rounds: int = 4,
) -> AsyncGenerator[str, None]:
    """Stream the reply to ``messages`` as text deltas, running the tools it asks for.

    ``messages`` is extended in place with what the model said: each tool round as
    an assistant ``tool_calls`` message plus its ``tool`` results (appended together,
    after every call returned, so the history never holds unanswered calls), and the
    final text as an assistant message. A tool that raises, or arguments that are
    not a JSON object, become a tool result the model reads. After
    ``max_tool_rounds`` rounds a further request for tools is not run: the reply ends
    with ``TOO_MANY_TOOL_ROUNDS``. If the caller stops early (a barge-in), nothing is
    appended for the unfinished completion.

    Raises ``BackendUnavailable`` from the model; earlier rounds stay in ``messages``.
    """
    for round_number in itertools.count():
        said: list[str] = []
        requests: list[ToolCallRequest] = []
        async with contextlib.aclosing(llm.stream(messages, tools, temperature)) as items:
            async for item in items:
                match item:
                    case TextDelta(text=delta):
                        said.append(delta)
                        yield delta
                    case ToolCallRequest():
                        requests.append(item)
        text = "".join(said)
        if requests and round_number >= max_tool_rounds:
            log.warning("%s still asked for tools after %d rounds; giving up",
                        llm.name, max_tool_rounds)
            closing = (" " if text and not text[-1].isspace() else "") + TOO_MANY_TOOL_ROUNDS
            yield closing
            text, requests = text + closing, []
        if not requests:
            messages.append({"role": "assistant", "content": text})
            return
        results = [await _run_tool(call_tool, request) for request in requests]
        messages.append({
            "role": "assistant",
            "content": text or None,
            "tool_calls": [
                {"id": r.id, "type": "function",
                 "function": {"name": r.name, "arguments": r.arguments}}
                for r in requests
            ],
        })
        messages.extend({"role": "tool", "tool_call_id": r.id, "content": result}
                        for r, result in zip(requests, results, strict=True))


async def _run_tool(call_tool: ToolRunner, request: ToolCallRequest) -> str:
    """The result the model sees: the tool's answer, or why there is none."""
    try:
        arguments = json.loads(request.arguments) if request.arguments.strip() else {}
    except json.JSONDecodeError as exc:
        return (f"tool {request.name} was not called: its arguments are not valid JSON "
                f"({exc}). Call it again with a JSON object.")
    if not isinstance(arguments, dict):
        return (f"tool {request.name} was not called: its arguments must be a JSON object, "
                f"not {type(arguments).__name__}.")
    try:
        return await call_tool(request.name, arguments)
    except Exception as exc:  # character code: whatever it raised, the model hears it
        log.info("tool %s failed: %r", request.name, exc)
        return f"tool {request.name} failed: {exc or type(exc).__name__}"
