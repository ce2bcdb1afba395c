"""The front door (DESIGN.md §9): who may connect, from where, how often and how many.
Decisions only, no sockets: ``routes.py`` turns a request into a ``Knock`` and a
``Refused`` into an HTTP answer.

    GET /v1/realtime (a Knock: Origin, Host, Authorization, subprotocols, client)
      Origin on the allowlist (or none sent)?      no ─▶ 403 origin_not_allowed
      open on loopback: Host a loopback name?      no ─▶ 403 host_not_allowed
      the address under its handshake rate?        no ─▶ 429 rate_limited, Retry-After
      keys configured: a key or client secret?     no ─▶ 401 missing_api_key /
                                                         invalid_api_key / client_secret_expired
      the key under its handshake rate?            no ─▶ 429 rate_limited, Retry-After
      the server under --max-sessions?             no ─▶ 503 server_full, Retry-After
      the key under its max_sessions?              no ─▶ 429 too_many_sessions, Retry-After
      ─▶ Entry(scope): the session's key, roots and admin flag; ``leave()`` it at the end

Modes, fixed at start (``startup_problem`` refuses the rest):

- keys configured (``--api-keys``): every connection needs a key or a client secret
  minted from one, loopback included; a key's ``allowed_roots`` are its sessions' roots.
- no keys, bound to loopback: open (no key needed, ``--allowed-root`` for all), but
  the Host must be a loopback name, so a web page cannot reach the server by
  rebinding its own DNS name to 127.0.0.1.
- no keys elsewhere: only with ``--no-auth``, open on purpose.

The per-address rate does not apply to loopback peers: local processes have the
machine already. Behind a reverse proxy every client arrives from the proxy's address,
unless the server trusts it (``--trusted-proxy``): then the client the proxy names in
X-Forwarded-For is limited, loopback or not (``forwarded.py``).

Here: the door and its modes; beside it, ``refusals.py`` (the codes and their HTTP
shape), ``origins.py`` (Origin and Host), ``limits.py`` (rates and session counts),
whose names this module re-exports (the server and the tests say ``auth.Refused``),
and ``forwarded.py`` (the client behind a proxy).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .forwarded import Network, TrustedProxies
from .keys import (
    CLIENT_SECRET_PREFIX,
    ApiKey,
    ClientSecrets,
    ExpiredClientSecret,
    InvalidClientSecret,
    Keyring,
)
from .limits import Admission as Admission
from .limits import RateLimit as RateLimit
from .limits import address_bucket as address_bucket
from .origins import Origins as Origins
from .origins import check_origins as check_origins
from .origins import is_loopback as is_loopback
from .origins import split_host
from .refusals import RefusalCode as RefusalCode
from .refusals import Refused as Refused

SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL = "openai-insecure-api-key."
"""Browsers cannot set headers on a WebSocket: they offer ``realtime`` and this, with
the key or client secret appended (as OpenAI's own browser clients do)."""
HOW_TO_SEND = (f"send Authorization: Bearer <key>, or (browsers) the subprotocols "
               f"'{SUBPROTOCOL}' and '{KEY_SUBPROTOCOL}<key or client secret>'")


@dataclass(frozen=True)
class Knock:
    """What the front door reads from a request."""

    origin: str | None = None
    host: str | None = None
    authorization: str | None = None
    subprotocols: tuple[str, ...] = ()
    address: str | None = None
    """The client's: the peer's, or the one a trusted proxy named."""
    named_by_proxy: bool = False


Via = Literal["key", "client_secret", "open"]


@dataclass(frozen=True)
class Scope:
    """What a session may do: its key (None: an open server), the roots it may load."""

    key: str | None
    allowed_roots: tuple[Path, ...]
    admin: bool = False
    via: Via = "open"


@dataclass(frozen=True)
class Entry:
    """An admitted handshake; ``FrontDoor.leave`` gives its slot back."""

    scope: Scope


@dataclass(frozen=True)
class Settings:
    require_keys: bool = False
    open_on_loopback: bool = True
    """No keys and no --no-auth: the server runs open because it listens on loopback."""
    allowed_origins: tuple[str, ...] = ()
    """``--allowed-origin`` values; empty: loopback origins. The server's own origin
    is always allowed. ``*``: any (not ``null``)."""
    max_sessions: int = 200
    roots: tuple[Path, ...] = ()
    """What sessions without a key may load (``--allowed-root``)."""
    per_address_per_minute: int = 120
    per_key_per_minute: int = 600
    trusted_proxies: tuple[Network, ...] = ()
    """Proxies whose X-Forwarded-For names the client (``--trusted-proxy``)."""
    admin_token: str | None = field(default=None, repr=False)
    metrics_key: str | None = field(default=None, repr=False)


# ── the door ─────────────────────────────────────────────────────────────────


def bearer(authorization: str | None) -> str | None:
    """The credential of ``Authorization: Bearer <credential>``; None when absent.
    Raises ``Refused`` (401) for any other form: nothing is guessed at."""
    if authorization is None:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value or any(c.isspace() for c in value):
        raise Refused(401, "invalid_api_key",
                      "malformed Authorization header: send Authorization: Bearer <key>, "
                      "exactly")
    return value


def presented(knock: Knock) -> str | None:
    """The key or client secret a handshake carries: Authorization first, else the
    browser's subprotocol."""
    credential = bearer(knock.authorization)
    if credential is not None:
        return credential
    for protocol in knock.subprotocols:
        if protocol.startswith(KEY_SUBPROTOCOL):
            return protocol.removeprefix(KEY_SUBPROTOCOL) or None
    return None


class FrontDoor:
    """The front door's state: the keys (replaced whole on a reload), the signing key
    of client secrets, the rate buckets and the session counts."""

    def __init__(self, settings: Settings, keyring: Keyring | None,
                 secrets: ClientSecrets | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if settings.require_keys and not keyring:
            raise ValueError("keys are required but none are configured")
        self.settings = settings
        self.keyring = keyring
        self.secrets = secrets or ClientSecrets()
        self.origins = Origins.of(settings.allowed_origins)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.admission = Admission()
        self._by_address = RateLimit(settings.per_address_per_minute)
        self._by_key = RateLimit(settings.per_key_per_minute)
        self._clock, self._wall = clock, wall

    def replace_keys(self, keyring: Keyring) -> None:
        """A new reading of the keys file: new connections use it; live sessions keep
        the scope they opened with."""
        if not self.settings.require_keys:
            raise ValueError("this server runs without keys; restart it with --api-keys")
        self.keyring = keyring

    # ── sessions ─────────────────────────────────────────────────────────────

    def enter(self, knock: Knock) -> Entry:
        """Admit a WebSocket handshake. Raises ``Refused``."""
        if _key_without_realtime(knock.subprotocols):
            raise Refused(400, "invalid_subprotocol",
                          f"offer the subprotocol '{SUBPROTOCOL}' beside "
                          f"'{KEY_SUBPROTOCOL}…'")
        self._check_where(knock)
        key, via = self._identify(presented(knock))
        if key is not None:
            self._rate(self._by_key, key.name, f"key {key.name!r}")
        self.admission.admit(key, self.settings.max_sessions)
        if key is None:
            return Entry(Scope(None, self.settings.roots))
        return Entry(Scope(key.name, key.allowed_roots, key.admin, via))

    def leave(self, entry: Entry) -> None:
        self.admission.release(entry.scope.key)

    def minter(self, knock: Knock) -> ApiKey | None:
        """The key asking for a client secret (``POST /v1/realtime/client_secrets``);
        None on an open server. Raises ``Refused``."""
        self._check_where(knock)
        credential = bearer(knock.authorization)
        if not self.settings.require_keys:
            return None
        if credential is not None and credential.startswith(CLIENT_SECRET_PREFIX):
            raise Refused(401, "invalid_api_key",
                          "a client secret cannot mint another; send an API key")
        key, _ = self._identify(credential)
        if key is not None:
            self._rate(self._by_key, key.name, f"key {key.name!r}")
        return key

    def mint(self, key: ApiKey | None, seconds: int) -> tuple[str, int]:
        """A client secret with ``key``'s scope, good for ``seconds``, and when it
        expires (seconds since the epoch)."""
        return self.secrets.mint(key, seconds, self._wall())

    def _check_where(self, knock: Knock) -> None:
        if not self.origins.permit(knock.origin, knock.host):
            raise Refused(403, "origin_not_allowed",
                          f"pages from {knock.origin} may not open sessions here; the "
                          "operator allows origins with --allowed-origin")
        if (self.settings.open_on_loopback and knock.host is not None
                and not is_loopback((split_host(knock.host) or ("",))[0])):
            raise Refused(403, "host_not_allowed",
                          "this server runs without keys on loopback and answers only "
                          "requests for localhost, 127.0.0.1 or [::1]")
        bucket = address_bucket(knock.address, named_by_proxy=knock.named_by_proxy)
        if bucket is not None:
            self._rate(self._by_address, bucket, "this address")

    def _rate(self, limit: RateLimit, name: str, who: str) -> None:
        wait = limit.take(name, self._clock())
        if wait:
            raise Refused(429, "rate_limited",
                          f"{who} opened more than {limit.per_minute} connections in a "
                          "minute; retry later", retry_after=wait)

    def _identify(self, credential: str | None) -> tuple[ApiKey | None, Via]:
        """The key behind ``credential`` (None on an open server). Raises ``Refused``."""
        if not self.settings.require_keys:
            return None, "open"
        if credential is None:
            raise Refused(401, "missing_api_key", f"this server needs an API key: {HOW_TO_SEND}")
        if credential.startswith(CLIENT_SECRET_PREFIX):
            try:
                key = self.secrets.check(credential, self.keyring, self._wall())
            except ExpiredClientSecret as exc:
                raise Refused(401, "client_secret_expired",
                              f"this client secret expired at {exc.expired_at} (seconds "
                              "since the epoch); get a new one from POST "
                              "/v1/realtime/client_secrets") from None
            except InvalidClientSecret:
                key = None
            if key is None:
                raise Refused(401, "invalid_api_key",
                              "this client secret is not valid here (or its key was "
                              "replaced); get a new one from POST /v1/realtime/client_secrets")
            return key, "client_secret"
        key = self.keyring.find(credential) if self.keyring is not None else None
        if key is None:
            raise Refused(401, "invalid_api_key", f"this API key is not valid here; {HOW_TO_SEND}")
        return key, "key"

    # ── admin and metrics ────────────────────────────────────────────────────

    def admin(self, credential: str | None) -> str:
        """Who is asking for an admin route (an admin key's name, or ``admin token``),
        given the Bearer (or Basic password) ``credential``. Raises ``Refused``: 404
        when no admin credential exists at all (the admin API is off)."""
        token = self.settings.admin_token
        if token is None and not any(key.admin for key in self.keyring or ()):
            raise Refused(404, "admin_api_off",
                          "the admin API is off: give a key admin = true in the --api-keys "
                          "file, or set TROUPE_ADMIN_TOKEN (or --admin-token-file)")
        if credential is None:
            raise Refused(401, "admin_key_required",
                          "send Authorization: Bearer <admin key or admin token>")
        if token is not None and _same(credential, token):
            return "admin token"
        key = self.keyring.find(credential) if self.keyring is not None else None
        if key is None:
            raise Refused(401, "invalid_api_key", "not an admin key or the admin token")
        if not key.admin:
            raise Refused(403, "admin_key_required",
                          f"key {key.name!r} is not an admin key (admin = true in the keys file)")
        return key.name

    def metrics(self, credential: str | None) -> None:
        """``/metrics``: open unless a metrics key is set; then that key, an admin
        key or the admin token. Raises ``Refused``."""
        wanted = self.settings.metrics_key
        if wanted is None or (credential is not None and _same(credential, wanted)):
            return
        if credential is None:
            raise Refused(401, "missing_api_key", "send Authorization: Bearer <metrics key>")
        try:
            self.admin(credential)
        except Refused:
            raise Refused(401, "invalid_api_key", "not the metrics key") from None


def _key_without_realtime(subprotocols: Sequence[str]) -> bool:
    """A key offered without ``realtime``: aiohttp would log the offered list (key
    included) as not overlapping ours, so it is refused before that."""
    return SUBPROTOCOL not in subprotocols and any(
        p.startswith(KEY_SUBPROTOCOL) for p in subprotocols)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def startup_problem(*, host: str, keys: bool, no_auth: bool) -> str | None:
    """Why the server must not start as configured, if it must not."""
    if keys and no_auth:
        return ("--no-auth and --api-keys (TROUPE_API_KEYS) contradict each other: keep "
                "the keys, or run open on purpose with --no-auth alone")
    if not keys and not no_auth and not is_loopback(host):
        return (f"not listening on {host} without API keys: anyone who reaches the port "
                "could use the server (and its --llm's account). Give --api-keys FILE "
                "(see the README, 'The front door'), listen on 127.0.0.1, or pass "
                "--no-auth to run open on purpose")
    return None
