"""A language model behind any ``/v1/chat/completions`` server (Ollama, vLLM, a
llama.cpp server, OpenAI), through the openai SDK's ``AsyncOpenAI``.

    OpenAICompatibleLLM.start() ── GET /v1/models ──▶ the model (the only one served,
                                                      unless --llm-model names it)
    OpenAICompatibleLLM.stream(messages, tools)
        ── POST /v1/chat/completions, stream=True ──▶ chunks
        ◀── TextDelta per content delta; ToolCallRequest per call once it finished
            (tool-call deltas assembled by ``index``)

The SDK retries a request (``max_retries``) only until the response starts; once text
is streaming, a dropped connection or a stalled read ends the reply with
``BackendUnavailable``, as does every other failure.

The SDK sends the request and reads the server-sent events (its retries, timeouts,
errors and authentication), but the body goes as it is and each chunk is read into
this module's msgspec Structs: its typed ``create`` walks every message of the history
through its request transforms and builds pydantic models per chunk, 10 ms of CPU per
reply instead of 2 ms (a 40-message history, 30 chunks, measured against the loopback
fake).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import openai

from ..errors import BackendUnavailable
from ..llm import StreamItem, TextDelta, ToolCallRequest

log = logging.getLogger(__name__)


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
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                 "temperature": temperature, "stream": True}
        if tools:
            body["tools"] = tools
        calls = _ToolCalls()
        started = finished = False
        try:
            completion = await self._client.post(
                "/chat/completions", cast_to=object, body=body, stream=True,
                stream_cls=openai.AsyncStream[object], options={"timeout": self._timeouts()})
            async with completion:
                async for data in completion:
                    started = True
                    chunk = _chunk(data, self.base_url)
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


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """What Troupe reads of a ``chat.completion.chunk`` (other fields are ignored)."""

    choices: list[_Choice] = msgspec.field(default_factory=list)


def _chunk(data: object, base_url: str) -> _Chunk:
    try:
        return msgspec.convert(data, _Chunk)
    except msgspec.ValidationError as exc:
        raise BackendUnavailable(
            f"the language model at {base_url} streamed a chunk that is not a "
            f"chat.completion.chunk ({exc}); is it an OpenAI-compatible server?") from exc


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

    def add(self, delta: _ToolCallDelta) -> None:
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
