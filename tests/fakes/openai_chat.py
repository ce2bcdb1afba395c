"""A scripted OpenAI chat-completions server on loopback, for tests.

    test ──script(text(...), tool_calls(...), failure(), drop(...))──▶ FakeOpenAI
                                                  (or echo=True: "You said: …")
    openai SDK ──GET  /v1/models─────────────────▶ {"object": "list", "data": [...]}
               ──POST /v1/chat/completions──────▶ body recorded in ``requests``;
                 (stream: true)                   the next scripted reply answers:
                                                  SSE ``data: {chunk}`` … ``data: [DONE]``

It speaks the wire protocol of OpenAI's API exactly (chunk shapes, error bodies, the
``retry-after-ms`` header the SDK honours), so the code under test runs through the
real ``openai`` SDK. Each request takes one scripted reply; when none is left the
request fails with a 500 saying so (marked not retryable).

Every test gets the ``fake_openai`` fixture (``tests/conftest.py`` lists this module in
``pytest_plugins``), or uses ``FakeOpenAI`` directly.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from .loopback import serve

# ── the script ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Text:
    """A text answer, one chunk per piece, then ``finish_reason: "stop"``."""

    pieces: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    """One function call; ``arguments`` arrive in one delta per piece."""

    name: str
    arguments: tuple[str, ...]
    id: str | None = None


@dataclass(frozen=True)
class ToolCalls:
    """Optional text, then the calls (by index), then ``finish_reason: "tool_calls"``."""

    calls: tuple[Call, ...]
    text: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """An HTTP error with OpenAI's error body; retryable statuses are retried by the
    SDK after ``retry_after_ms``."""

    status: int = 500
    message: str = "The server had an error while processing your request."


@dataclass(frozen=True)
class Drop:
    """Text pieces, then no finish chunk and no [DONE]: the connection is cut
    (``abrupt``), or the HTTP body ends cleanly."""

    pieces: tuple[str, ...]
    abrupt: bool = True


@dataclass(frozen=True)
class Stall:
    """Text pieces, then silence until the fake is closed (a read timeout)."""

    pieces: tuple[str, ...]


@dataclass(frozen=True)
class Garbled:
    """A chunk that is JSON but not a ``chat.completion.chunk`` (a server that is not
    OpenAI-compatible, or a broken one), then the end of the stream."""

    chunk: object


Reply = Text | ToolCalls | Failure | Drop | Stall | Garbled


def text(*pieces: str) -> Text:
    return Text(pieces)


def call(name: str, *arguments: str, id: str | None = None) -> Call:
    return Call(name, arguments, id)


def tool_calls(*calls: Call, text: Sequence[str] = ()) -> ToolCalls:
    return ToolCalls(calls, tuple(text))


def failure(status: int = 500, message: str = Failure.message) -> Failure:
    return Failure(status, message)


def drop(*pieces: str, abrupt: bool = True) -> Drop:
    return Drop(pieces, abrupt)


def stall(*pieces: str) -> Stall:
    return Stall(pieces)


def garbled(chunk: object) -> Garbled:
    return Garbled(chunk)


# ── the server ───────────────────────────────────────────────────────────────


@dataclass
class FakeOpenAI:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    retry_after_ms: int = 1
    """Sent with every error so the SDK's retries take no time in tests."""
    replies: collections.deque[Reply] = field(default_factory=collections.deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Every chat-completions request body, in order (retries included)."""
    headers: list[dict[str, str]] = field(default_factory=list)
    close_connections: bool = False
    """Close each connection after its answer (``Connection: close``), so that every
    request comes on a new one: a fault proxy in front then sees one per request."""
    pause: float = 0.0
    """Seconds between two chunks of an answer: a model that writes slowly."""
    echo: bool = False
    """With no scripted reply left, answer ``You said: <the last user message>.``
    instead of failing: a model whose answer shows which request it answered."""

    def __post_init__(self) -> None:
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._ids = itertools.count(1)

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self) -> str:
        """Listen on 127.0.0.1, a free port; returns the base URL (``…/v1``)."""
        if self._runner is not None:
            raise RuntimeError(f"FakeOpenAI is already serving at {self.base_url}")
        app = web.Application()
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        if self.close_connections:
            app.on_response_prepare.append(_close_after)
        self._runner, address = await serve(app)
        self.base_url = f"http://{address}/v1"
        return self.base_url

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ── handlers ─────────────────────────────────────────────────────────────

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if body.get("stream") is not True:
            return self._error(400, "this fake answers only stream: true", retry=False)
        if not self.replies and self.echo:
            said = [m.get("content") for m in body["messages"] if m.get("role") == "user"]
            self.replies.append(text("You said: ", f"{said[-1] if said else ''}."))
        if not self.replies:
            return self._error(500, "fake_openai: no scripted reply left", retry=False)
        reply = self.replies.popleft()
        if isinstance(reply, Failure):
            return self._error(reply.status, reply.message)
        chunks = _Chunks(f"chatcmpl-fake{next(self._ids)}", str(body.get("model")))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n, chunk in enumerate(self._chunks(reply, chunks)):
            if n and self.pause:
                await asyncio.sleep(self.pause)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        match reply:
            case Drop(abrupt=True):
                assert request.transport is not None
                request.transport.abort()
                return response
            case Drop(abrupt=False):
                await response.write_eof()
                return response
            case Stall():
                await self._closing.wait()
                return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunks(self, reply: Reply, chunks: _Chunks) -> list[Any]:
        match reply:
            case Garbled(chunk):
                return [chunk]
            case Text(pieces) | Drop(pieces) | Stall(pieces):
                out = [chunks.delta({"role": "assistant", "content": ""})]
                out += [chunks.delta({"content": piece}) for piece in pieces]
                if isinstance(reply, Text):
                    out.append(chunks.delta({}, finish_reason="stop"))
                return out
            case ToolCalls(calls, pieces):
                out = [chunks.delta({"role": "assistant", "content": None})]
                out += [chunks.delta({"content": piece}) for piece in pieces]
                for index, c in enumerate(calls):
                    out.append(chunks.delta({"tool_calls": [{
                        "index": index, "id": c.id or f"call_fake{index}", "type": "function",
                        "function": {"name": c.name, "arguments": ""},
                    }]}))
                    out += [chunks.delta({"tool_calls": [{
                        "index": index, "function": {"arguments": piece},
                    }]}) for piece in c.arguments]
                out.append(chunks.delta({}, finish_reason="tool_calls"))
                return out
        raise AssertionError(f"no chunks for {reply!r}")

    def _error(self, status: int, message: str, retry: bool = True) -> web.Response:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        headers = {"retry-after-ms": str(self.retry_after_ms)}
        if not retry:
            headers["x-should-retry"] = "false"
        return web.json_response(
            {"error": {"message": message, "type": kind, "param": None, "code": None}},
            status=status, headers=headers,
        )


async def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    response.force_close()
    # Said too, so that the client closes its end as soon as it has read the answer
    # (aiohttp's hook runs after it wrote its own connection header).
    response.headers["Connection"] = "close"


@dataclass
class _Chunks:
    """Builds ``chat.completion.chunk`` objects of one completion."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}],
        }


@pytest.fixture(name="fake_openai")
async def fake_openai_fixture() -> AsyncIterator[FakeOpenAI]:
    """``fake_openai``: a started ``FakeOpenAI`` serving one model, ``fake-model``, at
    ``fake_openai.base_url``."""
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.close()
