"""Conversations that move between replicas behind HAProxy (README "Resume"): real
HAProxy, real replicas sharing a real Redis, started by ``scripts/cluster.py``.

    client ──ws (?resume=TOKEN)──▶ HAProxy ──leastconn over the ready replicas──▶ rN

A replica drained (SIGTERM) or killed outright (SIGKILL) mid-conversation: each of its
clients reconnects through the balancer with its token, lands on another replica and
carries on with the same characters and history; the others never notice.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import SCALE, Realtime

from scripts.cluster import Cluster, find_binary

pytestmark = pytest.mark.skipif(
    find_binary("haproxy") is None or find_binary("redis-server") is None,
    reason="HAProxy and Redis are not installed (apt-get install haproxy redis-server; "
    ".ci/run does)")

ADMIN_TOKEN = "cluster-resume-test-admin-token"


@pytest.fixture
async def cluster(tmp_path: Path, allowed_root: Path) -> AsyncIterator[Cluster]:
    """Three small replicas (the builtin responder, no speech) with Redis. Stopped by
    pid."""
    options = ["--llm", "none", "--stt", "none", "--tts", "none", "--log-level", "WARNING",
               "--allowed-root", str(allowed_root), "--drain-timeout", "1"]
    started = Cluster([options] * 3, tmp_path / "cluster", check_interval="200ms",
                      env={"TROUPE_ADMIN_TOKEN": ADMIN_TOKEN})
    await started.start()
    assert started.redis_url is not None
    yield started
    await started.stop(signal.SIGINT)


class Conversation:
    """A client through the balancer that told its character a number."""

    def __init__(self, session: Realtime, created: dict[str, Any], number: int) -> None:
        self.session, self.created, self.number = session, created, number

    @property
    def id(self) -> str:
        return str(self.created["session"]["id"])


async def connect(http: aiohttp.ClientSession, cluster: Cluster,
                  resume: str | None = None) -> tuple[Realtime, dict[str, Any]]:
    query = "?model=test" + (f"&resume={resume}" if resume else "")
    ws = await http.ws_connect(cluster.ws_url + query, protocols=("realtime",))
    session = Realtime(ws)
    created = await session.receive()
    assert created["type"] == "session.created", created
    return session, created


async def reply(session: Realtime, words: str | None = None) -> str:
    """The character's answer (to ``words``, else to the history as it stands)."""
    if words is not None:
        await session.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": words}]}})
    await session.send({"type": "response.create"})
    text = ""
    while (event := await session.receive())["type"] != "response.done":
        if event["type"] == "response.output_text.delta":
            text += event["delta"]
    return text


async def held_by(http: aiohttp.ClientSession, url: str) -> set[str]:
    async with http.get(f"{url}/v1/sessions",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as answer:
        assert answer.status == 200
        return {row["id"] for row in await answer.json()}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["drained", "killed"])
async def test_a_replicas_conversations_carry_on_elsewhere_through_haproxy(
    how: signal.Signals, cluster: Cluster,
) -> None:
    victim = cluster.replicas[0]
    async with aiohttp.ClientSession() as http:
        talks = []
        for number in range(9):
            session, created = await connect(http, cluster)
            talks.append(Conversation(session, created, number))
            # The builtin responder repeats the last thing it heard: the history.
            assert f"My number is {number}." in await reply(session, f"My number is {number}.")
        on_victim = await held_by(http, victim.url)
        doomed = [t for t in talks if t.id in on_victim]
        spared = [t for t in talks if t.id not in on_victim]
        assert doomed and spared
        await asyncio.sleep(1.5)  # each replica writes changed state within a second

        os.kill(victim.pid, how)
        for talk in doomed:
            closing = await talk.session.ws.receive(timeout=30 * SCALE)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR)
            if how is signal.SIGTERM:
                assert closing.data == aiohttp.WSCloseCode.GOING_AWAY and closing.extra
        await asyncio.wait_for(victim.process.wait(), 30 * SCALE)

        for talk in doomed:  # back through the balancer, with the token
            session, created = await connect(http, cluster, talk.created["resume_token"])
            assert created["resumed_from"] == talk.id
            assert f"My number is {talk.number}." in await reply(session)
            assert await session.names()
            await session.ws.close()
        for talk in spared:  # their conversation went on where it was
            assert f"My number is {talk.number}." in await reply(talk.session)
            await talk.session.ws.close()
