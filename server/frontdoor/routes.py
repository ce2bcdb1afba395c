"""The front door's aiohttp side: a request becomes an ``auth.Knock``, an
``auth.Refused`` an HTTP answer, and the keys file is re-read on SIGHUP.

    request ──knock()──▶ FrontDoor (server/frontdoor/auth.py) ──Refused──▶ refusal(): 4xx/503 JSON
    request ──client()──▶ its peer, or the client a trusted proxy names (forwarded.py)
    POST /v1/realtime/client_secrets ──client_secret_request()──▶ seconds ──▶ FrontDoor.mint
    SIGHUP ──reload_keys()──▶ keys.load(--api-keys) ──▶ FrontDoor.replace_keys

What is logged names the client (and the proxy it came through), the route, the
refusal's code and a key's *name*; never an Authorization header, a subprotocol, a
key or a client secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from .. import metrics
from ..config import Config
from ..realtime import protocol
from ..state import FRONT_DOOR
from . import forwarded, keys
from .auth import FrontDoor, Knock, Refused, Settings, bearer
from .keys import DEFAULT_SECRET_SECONDS, MAX_SECRET_SECONDS, MIN_SECRET_SECONDS

log = logging.getLogger(__name__)

_CLIENT = web.RequestKey("client", forwarded.Client)


def settings(config: Config) -> Settings:
    return Settings(
        require_keys=config.api_keys is not None,
        open_on_loopback=config.api_keys is None and not config.no_auth,
        allowed_origins=config.allowed_origins,
        max_sessions=config.max_sessions,
        roots=config.allowed_roots,
        per_address_per_minute=config.handshake_rate_per_address,
        per_key_per_minute=config.handshake_rate_per_key,
        trusted_proxies=config.trusted_proxies,
        admin_token=config.admin_token,
        metrics_key=config.metrics_key,
    )


def open_door(config: Config) -> FrontDoor:
    """The front door of ``config``, its keys read. Raises ``keys.KeysFileError``."""
    keyring = None
    if config.api_keys is not None:
        keyring = keys.load(config.api_keys)
        log.info("API keys: %d from %s (%s)", len(keyring), config.api_keys,
                 ", ".join(key.name for key in keyring))
        if keyring.plaintext and keys.readable_by_others(config.api_keys):
            log.warning("%s holds secrets in plain text and other users may read it: "
                        "chmod 600 it, or give secret_sha256 instead", config.api_keys)
    signing = config.client_secret_key
    secrets = keys.ClientSecrets(hashlib.sha256(signing.encode()).digest() if signing else None)
    return FrontDoor(settings(config), keyring, secrets)


def reload_keys(door: FrontDoor, path: Path) -> None:
    """SIGHUP: read the keys file again; on any error keep the keys in force."""
    try:
        keyring = keys.load(path)
    except keys.KeysFileError as exc:
        log.error("keys file NOT reloaded, the previous keys stay in force: %s", exc)
        return
    before = {key.name for key in door.keyring or ()}
    door.replace_keys(keyring)
    after = {key.name for key in keyring}
    log.info("keys file reloaded: %d keys (added: %s; removed: %s); live sessions go on",
             len(keyring), ", ".join(sorted(after - before)) or "none",
             ", ".join(sorted(before - after)) or "none")


def client(request: web.Request) -> forwarded.Client:
    """Who ``request`` comes from (worked out once per request). The first
    X-Forwarded-For from a trusted proxy that names no address is logged, once."""
    found = request.get(_CLIENT)
    if found is None:
        proxies = request.app[FRONT_DOOR].proxies
        found = request[_CLIENT] = proxies.client(
            request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
        if found.malformed is not None and proxies.malformed == 1:
            log.warning("X-Forwarded-For from the trusted proxy %s names no client address "
                        "(%r): its own address is used; later ones are not logged",
                        request.remote, found.malformed)
    return found


def who(request: web.Request) -> str:
    """The client of ``request`` for a log line, with the proxy it came through."""
    found = client(request)
    if found.named_by_proxy:
        return f"{found.address} via {request.remote}"
    return str(found.address)


def knock(request: web.Request) -> Knock:
    offered = tuple(
        part.strip()
        for header in request.headers.getall("Sec-WebSocket-Protocol", ())
        for part in header.split(",") if part.strip()
    )
    found = client(request)
    return Knock(
        origin=request.headers.get("Origin"),
        host=request.headers.get("Host"),
        authorization=request.headers.get("Authorization"),
        subprotocols=offered,
        address=found.address,
        named_by_proxy=found.named_by_proxy,
    )


def refusal(request: web.Request, refused: Refused, *, basic: bool = False) -> web.Response:
    """The HTTP answer to ``refused`` (OpenAI's error shape), counted and logged."""
    metrics.HANDSHAKES_REFUSED.labels(refused.code).inc()
    if refused.code == "server_full":
        metrics.SESSIONS_REJECTED.inc()
    level = logging.DEBUG if refused.code == "rate_limited" else logging.INFO
    log.log(level, "%s %s from %s refused: %d %s", request.method, request.path,
            who(request), refused.status, refused.code)
    headers = refused.headers()
    if refused.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="Troupe admin"' if basic else "Bearer"
    return web.json_response(refused.body(), status=refused.status, headers=headers)


def admin_credential(request: web.Request, *, basic: bool = False) -> str | None:
    """The Bearer credential of ``request``; with ``basic``, also the password of
    ``Authorization: Basic`` (what a browser sends after its own login prompt).
    Raises ``Refused`` for any other form."""
    header = request.headers.get("Authorization")
    if basic and header is not None and header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Refused(401, "invalid_api_key", "malformed Basic credentials") from None
        return decoded.partition(":")[2] or None
    return bearer(header)


async def client_secret_request(request: web.Request) -> tuple[int, dict[str, Any]]:
    """``expires_after.seconds`` (10-7200, default 600) and the ``session`` object of
    an OpenAI client-secret request. Raises ``Refused`` (400)."""
    body: Any = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "invalid_value", "the body must be JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "invalid_value", "the body must be a JSON object")
    expires = body.get("expires_after") or {}
    if not isinstance(expires, dict):
        raise Refused(400, "invalid_value", "expires_after must be an object",
                      param="expires_after")
    if expires.get("anchor", "created_at") != "created_at":
        raise Refused(400, "invalid_value", "expires_after.anchor can only be 'created_at'",
                      param="expires_after.anchor")
    seconds = expires.get("seconds", DEFAULT_SECRET_SECONDS)
    if type(seconds) is not int or not MIN_SECRET_SECONDS <= seconds <= MAX_SECRET_SECONDS:
        raise Refused(400, "invalid_value",
                      f"expires_after.seconds must be a whole number from {MIN_SECRET_SECONDS} "
                      f"to {MAX_SECRET_SECONDS}", param="expires_after.seconds")
    session = body.get("session") or {}
    if not isinstance(session, dict) or session.get("type", "realtime") != "realtime":
        raise Refused(400, "invalid_value",
                      "session.type can only be 'realtime' (no transcription sessions here)",
                      param="session.type")
    return seconds, session


def client_secret_answer(value: str, expires_at: int, session: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``ClientSecretCreateResponse``. The session settings asked for are
    not stored with the secret: clients send them as ``session.update``."""
    model = session.get("model")
    return {
        "value": value,
        "expires_at": expires_at,
        "session": {"type": "realtime", "object": "realtime.session",
                    "id": protocol.new_id("sess"),
                    "model": model if isinstance(model, str) else None},
    }
