"""How often and how many: handshakes per address and per key (token buckets), and
the live sessions in all and per key (``Admission``, which also refuses while the
server drains).

    RateLimit.take(name, now)   ─▶ 0, or the seconds until ``name`` may go ahead
    address_bucket(address)     ─▶ the name an address is limited under (IPv6: its /64;
                                   loopback peers: none, not limited)
    Admission.admit(key, limit) ─▶ a slot, or Refused 503 / 429; release() gives it back
"""

from __future__ import annotations

import ipaddress

from .keys import ApiKey
from .refusals import Refused

BUSY_RETRY_AFTER = 5
"""Seconds a client is told to wait when a session limit refuses it."""


class RateLimit:
    """A token bucket per name: ``per_minute`` handshakes, as a burst or spread out.
    At most ``max_tracked`` names are remembered (full buckets go first, then the
    least recently used), so a scan from many addresses cannot grow it."""

    def __init__(self, per_minute: int, max_tracked: int = 10_000) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60
        self._max_tracked = max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, at)

    def take(self, name: str, now: float) -> float:
        """0 when ``name`` may go ahead now (a token is taken), else the seconds until
        it may."""
        if self.per_minute <= 0:
            return 0.0
        tokens, at = self._buckets.pop(name, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * self._rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self._rate
        self._buckets[name] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self._buckets) > self._max_tracked:
            self._forget(now)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)

    def _forget(self, now: float) -> None:
        full = [name for name, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self._rate >= self.per_minute]
        for name in full:
            del self._buckets[name]
        while len(self._buckets) > self._max_tracked:
            del self._buckets[next(iter(self._buckets))]


def address_bucket(address: str | None, *, named_by_proxy: bool = False) -> str | None:
    """The name an address is rate-limited under: IPv4 as is, IPv6 by its /64 (one
    host is given a whole /64); None for unknown peers and loopback ones (not
    limited), but a client a trusted proxy named is limited even on loopback."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_loopback and not named_by_proxy:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


class Admission:
    """Live sessions, in all and per key: a slot is taken before the handshake."""

    def __init__(self) -> None:
        self.total = 0
        self.per_key: dict[str, int] = {}
        self.draining = False
        """Set on SIGTERM: every new session is refused (503), live ones go on."""

    def admit(self, key: ApiKey | None, limit: int) -> None:
        """Take a slot. Raises ``Refused`` (503 at ``limit`` or while draining, 429 at
        the key's own)."""
        if self.draining:
            raise Refused(503, "server_draining",
                          "this server is shutting down and takes no new sessions; "
                          "connect again (a load balancer sends you to another replica)",
                          retry_after=BUSY_RETRY_AFTER)
        if self.total >= limit:
            raise Refused(503, "server_full",
                          f"the server is full ({limit} sessions, --max-sessions); retry later",
                          retry_after=BUSY_RETRY_AFTER)
        if key is not None and key.max_sessions is not None:
            live = self.per_key.get(key.name, 0)
            if live >= key.max_sessions:
                raise Refused(429, "too_many_sessions",
                              f"key {key.name!r} has {live} live sessions, its limit "
                              "(max_sessions in the keys file); close one or retry later",
                              retry_after=BUSY_RETRY_AFTER)
        self.total += 1
        if key is not None:
            self.per_key[key.name] = self.per_key.get(key.name, 0) + 1

    def release(self, key: str | None) -> None:
        self.total -= 1
        if key is not None:
            left = self.per_key[key] - 1
            if left:
                self.per_key[key] = left
            else:
                del self.per_key[key]
