"""API keys and the short-lived client secrets minted from them (DESIGN.md §9).

    keys file (TOML, --api-keys) ──load()──▶ Keyring ──find(secret)──▶ ApiKey
    ApiKey ──ClientSecrets.mint()──▶ "ek_…" ──ClientSecrets.check()──▶ the same ApiKey

The keys file holds one ``[[key]]`` table per key::

    [[key]]
    name = "alice"                              # shown in the log and /v1/sessions
    secret = "sk-alice-…"                       # or secret_sha256 = "<64 hex digits>"
    allowed_roots = ["/srv/characters/alice"]   # what its sessions may load; default none
    max_sessions = 20                           # default: no limit of its own
    admin = false                               # the admin routes

Only the SHA-256 of each secret is kept in memory, and a key is found by the digest of
what a client presents, so no comparison runs over the secret itself. Nothing here puts
a secret, or a digest, in an exception message or a ``repr``.

A client secret is stateless: ``ek_`` and, base64url, its expiry, an id of its key and
a MAC over both and the key's digest, under a signing key (random per process unless
configured, so replicas can share one). It stays good until it expires, for as many
sessions as its key allows; replacing or removing the key (a reload of the file)
voids every secret minted from it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import stat
import struct
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIENT_SECRET_PREFIX = "ek_"
MIN_SECRET_SECONDS, MAX_SECRET_SECONDS, DEFAULT_SECRET_SECONDS = 10, 7200, 600
"""``expires_after.seconds`` of a client secret, as OpenAI's."""
MIN_SECRET_LENGTH = 16
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
"""RFC 7230 token characters: a key must fit in the subprotocol a browser sends."""
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_FIELDS = frozenset({"name", "secret", "secret_sha256", "allowed_roots", "max_sessions",
                     "admin"})
_MAX_FILE_BYTES = 1024 * 1024


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file, the key and the field
    (never a secret)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)
    """SHA-256 of the secret."""
    allowed_roots: tuple[Path, ...] = ()
    max_sessions: int | None = None
    admin: bool = False


