"""The client behind a proxy (``--trusted-proxy``, server/frontdoor/forwarded.py): the
address choice as pure tests, then real HAProxy in front of a real replica, clients
connecting from their own loopback addresses, some of them forging X-Forwarded-For.

    127.0.0.2 ─┐
    127.0.0.3 ─┼─▶ HAProxy 127.0.0.1 (option forwardfor) ─▶ r1 --trusted-proxy 127.0.0.1
    127.0.0.4 ─┘                                              --handshake-rate-per-address 3
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from scripts.cluster import Cluster, find_binary
from server.app import create_app
from server.config import Config, parse
from server.frontdoor.auth import FrontDoor, Knock, Refused, Settings
from server.frontdoor.forwarded import TrustedProxies, network, networks
from server.frontdoor.limits import address_bucket

RATE = 3
"""Handshakes a minute per address in the servers below."""

# ── the choice of address, pure ──────────────────────────────────────────────

PROXIES = TrustedProxies(networks("127.0.0.1, 10.0.0.0/8, 2001:db8:a::/48"))


@pytest.mark.parametrize(("peer", "forwarded_for", "client", "named"), [
    # Not from a trusted proxy: the header is whatever the client wrote, ignored.
    ("192.0.2.7", ["198.51.100.1"], "192.0.2.7", False),
    ("127.0.0.2", ["198.51.100.1, 127.0.0.1"], "127.0.0.2", False),
    # From a trusted proxy: the right-most entry that is not a trusted proxy.
    ("127.0.0.1", ["198.51.100.1"], "198.51.100.1", True),
    ("127.0.0.1", ["203.0.113.9, 198.51.100.1"], "198.51.100.1", True),
    ("10.1.2.3", ["198.51.100.1, 10.9.9.9, 127.0.0.1"], "198.51.100.1", True),
    ("127.0.0.1", ["203.0.113.9", "198.51.100.1"], "198.51.100.1", True),  # two lines
    ("127.0.0.1", [" 198.51.100.1 , 10.0.0.5 "], "198.51.100.1", True),
    ("127.0.0.1", ["127.0.0.2"], "127.0.0.2", True),
    ("127.0.0.1", ["198.51.100.1:4711"], "198.51.100.1", True),
    ("127.0.0.1", ["[2001:db8:b::1]:4711"], "2001:db8:b::1", True),
    ("127.0.0.1", ["2001:db8:b::1"], "2001:db8:b::1", True),
    ("::ffff:127.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1", True),
    ("2001:db8:a::5", ["198.51.100.1"], "198.51.100.1", True),
    # Every entry a trusted proxy: the request began on one; the left-most.
    ("127.0.0.1", ["10.0.0.9, 127.0.0.1"], "10.0.0.9", False),
    # No header (a proxy's own request), or no peer address at all.
    ("127.0.0.1", [], "127.0.0.1", False),
    (None, ["198.51.100.1"], None, False),
    ("/run/troupe.sock", ["198.51.100.1"], "/run/troupe.sock", False),
    # Only what is left of the client is forged, and never read: no complaint.
    ("127.0.0.1", ["unknown, 198.51.100.1"], "198.51.100.1", True),
])
def test_the_client_is_the_right_most_address_no_trusted_proxy_holds(
    peer: str | None, forwarded_for: list[str], client: str | None, named: bool
) -> None:
    found = PROXIES.client(peer, forwarded_for)

    assert (found.address, found.named_by_proxy, found.malformed) == (client, named, None)


@pytest.mark.parametrize("forwarded_for", [
    ["unknown"], ["198.51.100.1, "], ["198.51.100.1,,10.0.0.1"], ["198.51.100.1:http"],
    ["[2001:db8::1"], ["198.51.100.1/24"], [""], ["", "198.51.100.1", "bogus"],
])
def test_a_malformed_header_from_a_trusted_proxy_falls_back_to_the_peer(
    forwarded_for: list[str],
) -> None:
    proxies = TrustedProxies(PROXIES.networks)

    found = proxies.client("127.0.0.1", forwarded_for)

    if forwarded_for == [""]:  # an empty header is no header
        assert (found.address, found.malformed, proxies.malformed) == ("127.0.0.1", None, 0)
        return
    assert (found.address, found.named_by_proxy) == ("127.0.0.1", False)
    assert found.malformed is not None and proxies.malformed == 1


def test_nothing_is_trusted_by_default() -> None:
    assert TrustedProxies().client("127.0.0.1", ["198.51.100.1"]).address == "127.0.0.1"
    assert parse([], {}).trusted_proxies == ()


def test_the_option_repeats_and_the_environment_separates_by_commas() -> None:
    given = parse(["--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.0.0.0/8"],
                  {"TROUPE_TRUSTED_PROXIES": "192.0.2.1"})
    from_env = parse([], {"TROUPE_TRUSTED_PROXIES": "127.0.0.1, fd00::/8"})

    assert given.trusted_proxies == (network("127.0.0.1"), network("10.0.0.0/8"))
    assert from_env.trusted_proxies == (ipaddress.ip_network("127.0.0.1"),
                                        ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(("argv", "environ"), [
    (["--trusted-proxy", "10.1.2.3/8"], {}),
    (["--trusted-proxy", "haproxy.internal"], {}),
    ([], {"TROUPE_TRUSTED_PROXIES": "127.0.0.1,*"}),
])
def test_a_trusted_proxy_that_is_not_a_network_stops_the_start(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(argv, environ)

    assert exited.value.code == 2
    assert "trusted" in capsys.readouterr().err.lower()
    with pytest.raises(argparse.ArgumentTypeError, match="10.0.0.0/8"):
        network("10.1.2.3/8")


def test_a_client_a_proxy_names_is_limited_even_on_loopback() -> None:
    door = FrontDoor(Settings(require_keys=False, open_on_loopback=False,
                              per_address_per_minute=2), None)
    named = Knock(address="127.0.0.2", named_by_proxy=True)
    for _ in range(2):
        door.leave(door.enter(named))

    with pytest.raises(Refused) as over:
        door.enter(named)

    assert over.value.code == "rate_limited"
    for _ in range(5):  # the same address as the peer: a local process, not limited
        door.leave(door.enter(Knock(address="127.0.0.2")))
    assert address_bucket("127.0.0.2") is None
    assert address_bucket("127.0.0.2", named_by_proxy=True) == "127.0.0.2"


# ── a real server, in this process ───────────────────────────────────────────


def _outside_address() -> str | None:
    """This machine's IPv4 address on its default route, if it has one (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # nothing is sent
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def secrets(http: aiohttp.ClientSession | TestClient, url: str,
                  forged: Sequence[str]) -> list[int]:
    """The statuses of one client-secret request per ``forged`` X-Forwarded-For."""
    statuses = []
    for value in forged:
        async with http.post(url, json={}, headers={"X-Forwarded-For": value}) as answer:
            statuses.append(answer.status)
    return statuses


