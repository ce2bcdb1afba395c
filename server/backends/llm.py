"""A character's reply, streamed from a chat-completions model, tools run by the caller.

    respond(llm, messages, tools, call_tool, temperature)
      ┌─▶ llm.stream(messages, tools) ──▶ TextDelta … ─────────────────────▶ yield str
      │                               └─▶ ToolCallRequest …  (end of a completion)
      │   call_tool(name, arguments) ──▶ str   (an exception's message, bad JSON: too)
      │   messages += assistant {"tool_calls"} + one {"role": "tool"} per call
      └── ask again, at most max_tool_rounds times
          messages += {"role": "assistant", "content": text}   once it answers in text

    OpenAICompatibleLLM  any /v1/chat/completions server (Ollama, vLLM, a llama.cpp
                         server, OpenAI) through the openai SDK's AsyncOpenAI;
                         every failure becomes BackendUnavailable
    BuiltinResponder     no model configured: says so, and what it heard

The SDK retries a request (``max_retries``) only until the response starts; once text
is streaming, a dropped connection or a stalled read ends the reply with
``BackendUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgspec
import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall

from ..errors import ServerSideError

log = logging.getLogger(__name__)


class BackendUnavailable(ServerSideError):
    """The language model cannot answer: unreachable, an HTTP error, a timeout, or a
    reply cut off mid-stream. The message names the URL and says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__("backend_unavailable", message)


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


# ── the tool loop ────────────────────────────────────────────────────────────

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


# ── an OpenAI-compatible server ──────────────────────────────────────────────


class OpenAICompatibleLLM:
    """A ``/v1/chat/completions`` endpoint, e.g. ``http://127.0.0.1:11434/v1``.

    ``timeout`` bounds each wait on the server: the connection (at most 5 s), the
    first token, and every gap between chunks; it is read at each request, so it can
    be changed on a running server. The SDK retries ``max_retries`` times on
    connection errors, timeouts, 408/409/429 and 5xx, before the stream starts.
    """

    def __init__(
        self, base_url: str, api_key: str = "unused", model: str | None = None,
        *, timeout: float = 60.0, max_retries: int = 2,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.timeout = timeout
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=max_retries,
        )

    def _timeouts(self) -> openai.Timeout:
        return openai.Timeout(self.timeout, connect=min(self.timeout, 5.0))

    @property
    def name(self) -> str:
        return self.model or f"the model at {self.base_url}"

    async def start(self) -> None:
        """Pick the model: the one given, else the only one ``/v1/models`` lists.

        Raises ``BackendUnavailable`` when the server cannot be reached or offers no
        model or several (the message lists them)."""
        if self.model is None:
            self.model = await self._only_model()

    async def _only_model(self) -> str:
        try:
            page = await self._client.models.list(timeout=self._timeouts())
        except openai.APIError as exc:
            raise self._unavailable(exc, started=False) from exc
        offered = [model.id for model in page.data]
        if len(offered) == 1:
            log.info("language model at %s: %s", self.base_url, offered[0])
            return offered[0]
        if not offered:
            raise BackendUnavailable(
                f"the language model server at {self.base_url} lists no models in "
                f"/v1/models; load one there, or pass its name with --llm-model")
        raise BackendUnavailable(
            f"the language model server at {self.base_url} offers {len(offered)} models "
            f"({', '.join(offered)}); pass the one to use with --llm-model")

    async def close(self) -> None:
        await self._client.close()

    async def warm(self, system_prompt: str) -> None:
        pass  # the server caches prompts its own way (vLLM, llama.cpp) or not at all

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], temperature: float
    ) -> AsyncGenerator[StreamItem, None]:
        """See ``LLM.stream``. Picks the model first if ``start`` could not."""
        if self.model is None:  # the server was down when start() ran
            self.model = await self._only_model()
        model = self.model
        calls = _ToolCalls()
        started = finished = False
        try:
            completion = await self._client.chat.completions.create(
                model=model,
                messages=cast(Iterable[ChatCompletionMessageParam], messages),
                tools=cast(Iterable[ChatCompletionToolUnionParam], tools) if tools else openai.omit,
                temperature=temperature,
                stream=True,
                timeout=self._timeouts(),
            )
            async with completion:
                async for chunk in completion:
                    started = True
                    if not chunk.choices:  # e.g. a usage chunk
                        continue
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        yield TextDelta(choice.delta.content)
                    for delta in choice.delta.tool_calls or ():
                        calls.add(delta)
                    finished = finished or choice.finish_reason is not None
        except openai.APIError as exc:
            raise self._unavailable(exc, started) from exc
        if not finished:
            # The SDK ends quietly when a server closes the stream cleanly but early.
            raise BackendUnavailable(
                f"the reply from {self.name} at {self.base_url} ended before the model "
                f"finished (no finish_reason); see the server's log")
        for request in calls.requests():
            yield request

    def _unavailable(self, exc: openai.APIError, started: bool) -> BackendUnavailable:
        where = f"the language model at {self.base_url}"
        cause = exc.__cause__
        why = (str(cause) or type(cause).__name__) if cause is not None else exc.message
        match exc:
            case openai.APITimeoutError():
                what = "stalled mid-reply" if started else "did not answer"
                return BackendUnavailable(
                    f"{where} {what} within {self.timeout:g} s; check that it is running "
                    f"and not overloaded")
            case openai.APIConnectionError() if started:
                return BackendUnavailable(
                    f"the connection to {where} broke off mid-reply ({why}); see its log")
            case openai.APIConnectionError():
                return BackendUnavailable(
                    f"cannot reach {where} ({why}); start it (e.g. `ollama serve`) or point "
                    f"--llm at a running OpenAI-compatible server")
            case openai.AuthenticationError() | openai.PermissionDeniedError():
                return BackendUnavailable(
                    f"{where} refused the API key ({exc.message}); set the right one in "
                    f"TROUPE_LLM_API_KEY (or a file named by --llm-api-key-file)")
            case openai.NotFoundError():
                return BackendUnavailable(
                    f"{where} has no such model or route ({exc.message}); check "
                    f"--llm-model and that the URL ends in /v1")
            case openai.APIStatusError():
                return BackendUnavailable(f"{where} failed ({exc.message}); see its log")
        return BackendUnavailable(f"{where} reported an error: {exc.message}")


@dataclass
class _PartialCall:
    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class _ToolCalls:
    """Assembles streamed tool-call deltas into whole calls, by ``index``."""

    def __init__(self) -> None:
        self._calls: list[_PartialCall] = []
        self._slots: dict[int, _PartialCall] = {}

    def add(self, delta: ChoiceDeltaToolCall) -> None:
        function = delta.function
        call = self._slots.get(delta.index)
        # Ollama numbers parallel calls all 0: a new id *with a name* starts a new call.
        if call is None or (delta.id and call.id and delta.id != call.id
                            and function is not None and function.name):
            call = self._slots[delta.index] = _PartialCall(delta.id or "")
            self._calls.append(call)
        call.id = call.id or delta.id or ""
        if function is not None:
            call.name = function.name or call.name
            call.arguments.append(function.arguments or "")

    def requests(self) -> list[ToolCallRequest]:
        return [ToolCallRequest(call.id or f"call_{n}", call.name, "".join(call.arguments))
                for n, call in enumerate(self._calls)]


# ── no model configured ──────────────────────────────────────────────────────


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
