"""Preemptive generation: a reply's completion started before the turn is certain.

    a pause that may end the turn ─▶ Drafting.draft(request)
                                    task: the request (messages, tools, temperature)
                                          ─▶ llm.stream(...) ─▶ items kept, unseen
    the turn ends ─▶ the reply's stream(same request) ─▶ the items so far, then the rest
    anything else ─▶ the draft is dropped (its completion cancelled at the next token):
                     another request, a new draft, drop() (the person went on), close

LiveKit Agents calls it preemptive generation. A draft is used only for the very
request the reply makes (messages, tools and temperature compared as JSON), so the
reply says what a request sent at the end of the turn could have said; until then
nothing of it is shown, spoken or run (a tool call waits with the text). A draft whose
completion failed is dropped too: the reply asks the model again. One session's
replies go through one ``Drafting``, which holds at most one draft.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec

from .. import metrics
from .errors import BackendUnavailable
from .llm import LLM, StreamItem

log = logging.getLogger(__name__)

Request = tuple[list[dict[str, Any]], list[dict[str, Any]], float]
"""What ``LLM.stream`` is asked: messages, tools, temperature."""


class Drafting:
    """``llm`` for one session's replies, whose next completion may be under way."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._draft: _Draft | None = None

    @property
    def name(self) -> str:
        return self.llm.name

    async def start(self) -> None:
        await self.llm.start()

    async def close(self) -> None:
        self.drop()

    async def warm(self, system_prompt: str) -> None:
        await self.llm.warm(system_prompt)

    def draft(self, request: Callable[[], Awaitable[Request]]) -> None:
        """Start the completion of what ``request`` returns, in place of any draft."""
        self.drop()
        self._draft = _Draft(self.llm, request)

    def drop(self) -> None:
        draft, self._draft = self._draft, None
        if draft is not None:
            draft.cancel()
            metrics.REPLY_DRAFTS.labels("dropped").inc()

    async def stream(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                     temperature: float) -> AsyncGenerator[StreamItem, None]:
        """The draft's completion if it was of this request, else a new one."""
        draft, self._draft = self._draft, None
        used = False
        try:
            used = draft is not None and await draft.answers(messages, tools, temperature)
        finally:
            if draft is not None:
                metrics.REPLY_DRAFTS.labels("used" if used else "dropped").inc()
                if not used:
                    draft.cancel()
        items = (draft.items() if draft is not None and used
                 else self.llm.stream(messages, tools, temperature))
        async with contextlib.aclosing(items):
            async for item in items:
                yield item


_running: set[asyncio.Task[None]] = set()
"""Drafts' tasks until they end (the loop keeps only weak references to tasks)."""


class _Draft:
    def __init__(self, llm: LLM, request: Callable[[], Awaitable[Request]]) -> None:
        self._items: list[StreamItem] = []
        self._request: bytes | None = None
        self._asked = asyncio.Event()
        self._more = asyncio.Event()
        self._done = False
        self._failure: BackendUnavailable | None = None
        self._task = asyncio.create_task(self._run(llm, request), name="reply-draft")
        _running.add(self._task)
        self._task.add_done_callback(_running.discard)

    async def answers(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      temperature: float) -> bool:
        """Whether this draft is of that request (waiting until it knows its own)."""
        await self._asked.wait()
        return self._failure is None and self._request is not None and self._request == _encoded(
            (messages, tools, temperature))

    async def items(self) -> AsyncGenerator[StreamItem, None]:
        """What the completion streamed so far, then the rest as it comes."""
        try:
            seen = 0
            while True:
                while seen < len(self._items):
                    seen += 1
                    yield self._items[seen - 1]
                if self._done:
                    if self._failure is not None:
                        raise self._failure
                    return
                self._more.clear()
                await self._more.wait()
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the completion (its task ends by itself, at the next token)."""
        self._task.cancel()

    async def _run(self, llm: LLM, request: Callable[[], Awaitable[Request]]) -> None:
        try:
            try:
                asked = await request()
            except Exception as exc:  # the reply will ask again, and say what fails
                log.info("no draft: %r", exc)
                return
            self._request = _encoded(asked)
            self._asked.set()
            async with contextlib.aclosing(llm.stream(*asked)) as items:
                async for item in items:
                    self._items.append(item)
                    self._more.set()
        except BackendUnavailable as exc:
            self._failure = exc
        except Exception:  # a defect: a reply using the draft fails as a backend would
            log.exception("a reply's draft failed")
            self._failure = BackendUnavailable("the language model's reply failed; the "
                                               "server logged why")
        finally:
            self._done = True
            self._asked.set()
            self._more.set()


def _encoded(request: Request) -> bytes | None:
    try:
        return msgspec.json.encode(request)
    except (TypeError, msgspec.EncodeError):
        return None  # matches nothing
