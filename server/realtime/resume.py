"""Conversations that outlive their connection (README "Resume").

    Session ──issue()──▶ token (session.created / session.updated: ``resume_token``)
    every SYNC_PERIOD s: each live session's Snapshot ──▶ the store, when it changed
                         (with --state-url: Redis, so any replica can resume it)
    the connection drops, or the server drains ──end(keep=True)──▶ kept for
                         --resume-window, here with its sandbox still running
    GET /v1/realtime?resume=TOKEN ──claim()──▶ Claimed(snapshot, the live set if it
                         was kept here) or Refused (used, expired, another key's)

A token is 192 random bits, shown once to its client and stored only as its SHA-256
(a dump of Redis holds no usable token). It is good once: a claim takes the state and
removes it, in one step (a Lua script in Redis), and the resumed session gets a new
token. It is bound to the identity that opened the session (its API key's name, or
none on an open server): another key's claim is refused and leaves the state in
place. When nobody comes back, the state expires: a timer here, ``PEXPIRE`` in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

log = logging.getLogger(__name__)

SYNC_PERIOD = 1.0
"""Seconds between writes of the live sessions' changed state to Redis: what a
replica killed outright can lose of a conversation."""
TOKEN_BYTES = 24
_PREFIX = "troupe:resume:"


class Snapshot(msgspec.Struct, kw_only=True):
    """What a resumed session restores: everything but the connection and the sandbox."""

    session_id: str
    identity: str | None
    """The API key's name that opened the session; None on an open server."""
    dialect: str
    directory: str | None
    """The character directory loaded, as the client asked for it (None: none yet)."""
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    greeted: bool = False


class Resumable(Protocol):
    """What the resumer needs of a live session."""

    def snapshot(self) -> Snapshot: ...

    def take_over(self) -> Awaitable[None]:
        """End the session because its token was claimed on another connection;
        returns once it ended (and called ``Resumer.end``)."""


class Closeable(Protocol):
    async def close(self) -> None: ...


@dataclass
class Claimed:
    snapshot: Snapshot
    characters: Any | None
    """The session's character set, still loaded, when it was kept on this replica;
    None: load ``snapshot.directory`` into a new sandbox."""


class ResumeRefused(Exception):
    """A claim that cannot be honoured; ``reason`` is ``unknown`` or ``not_yours``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def key_of(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


# ── the shared store ─────────────────────────────────────────────────────────

_PUT = """
if ARGV[3] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'identity', ARGV[1], 'state', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
"""Create (ARGV[3] = 1) or update a session's state; an update of a state claimed or
expired meanwhile does nothing and answers 0 (it must not come back to life)."""

_TAKE = """
local identity = redis.call('HGET', KEYS[1], 'identity')
if not identity then return {0} end
if identity ~= ARGV[1] then return {1} end
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('DEL', KEYS[1])
return {2, state}
"""
"""Claim: {0} unknown, {1} another identity's (left in place), {2, state} taken."""


class RedisStore:
    """Session state in Redis, shared by the replicas (``--state-url``)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio  # only servers given --state-url need it loaded

        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=5,
                                                   socket_connect_timeout=5)
        self._put = self._redis.register_script(_PUT)
        self._take = self._redis.register_script(_TAKE)

    async def check(self) -> None:
        """Fails with the reason when Redis cannot be reached."""
        await self._redis.ping()

    async def put(self, key: str, identity: str | None, state: bytes, ttl: float,
                  *, create: bool) -> bool:
        done = await self._put(keys=[key], args=[identity or "", state, int(create),
                                                 int(ttl * 1000)])
        return bool(done)

    async def touch(self, keys: list[str], ttl: float) -> list[str]:
        """Extend the keys' expiry; returns those that are gone."""
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(key, int(ttl * 1000))
            extended = await pipe.execute()
        return [key for key, done in zip(keys, extended, strict=True) if not done]

    async def take(self, key: str, identity: str | None) -> bytes | None:
        answer = await self._take(keys=[key], args=[identity or ""])
        if answer[0] == 1:
            raise _not_yours()
        return bytes(answer[1]) if answer[0] == 2 else None

    async def forget(self, key: str) -> None:
        await self._redis.delete(key)

    async def close(self) -> None:
        await self._redis.aclose()


# ── the resumer ──────────────────────────────────────────────────────────────


@dataclass
class _Kept:
    snapshot: Snapshot
    characters: Closeable | None
    expiry: asyncio.TimerHandle


