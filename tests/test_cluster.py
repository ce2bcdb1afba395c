"""Replicas behind HAProxy (README: Past one process): real HAProxy, real replicas and
Redis on loopback, started by ``scripts/cluster.py`` as ``make cluster`` does.

    client ──ws──▶ HAProxy 127.0.0.1 (balance leastconn; /v1/ready checked every 200 ms;
                   a 503 before the handshake retried on another replica)
                     ├──▶ r1  python -m server (no backends: the builtin responder)
                     ├──▶ r2
                     └──▶ r3

Each replica is asked directly how many sessions it holds (/v1/ready) and which
(/v1/sessions, with the admin token the cluster's replicas share).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import SCALE, Realtime, character_source, write_directory

from scripts.cluster import Cluster, Replica, find_binary
from scripts.measure import alive, descendants

pytestmark = pytest.mark.skipif(
    find_binary("haproxy") is None,
    reason="HAProxy is not installed (apt-get install haproxy redis-server; .ci/run does)")

ADMIN_TOKEN = "cluster-test-admin-token"
SMALL = ("--llm", "none", "--stt", "none", "--tts", "none", "--log-level", "WARNING")
StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(tmp_path: Path, allowed_root: Path) -> AsyncIterator[StartCluster]:
    """Start a cluster: one replica per argument, each a list of its own extra options
    (on top of small servers: no backends, ``--allowed-root``). Stopped by pid."""
    clusters: list[Cluster] = []

    async def start(*replicas: Sequence[str]) -> Cluster:
        cluster = Cluster(
            [[*SMALL, "--allowed-root", str(allowed_root), *extra] for extra in replicas],
            tmp_path / f"cluster{len(clusters)}", check_interval="200ms",
            env={"TROUPE_ADMIN_TOKEN": ADMIN_TOKEN})
        clusters.append(cluster)
        await cluster.start()
        return cluster

    yield start
    for cluster in clusters:
        await cluster.stop(signal.SIGINT)


class Live(Realtime):
    """A session opened through the balancer, with the id its replica gave it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, id: str) -> None:
        super().__init__(ws)
        self.id = id


async def open_session(http: aiohttp.ClientSession, cluster: Cluster) -> Live:
    ws = await http.ws_connect(f"{cluster.ws_url}?model=test", protocols=("realtime",))
    created = await Realtime(ws).receive()
    assert created["type"] == "session.created", created
    return Live(ws, created["session"]["id"])


async def ready(http: aiohttp.ClientSession, replica: Replica) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{replica.url}/v1/ready") as answer:
        body: dict[str, Any] = await answer.json()
        return answer.status, body


async def session_ids(http: aiohttp.ClientSession, replica: Replica) -> set[str]:
    async with http.get(f"{replica.url}/v1/sessions",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as answer:
        assert answer.status == 200
        return {row["id"] for row in await answer.json()}


async def where(http: aiohttp.ClientSession, cluster: Cluster,
                sessions: list[Live]) -> dict[str, list[Live]]:
    """Each replica's name → the sessions it holds."""
    held = {replica.name: await session_ids(http, replica) for replica in cluster.replicas}
    return {name: [s for s in sessions if s.id in ids] for name, ids in held.items()}


async def test_sixty_sessions_spread_evenly_and_reload_and_list_through_the_balancer(
    start_cluster: StartCluster, allowed_root: Path
) -> None:
    cluster = await start_cluster([], [], [])
    directory = write_directory(allowed_root, "duo", {
        "ada.py": character_source("Ada"), "bob.py": character_source("Bob")})
    async with aiohttp.ClientSession() as http:
        sessions: list[Live] = []
        for _ in range(15):  # four at a time, as clients arrive
            sessions += await asyncio.gather(*(open_session(http, cluster) for _ in range(4)))

        held = [(await ready(http, replica))[1]["sessions"] for replica in cluster.replicas]
        assert sum(held) == 60
        assert all(16 <= count <= 24 for count in held), held

        placed = await where(http, cluster, sessions)
        for name, on_replica in placed.items():
            reloaded = await on_replica[0].reload(directory)
            assert reloaded["type"] == "session.characters.reloaded", (name, reloaded)
            assert sorted(await on_replica[0].names()) == ["Ada", "Bob"]
        default = set(await sessions[-1].names())
        assert default and not default & {"Ada", "Bob"}
        for session in sessions:
            assert await session.names()


async def test_a_full_replica_turns_not_ready_and_sessions_go_to_the_others(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(["--max-sessions", "3"], ["--max-sessions", "9"],
                                  ["--max-sessions", "9"])
    small, *others = cluster.replicas
    async with aiohttp.ClientSession() as http:
        # Capacity is 21: every one of 21 sessions gets in, none refused.
        sessions = [await open_session(http, cluster) for _ in range(21)]

        status, body = await ready(http, small)
        assert status == 503 and body["reasons"] == ["full"]
        assert [(await ready(http, r))[1]["sessions"] for r in cluster.replicas] == [3, 9, 9]

        with pytest.raises(aiohttp.WSServerHandshakeError) as full:  # refused, not hung
            await http.ws_connect(f"{cluster.ws_url}?model=test", protocols=("realtime",))
        assert full.value.status == 503
        assert full.value.headers is not None and full.value.headers["Retry-After"]

        freed = (await where(http, cluster, sessions))[others[0].name][0]
        await freed.ws.close()
        for _ in range(int(100 * SCALE)):  # as a client told Retry-After would
            try:
                await open_session(http, cluster)
                break
            except aiohttp.WSServerHandshakeError as refused:
                assert refused.status == 503
                await asyncio.sleep(0.1)
        assert [(await ready(http, r))[1]["sessions"] for r in cluster.replicas] == [3, 9, 9]


async def test_sigterm_to_one_replica_closes_its_sessions_with_1001_and_only_those(
    start_cluster: StartCluster,
) -> None:
    drain = 2 * SCALE
    cluster = await start_cluster(*[["--drain-timeout", f"{drain:g}"]] * 3)
    victim = cluster.replicas[1]
    async with aiohttp.ClientSession() as http:
        sessions = [await open_session(http, cluster) for _ in range(9)]
        placed = await where(http, cluster, sessions)
        doomed = placed[victim.name]
        spared = [s for s in sessions if s not in doomed]
        assert len(doomed) == 3 and len(spared) == 6
        for session in sessions:  # mid-conversation
            assert await session.names()
        below = descendants(victim.pid)
        assert below  # its zygote and sandboxes

        os.kill(victim.pid, signal.SIGTERM)

        arrived = await open_session(http, cluster)  # while it drains: on another one
        assert arrived.id not in await session_ids(http, victim)
        for session in doomed:
            closing = await session.ws.receive(timeout=drain + 30 * SCALE)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
            assert closing.extra  # a reason
        assert await asyncio.wait_for(victim.process.wait(), 30 * SCALE) == 0
        for session in [*spared, arrived]:  # nothing but the answer to their own request
            assert await session.names()
        for _ in range(int(100 * SCALE)):
            if not any(alive(pid, found.started) for pid, found in below.items()):
                break
            await asyncio.sleep(0.05)
        assert not any(alive(pid, found.started) for pid, found in below.items())
