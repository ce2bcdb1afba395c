"""Where a request comes from: loopback names and addresses, the Host header, and
which browser origins may open sessions (``--allowed-origin``).

    Origin: null or malformed             ─▶ never
    no Origin (an SDK, a script)          ─▶ yes, the key decides
    on the list, ``*``, loopback by default, or the server's own origin ─▶ yes
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """``host`` (a name or address, IPv6 bracketed or not) is this machine's loopback."""
    host = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host[:port]`` of a Host header, lowercased; None when malformed."""
    try:
        parts = urlsplit("//" + value.strip())
        return (parts.hostname or "", parts.port) if parts.hostname else None
    except ValueError:
        return None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin; None for ``null`` or a malformed one."""
    try:
        parts = urlsplit(origin.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def check_origins(values: Sequence[str]) -> str | None:
    """What is wrong with ``--allowed-origin`` values, if anything."""
    for value in values:
        if value != "*" and normalize_origin(value) is None:
            return (f"--allowed-origin {value!r} is not an origin: give scheme://host[:port] "
                    "(http or https, no path), or * for any")
    return None


@dataclass(frozen=True)
class Origins:
    allowed: frozenset[tuple[str, str, int]]
    any: bool
    loopback: bool

    @classmethod
    def of(cls, values: Sequence[str]) -> Origins:
        parsed = {normalize_origin(value) for value in values if value != "*"}
        return cls(frozenset(o for o in parsed if o is not None), "*" in values, not values)

    def permit(self, origin: str | None, host: str | None) -> bool:
        """A browser's ``origin`` may open sessions on the server reached as ``host``.
        No Origin (an SDK, a script): yes, the key decides. ``null`` (sandboxed
        frames, file: pages, some redirects): never."""
        if origin is None:
            return True
        parsed = normalize_origin(origin)
        if parsed is None:
            return False
        scheme, name, port = parsed
        if self.any or parsed in self.allowed or (self.loopback and is_loopback(name)):
            return True
        own = split_host(host) if host else None
        return own is not None and own[0] == name and (own[1] or _DEFAULT_PORTS[scheme]) == port