@dataclass(frozen=True)
class Keyring:
    """The keys of one reading of the file."""

    keys: tuple[ApiKey, ...]
    plaintext: bool = False
    """Some key is given by its ``secret`` rather than its ``secret_sha256``."""
    _by_digest: dict[bytes, ApiKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_digest", {key.digest: key for key in self.keys})

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, secret: str) -> ApiKey | None:
        """The key whose secret is ``secret``, if any."""
        return self._by_digest.get(digest(secret))

    def named(self, name: str) -> ApiKey | None:
        return next((key for key in self.keys if key.name == name), None)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def load(path: Path) -> Keyring:
    """Read and check the keys file. Raises ``KeysFileError``."""
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeysFileError(f"keys file {path}: cannot read it ({exc.strerror or exc})") \
            from None
    if len(data) > _MAX_FILE_BYTES:
        raise KeysFileError(f"keys file {path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # tomllib says where (line, column), never what the line holds.
        raise KeysFileError(f"keys file {path}: not valid TOML: {exc}") from None
    return parse(document, str(path))


def parse(document: dict[str, Any], source: str = "keys file") -> Keyring:
    """The keys of an already decoded TOML ``document``. Raises ``KeysFileError``."""
    extra = set(document) - {"key"}
    if extra:
        raise KeysFileError(f"{source}: unknown top-level entries {sorted(extra)}; each key "
                            "is a [[key]] table")
    tables = document.get("key", [])
    if not isinstance(tables, list) or not tables:
        raise KeysFileError(f"{source}: holds no [[key]] table; add one per key (name, "
                            "secret or secret_sha256, allowed_roots, max_sessions, admin)")
    keys = [_key(table, f"{source}: key #{number}")
            for number, table in enumerate(tables, 1)]
    names, digests = set(), set()
    for key in keys:
        if key.name in names:
            raise KeysFileError(f"{source}: two keys are named {key.name!r}; names are unique")
        if key.digest in digests:
            raise KeysFileError(f"{source}: key {key.name!r} has the same secret as another "
                                "key; give each key its own")
        names.add(key.name)
        digests.add(key.digest)
    plaintext = any(isinstance(t, dict) and "secret" in t for t in tables)
    return Keyring(tuple(keys), plaintext)


def _key(table: Any, where: str) -> ApiKey:
    if not isinstance(table, dict):
        raise KeysFileError(f"{where}: not a table")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeysFileError(f"{where}: name must be 1-64 letters, digits or _.@-")
    where = f"{where} ({name!r})"
    unknown = set(table) - _FIELDS
    if unknown:
        raise KeysFileError(f"{where}: unknown fields {sorted(unknown)} (known: "
                            f"{', '.join(sorted(_FIELDS))})")
    roots = table.get("allowed_roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise KeysFileError(f"{where}: allowed_roots must be a list of absolute paths")
    if not all(Path(root).is_absolute() for root in roots):
        raise KeysFileError(f"{where}: allowed_roots must be absolute paths")
    limit = table.get("max_sessions")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise KeysFileError(f"{where}: max_sessions must be a whole number of at least 1")
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise KeysFileError(f"{where}: admin must be true or false")
    return ApiKey(name=name, digest=_secret_digest(table, where),
                  allowed_roots=tuple(Path(root).resolve() for root in roots),
                  max_sessions=limit, admin=admin)


def _secret_digest(table: dict[str, Any], where: str) -> bytes:
    secret, hashed = table.get("secret"), table.get("secret_sha256")
    if (secret is None) == (hashed is None):
        raise KeysFileError(f"{where}: give exactly one of secret and secret_sha256")
    if hashed is not None:
        if not isinstance(hashed, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", hashed):
            raise KeysFileError(f"{where}: secret_sha256 must be 64 hex digits (sha256sum)")
        return bytes.fromhex(hashed)
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise KeysFileError(f"{where}: secret must be at least {MIN_SECRET_LENGTH} "
                            "characters (python -c 'import secrets; "
                            "print(\"sk-\" + secrets.token_urlsafe(32))')")
    if not _TOKEN.fullmatch(secret) or secret.startswith(CLIENT_SECRET_PREFIX):
        raise KeysFileError(f"{where}: secret may hold letters, digits and !#$%&'*+.^_`|~- "
                            f"only (browsers send it as a subprotocol), and not start "
                            f"with {CLIENT_SECRET_PREFIX}")
    return digest(secret)


def readable_by_others(path: Path) -> bool:
    """Whether users other than the file's owner may read ``path``."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


# ── client secrets ───────────────────────────────────────────────────────────

_PAYLOAD = struct.Struct(">Q8s8s")  # expires_at, key id, nonce
_MAC_BYTES = 16
_ANONYMOUS = b"\0" * 8
"""The key id of a secret minted where no keys are configured (it opens nothing more
than no secret does)."""


class InvalidClientSecret(ValueError):
    """Not a secret this server minted, or minted from a key since changed."""


class ExpiredClientSecret(ValueError):
    def __init__(self, expired_at: int) -> None:
        super().__init__(f"expired at {expired_at}")
        self.expired_at = expired_at


class ClientSecrets:
    """Mints and checks ``ek_`` secrets under one signing key."""

    def __init__(self, signing_key: bytes | None = None) -> None:
        self._signing_key = signing_key or secrets.token_bytes(32)
        self._ids: tuple[Keyring | None, dict[bytes, ApiKey]] = (None, {})

    def mint(self, key: ApiKey | None, seconds: int, now: float) -> tuple[str, int]:
        """A secret for ``key`` (None: no keys are configured) and when it expires, in
        seconds since the epoch."""
        expires_at = int(now) + seconds
        key_id = self._key_id(key) if key is not None else _ANONYMOUS
        payload = _PAYLOAD.pack(expires_at, key_id, secrets.token_bytes(8))
        mac = self._mac(payload, key.digest if key is not None else b"")
        value = base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()
        return CLIENT_SECRET_PREFIX + value, expires_at

    def check(self, value: str, keyring: Keyring | None, now: float) -> ApiKey | None:
        """The key ``value`` was minted from (None for an anonymous one). Raises
        ``InvalidClientSecret`` or ``ExpiredClientSecret``."""
        raw = value.removeprefix(CLIENT_SECRET_PREFIX)
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except ValueError:
            raise InvalidClientSecret("not base64url") from None
        if len(data) != _PAYLOAD.size + _MAC_BYTES:
            raise InvalidClientSecret("wrong length")
        payload, mac = data[:_PAYLOAD.size], data[_PAYLOAD.size:]
        expires_at, key_id, _ = _PAYLOAD.unpack(payload)
        key = None if key_id == _ANONYMOUS else self._by_id(keyring).get(key_id)
        if key is None and key_id != _ANONYMOUS:
            raise InvalidClientSecret("its key is gone")
        expected = self._mac(payload, key.digest if key is not None else b"")
        if not hmac.compare_digest(mac, expected):
            raise InvalidClientSecret("bad signature")
        if now >= expires_at:
            raise ExpiredClientSecret(expires_at)
        return key

    def _mac(self, payload: bytes, key_digest: bytes) -> bytes:
        return hmac.digest(self._signing_key, b"troupe-ek-1" + payload + key_digest,
                           "sha256")[:_MAC_BYTES]

    def _key_id(self, key: ApiKey) -> bytes:
        return hmac.digest(self._signing_key, b"troupe-key-id" + key.digest, "sha256")[:8]

    def _by_id(self, keyring: Keyring | None) -> dict[bytes, ApiKey]:
        cached_for, ids = self._ids
        if cached_for is not keyring:
            ids = {self._key_id(key): key for key in keyring or ()}
            self._ids = (keyring, ids)
        return ids
