"""What a character's reply asks of a language model, and what the model streams back.

    LLM.stream(messages, tools, temperature) ──▶ TextDelta …   as the text arrives
                                             └─▶ ToolCallRequest …   (end of a completion)

Implemented by ``openai/`` (any /v1/chat/completions server), ``embedded/`` (a small
model shipped in a package) and ``builtin/`` (no model: says so). ``tool_loop.respond``
runs the tools a model asks for, over any of them. Every failure is a
``BackendUnavailable`` (``errors``) whose message says what to do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import msgspec


class TextDelta(msgspec.Struct, frozen=True):
    text: str


class ToolCallRequest(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: str
    """JSON text as the model wrote it: not checked."""


StreamItem = TextDelta | ToolCallRequest
ToolRunner = Callable[[str, dict[str, Any]], Awaitable[str]]
"""``call_tool(name, arguments) -> result``, supplied by the caller."""


class LLM(Protocol):
    @property
    def name(self) -> str:
        """A readable model name, for people and for system prompts."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def warm(self, system_prompt: str) -> None:
        """A hint: replies with this system prompt are coming (a cache may load it)."""

    def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        """One completion: text deltas as they arrive, then one ``ToolCallRequest``
        per call if the model asked for tools. Raises ``BackendUnavailable``."""
        ...