class Resumer:
    """The live sessions' tokens, the sessions kept after their connection ended, and
    the shared store when there is one. ``window`` 0 turns resuming off."""

    def __init__(self, window: float, store: RedisStore | None = None) -> None:
        self.window = window
        self.store = store
        self._live: dict[str, Resumable] = {}
        self._written: dict[str, bytes] = {}
        """Per live key, the state last written to the store."""
        self._kept: dict[str, _Kept] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sync: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.window > 0

    @property
    def kept(self) -> int:
        return len(self._kept)

    async def start(self) -> None:
        if self.store is not None:
            await self.store.check()
            self._sync = asyncio.create_task(self._sync_forever(), name="resume-sync")

    async def close(self) -> None:
        """At shutdown: the kept sessions' sandboxes go (their state stays in the
        store, for another replica)."""
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
        for key in list(self._kept):
            self._expire(key, forget=False)
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.store is not None:
            await self.store.close()

    # ── a session's life ─────────────────────────────────────────────────────

    async def issue(self, session: Resumable) -> str | None:
        """A new token for a live session (None when resuming is off)."""
        if not self.enabled:
            return None
        token = secrets.token_urlsafe(TOKEN_BYTES)
        key = key_of(token)
        self._live[key] = session
        if self.store is not None:
            await self._write(key, session.snapshot(), create=True)
        return token

    async def end(self, token: str, session: Resumable, *, keep: bool,
                  characters: Closeable | None = None) -> bool:
        """The session's connection ended. ``keep``: its conversation may be resumed
        for the window (``characters``, still loaded, kept with it); else it is gone.
        Returns whether ``characters`` were taken (the caller must not close them)."""
        key = key_of(token)
        if self._live.get(key) is not session:
            return False  # claimed meanwhile, or never issued
        del self._live[key]
        written = self._written.pop(key, None)
        if not keep:
            if self.store is not None:
                await self._quietly(self.store.forget(key))
            return False
        snapshot = session.snapshot()
        if self.store is not None:  # the last state, now to expire after the window
            await self._quietly(self.store.put(
                key, snapshot.identity, msgspec.msgpack.encode(snapshot), self.window,
                create=written is None))
        expiry = asyncio.get_running_loop().call_later(self.window, self._expire, key)
        self._kept[key] = _Kept(snapshot, characters, expiry)
        return characters is not None

    async def claim(self, token: str, identity: str | None) -> Claimed:
        """The conversation ``token`` names, taken for a new connection by
        ``identity``; raises ``ResumeRefused``."""
        if not self.enabled:
            raise ResumeRefused("unknown", "resuming is off on this server "
                                "(--resume-window 0); connect without resume")
        key = key_of(token)
        if (live := self._live.get(key)) is not None:
            if live.snapshot().identity != identity:
                raise _not_yours()
            # Its old connection has not noticed it is gone (a phone that changed
            # networks): the new one takes over.
            await live.take_over()
        kept = self._kept.get(key)
        if kept is not None and kept.snapshot.identity != identity:
            raise _not_yours()
        state, gone = None, False
        if self.store is not None:
            try:
                state = await self.store.take(key, identity)
                gone = state is None
            except ResumeRefused:
                raise
            except Exception as exc:  # Redis away: what is kept here can still resume
                log.warning("resume: the state store failed: %s", exc)
                if kept is None:
                    raise ResumeRefused(
                        "unavailable", f"the conversation state store is unreachable "
                        f"({exc}); try again, or connect without resume") from None
        if kept is not None:
            del self._kept[key]
            kept.expiry.cancel()
            if gone:  # claimed on another replica meanwhile (single use), or expired
                self._close_later(kept.characters)
                raise _unknown(self.window)
            return Claimed(kept.snapshot, kept.characters)
        if state is None:
            raise _unknown(self.window)
        return Claimed(msgspec.msgpack.decode(state, type=Snapshot), None)

    # ── keeping the store current ────────────────────────────────────────────

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_PERIOD)
            try:
                await self.sync()
            except Exception as exc:  # Redis away: the sessions go on; said in the log
                log.warning("resume: writing session state failed: %s", exc)

    async def sync(self) -> None:
        """Write each live session's state that changed and extend the others' expiry
        (one pipelined round trip); a session whose state is gone from the store was
        resumed on another connection (its own has not noticed it dropped): it ends."""
        assert self.store is not None
        unchanged, gone = [], []
        for key, session in list(self._live.items()):
            snapshot = session.snapshot()
            state = msgspec.msgpack.encode(snapshot)
            if state == self._written.get(key):
                unchanged.append(key)
            elif await self.store.put(key, snapshot.identity, state, self._live_ttl,
                                      create=False):
                self._written[key] = state
            else:
                gone.append(key)
        gone += await self.store.touch(unchanged, self._live_ttl)
        for key in gone:
            if (moved := self._live.pop(key, None)) is not None:
                self._written.pop(key, None)
                log.info("%s: resumed on another connection; this one ends",
                         moved.snapshot().session_id)
                self._spawn(moved.take_over())

    @property
    def _live_ttl(self) -> float:
        """A live session's state outlives a replica killed outright by the window."""
        return self.window + max(4 * SYNC_PERIOD, self.window / 4)

    async def _write(self, key: str, snapshot: Snapshot, *, create: bool) -> None:
        assert self.store is not None
        state = msgspec.msgpack.encode(snapshot)
        await self.store.put(key, snapshot.identity, state, self._live_ttl, create=create)
        self._written[key] = state

    # ── expiry ───────────────────────────────────────────────────────────────

    def _expire(self, key: str, forget: bool = True) -> None:
        kept = self._kept.pop(key, None)
        if kept is None:
            return
        kept.expiry.cancel()
        if forget:
            log.info("%s: nobody resumed it within %g s; it ends",
                     kept.snapshot.session_id, self.window)
        self._close_later(kept.characters)

    def _close_later(self, characters: Closeable | None) -> None:
        if characters is not None:
            self._spawn(characters.close())

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work
        task = asyncio.create_task(run())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quietly(work: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):
            await work


def _unknown(window: float) -> ResumeRefused:
    return ResumeRefused(
        "unknown", f"this resume token is not valid: it was used already, its session "
        f"ended more than {window:g} s ago (--resume-window), or it was never issued; "
        "connect without resume to start a new conversation")


def _not_yours() -> ResumeRefused:
    return ResumeRefused("not_yours", "this resume token belongs to a session opened with "
                         "another API key; connect with that key, or without resume")

