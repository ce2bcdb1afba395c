"""One WebSocket session with the server: ``connect`` opens it (and says why the
server refused it), ``Connection`` sends events and receives them, each wait bounded
by ``--timeout``; ``first_of`` runs a session's readers and writers together."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any, TypeVar

import aiohttp

from scripts.client.errors import Closed, Event, Failure, ServerError, note

START_HINT = (
    "is the server running? Start it from the Troupe checkout with `make run` "
    "(or `.venv/bin/python -m server`), or point --url at a running server"
)
T = TypeVar("T")


class Connection:
    """One WebSocket session; every wait is limited to ``timeout`` seconds unless
    the caller bounds it otherwise (``receive(bounded=False)``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float,
                 verbose: bool = False) -> None:
        self._ws = ws
        self.timeout = timeout
        self._verbose = verbose
        self._ids = itertools.count(1)

    async def send(self, event: Event) -> str:
        """Send ``event`` with a fresh ``event_id`` (errors answering it carry it)."""
        event_id = f"cli_{next(self._ids)}"
        frame = json.dumps({**event, "event_id": event_id})
        if self._verbose:
            note(f">> {frame}" if event["type"] != "input_audio_buffer.append"
                 else f">> input_audio_buffer.append {event_id} ({len(event['audio'])} "
                 "base64 characters)")
        try:
            await self._ws.send_str(frame)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise Failure(f"the connection is closed, cannot send {event['type']}: {exc}") from None
        return event_id

    async def receive(self, bounded: bool = True) -> Event:
        """The next event; raises ``Failure`` on a timeout (only if ``bounded``) or a
        closed connection."""
        try:
            message = await self._ws.receive(timeout=self.timeout if bounded else None)
        except TimeoutError:
            raise Failure(f"no answer from the server within {self.timeout:g} s "
                          "(raise --timeout if it is just slow)") from None
        if message.type is aiohttp.WSMsgType.TEXT:
            if self._verbose:
                note(f"<< {message.data}")
            try:
                event = json.loads(message.data)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise Failure(f"the server sent a frame that is not an event: {message.data!r}")
            return event
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
            code = message.data if message.type is aiohttp.WSMsgType.CLOSE else self._ws.close_code
            raise Closed(code, str(message.extra or ""))
        if message.type is aiohttp.WSMsgType.ERROR:
            raise Failure(f"the connection failed: {message.data}")
        raise Failure(f"the server sent an unexpected {message.type.name} frame")

    async def expect(self, types: Iterable[str]) -> Event:
        """Skip events until one of ``types`` arrives, within ``timeout`` in all.
        An ``error`` event raises ``ServerError``: requests are answered in order and
        this client has only one outstanding at a time."""
        wanted = tuple(types)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    event = await self.receive()
                    if event["type"] == "error":
                        raise ServerError(event)
                    if event["type"] in wanted:
                        return event
        except TimeoutError:
            raise Failure(f"no {' or '.join(wanted)} from the server within "
                          f"{self.timeout:g} s (raise --timeout if it is just slow)") from None

    async def request(self, event: Event, *answers: str) -> Event:
        await self.send(event)
        return await self.expect(answers)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


@contextlib.asynccontextmanager
async def connect(url: str, limit: float, verbose: bool = False) -> AsyncIterator[Connection]:
    """Open a session at ``url`` and wait for ``session.created``; always closes it."""
    async with aiohttp.ClientSession() as http:
        key = os.environ.get("TROUPE_API_KEY")
        try:
            async with asyncio.timeout(limit):
                ws = await http.ws_connect(
                    url, protocols=("realtime",),
                    headers={"Authorization": f"Bearer {key}"} if key else None,
                    timeout=aiohttp.ClientWSTimeout(ws_close=limit),
                )
        except aiohttp.ClientConnectorError as exc:
            raise Failure(f"cannot connect to {url} ({describe_os_error(exc)}); "
                          f"{START_HINT}") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise Failure(refused(url, exc, key is not None)) from None
        except aiohttp.ClientError as exc:
            raise Failure(f"cannot connect to {url}: {exc}") from None
        except TimeoutError:
            raise Failure(f"{url} did not answer within {limit:g} s") from None
        connection = Connection(ws, limit, verbose)
        try:
            await connection.expect(["session.created"])
            yield connection
        finally:
            await connection.close()


def refused(url: str, exc: aiohttp.WSServerHandshakeError, sent_key: bool) -> str:
    """Why the server turned the handshake away, and what to do."""
    retry = exc.headers.get("Retry-After") if exc.headers else None
    later = f"; retry in {retry} s" if retry else ""
    match exc.status:
        case 401 if sent_key:
            return f"{url} refused the key in TROUPE_API_KEY (HTTP 401)"
        case 401:
            return (f"{url} needs an API key (HTTP 401): set TROUPE_API_KEY to a key of "
                    "this server")
        case 403:
            return f"{url} refused this client (HTTP 403: its Origin or Host is not allowed)"
        case 429:
            return f"{url} refused: too many connections for this key or address (HTTP 429){later}"
        case 503:
            return f"{url} refused: server full (HTTP 503){later}"
    return (f"{url} did not accept the WebSocket (HTTP {exc.status}); is this a Troupe "
            "server's /v1/realtime?")


def describe_os_error(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return exc.os_error.strerror or str(exc.os_error)


async def first_of(*coroutines: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutines`` together; the result (or exception) of the first to end,
    once the others are cancelled."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(task for task in tasks if task in done).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
