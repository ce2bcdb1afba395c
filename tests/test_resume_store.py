"""The resumer on its own (server/realtime/resume.py): tokens are single use, bound to
their identity and expire; with a real Redis (Debian's redis-server on loopback) a
second replica's resumer takes over a conversation the first one wrote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import needs_redis

from server.realtime import resume
from server.realtime.resume import Resumer, ResumeRefused, Snapshot


class Conversation:
    """What the resumer sees of a live session."""

    def __init__(self, identity: str | None = "alice", resumer: Resumer | None = None) -> None:
        self.identity = identity
        self.history: list[dict[str, str]] = [{"role": "user", "content": "hello"}]
        self.resumer = resumer
        self.token: str | None = None
        self.taken_over = 0

    def snapshot(self) -> Snapshot:
        return Snapshot(session_id="sess_1", identity=self.identity, dialect="ga",
                        directory="default", settings={"voice": "Charles"},
                        history=list(self.history))

    async def take_over(self) -> None:
        self.taken_over += 1
        if self.resumer is not None and self.token is not None:
            await self.resumer.end(self.token, self, keep=True)


class Characters:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[Resumer, Resumer]]:
    first = Resumer(60, resume.RedisStore(redis_url))
    second = Resumer(60, resume.RedisStore(redis_url))
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


async def test_a_kept_conversation_resumes_once_with_its_characters() -> None:
    resumer = Resumer(60)
    session, characters = Conversation(), Characters()
    token = await resumer.issue(session)
    assert token is not None and len(token) >= 32
    assert await resumer.end(token, session, keep=True, characters=characters)
    claimed = await resumer.claim(token, "alice")
    assert claimed.characters is characters and not characters.closed
    assert claimed.snapshot.history == session.history
    with pytest.raises(ResumeRefused) as refused:
        await resumer.claim(token, "alice")
    assert refused.value.reason == "unknown" and "used already" in refused.value.message


async def test_another_identity_is_refused_and_the_owner_still_resumes() -> None:
    resumer = Resumer(60)
    session = Conversation(identity="alice")
    token = await resumer.issue(session)
    assert token is not None
    await resumer.end(token, session, keep=True)
    with pytest.raises(ResumeRefused) as refused:
        await resumer.claim(token, "mallory")
    assert refused.value.reason == "not_yours"
    with pytest.raises(ResumeRefused):
        await resumer.claim(token, None)
    assert (await resumer.claim(token, "alice")).snapshot.identity == "alice"


async def test_nobody_comes_back_the_conversation_and_its_sandbox_go() -> None:
    resumer = Resumer(0.2)
    session, characters = Conversation(), Characters()
    token = await resumer.issue(session)
    assert token is not None
    await resumer.end(token, session, keep=True, characters=characters)
    assert resumer.kept == 1
    for _ in range(100):
        if characters.closed:
            break
        await asyncio.sleep(0.05)
    assert characters.closed and resumer.kept == 0
    with pytest.raises(ResumeRefused):
        await resumer.claim(token, "alice")


async def test_a_conversation_ended_on_purpose_cannot_be_resumed() -> None:
    resumer = Resumer(60)
    session = Conversation()
    token = await resumer.issue(session)
    assert token is not None
    assert not await resumer.end(token, session, keep=False, characters=Characters())
    with pytest.raises(ResumeRefused):
        await resumer.claim(token, "alice")


async def test_a_claim_on_a_live_session_takes_it_over() -> None:
    resumer = Resumer(60)
    session = Conversation(resumer=resumer)
    session.token = await resumer.issue(session)
    assert session.token is not None
    claimed = await resumer.claim(session.token, "alice")
    assert session.taken_over == 1 and claimed.snapshot.history == session.history


async def test_resuming_off_refuses_with_what_to_do() -> None:
    resumer = Resumer(0)
    assert await resumer.issue(Conversation()) is None
    with pytest.raises(ResumeRefused) as refused:
        await resumer.claim("x" * 32, None)
    assert "--resume-window" in refused.value.message


@needs_redis
async def test_another_replica_resumes_what_a_dead_one_wrote(
        replicas: tuple[Resumer, Resumer]) -> None:
    first, second = replicas
    session = Conversation()
    token = await first.issue(session)
    assert token is not None
    session.history.append({"role": "assistant", "content": "Hi, I am Charles."})
    await first.sync()  # what the replica wrote before it was killed outright
    claimed = await second.claim(token, "alice")
    assert claimed.characters is None  # a fresh sandbox loads claimed.snapshot.directory
    assert claimed.snapshot.history == session.history
    with pytest.raises(ResumeRefused):
        await second.claim(token, "alice")
    # The first replica was not dead after all (a half-open connection): it learns
    # that its conversation moved and ends its session instead of writing it back.
    await first.sync()
    for _ in range(100):
        if session.taken_over:
            break
        await asyncio.sleep(0.01)
    assert session.taken_over == 1
    with pytest.raises(ResumeRefused):
        await first.claim(token, "alice")


@needs_redis
async def test_a_kept_conversation_claimed_on_another_replica_is_gone_here(
        replicas: tuple[Resumer, Resumer]) -> None:
    first, second = replicas
    session, characters = Conversation(), Characters()
    token = await first.issue(session)
    assert token is not None
    await first.end(token, session, keep=True, characters=characters)
    await second.claim(token, "alice")
    with pytest.raises(ResumeRefused):
        await first.claim(token, "alice")
    for _ in range(100):
        if characters.closed:
            break
        await asyncio.sleep(0.05)
    assert characters.closed


@needs_redis
async def test_in_redis_another_identity_leaves_the_state_in_place(
        replicas: tuple[Resumer, Resumer]) -> None:
    first, second = replicas
    session = Conversation(identity="alice")
    token = await first.issue(session)
    assert token is not None
    await first.end(token, session, keep=True)
    with pytest.raises(ResumeRefused) as refused:
        await second.claim(token, "mallory")
    assert refused.value.reason == "not_yours"
    assert (await second.claim(token, "alice")).snapshot.identity == "alice"


@needs_redis
async def test_in_redis_the_state_expires_after_the_window(redis_url: str) -> None:
    first = Resumer(0.3, resume.RedisStore(redis_url))
    second = Resumer(0.3, resume.RedisStore(redis_url))
    await first.start()
    await second.start()
    try:
        session = Conversation()
        token = await first.issue(session)
        assert token is not None
        await first.end(token, session, keep=True)
        await asyncio.sleep(1.0)
        with pytest.raises(ResumeRefused):
            await second.claim(token, "alice")
    finally:
        await first.close()
        await second.close()


@needs_redis
async def test_redis_holds_no_usable_token(redis_url: str,
                                           replicas: tuple[Resumer, Resumer]) -> None:
    import redis.asyncio

    first, _ = replicas
    token = await first.issue(Conversation())
    assert token is not None
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key.decode() async for key in client.scan_iter("troupe:resume:*")]
        assert keys and not any(token in key for key in keys)
        for key in keys:
            assert token.encode() not in await client.hget(key, "state")
    finally:
        await client.aclose()
