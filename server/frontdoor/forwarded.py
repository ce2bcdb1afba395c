"""Who a request comes from behind a reverse proxy: the client a trusted proxy names in
X-Forwarded-For, never one the client wrote itself. No sockets: ``routes.py`` passes
the TCP peer and the header's values.

    peer not a trusted proxy (or none trusted)  ─▶ the peer; X-Forwarded-For ignored
    peer trusted, X-Forwarded-For: a, b, c      ─▶ from the right, the first entry that
                                                   is not a trusted proxy; all are: a
    peer trusted, such an entry not an address  ─▶ the peer, ``Client.malformed`` set

Each proxy appends the address it was reached from, so the entries right of the
client's were written by trusted proxies and those left of it by whoever: a client
may forge any of them, but not the entry its own proxy appends after them. A client a
proxy names is limited by address even on loopback (``limits.address_bucket``).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def network(text: str) -> Network:
    """``ADDR`` or ``ADDR/PREFIX`` (the option ``--trusted-proxy``). Raises
    ``argparse.ArgumentTypeError``, saying what to write instead."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        if "host bits set" in str(exc):
            base = ipaddress.ip_network(text.strip(), strict=False)
            raise argparse.ArgumentTypeError(
                f"{text!r} has bits set past its prefix: write {base} for the network, "
                f"or the address alone") from None
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address or a network (ADDR or ADDR/PREFIX)") from None


def networks(text: str) -> tuple[Network, ...]:
    """Networks separated by commas (TROUPE_TRUSTED_PROXIES). Raises
    ``argparse.ArgumentTypeError``."""
    return tuple(network(part) for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Client:
    """Who a request comes from."""

    address: str | None
    """The client's address: the peer's, or the one a trusted proxy named."""
    named_by_proxy: bool = False
    """``address`` came from X-Forwarded-For (then it is not a trusted proxy)."""
    malformed: str | None = None
    """The X-Forwarded-For entry from a trusted proxy that is not an address (the
    peer's address was used instead)."""


class TrustedProxies:
    """The proxies trusted to name the client, and how often one named none."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)
        self.malformed = 0
        """Headers from a trusted proxy whose client entry was not an address."""

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def client(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> Client:
        """Who a request from ``peer`` (the TCP peer's address) with these
        X-Forwarded-For header values, in their order, comes from."""
        peer_ip = _address(peer) if peer is not None else None
        if peer_ip is None or not self.trusts(peer_ip):
            return Client(peer)
        entries = ",".join(forwarded_for).split(",")
        if entries == [""]:  # no header: a request of the proxy's own (a health check)
            return Client(peer)
        leftmost: Address | None = None
        for entry in reversed(entries):
            ip = _address(entry)
            if ip is None:
                self.malformed += 1
                return Client(peer, malformed=entry.strip()[:60])
            if not self.trusts(ip):
                return Client(str(ip), named_by_proxy=True)
            leftmost = ip
        # Every entry is a trusted proxy: the request began on one of them.
        return Client(str(leftmost) if leftmost is not None else peer)


def _address(text: str) -> Address | None:
    """An X-Forwarded-For entry's address (IPv4-mapped IPv6 as IPv4); a port after it
    (``192.0.2.1:4711``, ``[2001:db8::1]:4711``) is dropped. None if it is not one."""
    text = text.strip()
    if text.startswith("["):
        host, closed, port = text[1:].partition("]")
        if not closed or port and not (port[0] == ":" and port[1:].isdigit()):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