async def test_a_forged_header_sent_directly_is_ignored(
    aiohttp_client: Any, config: Config
) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("no address beside loopback to connect from")
    app = create_app(dataclasses.replace(
        config, host=address, no_auth=True, handshake_rate_per_address=RATE,
        trusted_proxies=networks("127.0.0.1")))
    server: TestClient = await aiohttp_client(TestServer(app, host=address))
    url = f"http://{address}:{server.port}/v1/realtime/client_secrets"
    # Each request claims another client, or the trusted proxy, or loopback.
    forged = ["198.51.100.1", "127.0.0.1", "198.51.100.2", "::1", "198.51.100.3"]

    async with aiohttp.ClientSession() as http:
        assert await secrets(http, url, forged) == [200] * RATE + [429] * 2


async def test_a_malformed_header_is_logged_once_and_the_proxy_named_in_logs(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="server.frontdoor.routes")
    server: TestClient = await make_server(handshake_rate_per_address=RATE,
                                           trusted_proxies=networks("127.0.0.1"))

    # From the trusted proxy (this test, on 127.0.0.1): the peer, loopback, not limited.
    assert await secrets(server, "/v1/realtime/client_secrets",
                         ["unknown", "198.51.100.1, ", "-"] * 2) == [200] * 6
    assert await secrets(server, "/v1/realtime/client_secrets",
                         ["127.0.0.5"] * (RATE + 1)) == [200] * RATE + [429]

    warned = [r for r in caplog.records
              if r.name == "server.frontdoor.routes" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "X-Forwarded-For" in warned[0].getMessage()
    assert "'unknown'" in warned[0].getMessage()
    assert any("from 127.0.0.5 via 127.0.0.1 refused: 429" in r.getMessage()
               for r in caplog.records)


# ── real HAProxy, a real replica ─────────────────────────────────────────────

needs_haproxy = pytest.mark.skipif(
    find_binary("haproxy") is None,
    reason="HAProxy is not installed (apt-get install haproxy; .ci/run does)")


@pytest.fixture
async def balancer(tmp_path: Path, allowed_root: Path) -> AsyncIterator[Cluster]:
    """One replica behind HAProxy, started as ``make cluster`` does (so trusting it)."""
    replica = ["--llm", "none", "--stt", "none", "--tts", "none", "--log-level", "WARNING",
               "--allowed-root", str(allowed_root), "--handshake-rate-per-address", str(RATE)]
    async with Cluster([replica], tmp_path / "cluster", check_interval="200ms",
                       redis=False) as cluster:
        yield cluster


async def handshakes(cluster: Cluster, source: str, times: int,
                     forged: Sequence[str] = ()) -> list[int]:
    """The statuses of ``times`` WebSocket handshakes through the balancer from the
    local address ``source``, the i-th with the X-Forwarded-For ``forged[i]``."""
    statuses = []
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        for attempt in range(times):
            headers = {"X-Forwarded-For": forged[attempt]} if forged else {}
            try:
                ws = await http.ws_connect(f"{cluster.ws_url}?model=test",
                                           protocols=("realtime",), headers=headers)
            except aiohttp.WSServerHandshakeError as refused:
                statuses.append(refused.status)
            else:
                statuses.append(101)
                await ws.close()
    return statuses


@needs_haproxy
async def test_clients_behind_haproxy_are_limited_each_on_its_own(balancer: Cluster) -> None:
    limited = [101] * RATE + [429]

    assert await handshakes(balancer, "127.0.0.2", RATE + 1) == limited
    assert await handshakes(balancer, "127.0.0.3", RATE + 1) == limited
    # HAProxy's own address is trusted, so a client there is a local process, as a
    # load test against `make cluster` is: not limited.
    assert await handshakes(balancer, "127.0.0.1", RATE + 2) == [101] * (RATE + 2)


@needs_haproxy
async def test_a_header_forged_through_haproxy_does_not_escape_the_limit(
    balancer: Cluster,
) -> None:
    forged = ["198.51.100.1", "127.0.0.1", "198.51.100.2, 127.0.0.1", "::1", "garbage"]

    assert await handshakes(balancer, "127.0.0.4", 5, forged) == [101] * RATE + [429] * 2
    assert await handshakes(balancer, "127.0.0.5", 1) == [101]
