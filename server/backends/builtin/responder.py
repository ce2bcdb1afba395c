"""The stand-in when no language model is configured (``--llm none``): it says plainly
that it is not a language model, repeats what it heard and says how to connect one.

    BuiltinResponder.stream(messages) ──▶ TextDelta per word; never a tool call
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from ..llm import StreamItem, TextDelta


class BuiltinResponder:
    """The stand-in when no model is configured. It says plainly that it is not a
    language model, repeats what it heard and says how to connect one; no tools."""

    name = "the built-in responder"

    async def start(self) -> None:
        pass

    async def warm(self, system_prompt: str) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        heard = _last_user_text(messages)
        reply = (
            "I am Troupe's built-in responder, not a language model. "
            + (f"I heard: {heard} " if heard else "Nobody has said anything to me yet. ")
            + "To give me a real voice, start the server with --llm pointing at an "
            "OpenAI-compatible endpoint such as Ollama, vLLM, a llama.cpp server or OpenAI."
        )
        for n, word in enumerate(reply.split(" ")):
            await asyncio.sleep(0)  # a stream, not one block: let the session breathe
            yield TextDelta(word if n == 0 else " " + word)


def _last_user_text(messages: list[dict[str, Any]], limit: int = 300) -> str:
    """The last user message's text, shortened to ``limit`` characters."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts
            content = " ".join(str(part.get("text") or "") for part in content
                               if isinstance(part, dict))
        text = " ".join(str(content or "").split())
        if text:
            text = text if len(text) <= limit else text[:limit].rstrip() + "…"
            return text if text[-1] in ".!?…" else text + "."
    return ""
