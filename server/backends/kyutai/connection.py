"""Opening a WebSocket to one of moshi-server's routes, for both Kyutai clients.

    connect(http, url, …) ──ws_connect, header kyutai-api-key──▶ moshi-server
        HTTP 401/403, 404, other   → BackendUnavailable (the key, the route, its log)
        not open within ``within`` → BackendUnavailable
        unreachable                → BackendUnavailable

The messages name the server and say what to do; ``Advice`` holds the part that
differs between speech to text and text to speech.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import BackendUnavailable

API_KEY_HEADER = "kyutai-api-key"


@dataclass(frozen=True)
class Advice:
    """What to do when a connection fails, each said after the reason."""

    slow: str
    """No connection within the timeout."""
    unreachable: str
    """No server there at all."""
    key: str
    """The server refused the API key (HTTP 401 or 403)."""
    route: str
    """What the server lacks on HTTP 404 ("has no …")."""
    route_fix: str
    """What to do about it."""


def new_session() -> aiohttp.ClientSession:
    # No connection cap: each session holds one socket (aiohttp's default
    # of 100 refused the 101st session's speech).
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def connect(
    http: aiohttp.ClientSession, url: str, *, api_key: str, where: str, advice: Advice,
    within: float, close_timeout: float, heartbeat: float,
    params: Mapping[str, str] | None = None,
) -> aiohttp.ClientWebSocketResponse[Any]:
    """The WebSocket at ``url``, opened ``within`` seconds; ``where`` names the server
    in messages. Raises ``BackendUnavailable``: refused, too slow or unreachable."""
    try:
        async with asyncio.timeout(within):
            return await http.ws_connect(
                url, params=params, headers={API_KEY_HEADER: api_key},
                heartbeat=heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=close_timeout),
            )
    except aiohttp.WSServerHandshakeError as exc:
        raise _refused(where, advice, exc) from exc
    except TimeoutError as exc:
        raise BackendUnavailable(
            f"{where} did not accept a connection within {within:g} s; "
            f"{advice.slow}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise BackendUnavailable(
            f"cannot reach {where} ({exc or type(exc).__name__}); "
            f"{advice.unreachable}") from exc


def _refused(where: str, advice: Advice,
             exc: aiohttp.WSServerHandshakeError) -> BackendUnavailable:
    match exc.status:
        case 401 | 403:
            return BackendUnavailable(
                f"{where} refused the API key (HTTP {exc.status}); {advice.key}")
        case 404:
            return BackendUnavailable(
                f"{where} has no {advice.route} (HTTP 404); {advice.route_fix}")
    return BackendUnavailable(
        f"{where} refused the WebSocket (HTTP {exc.status} {exc.message}); see its log")
