"""Start-up and shutdown: what ``create_app`` hangs on the application.

    cleanup_ctx (opened in order, closed in reverse):
      front_door ─▶ sandbox_pool ─▶ resumer ─▶ language_model ─▶ speech ─▶ warm_up
    on_startup:   freeze_startup_objects, drain_on_sigterm (SIGTERM: drain, then exit)
    on_shutdown:  close_sessions (live sessions closed with 1001)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from sandbox import Pool, SandboxError

from . import metrics
from .backends.configured_llm import Backend
from .backends.configured_speech import SpeechBackends
from .backends.embedded.llm import EmbeddedLLM
from .backends.errors import BackendUnavailable
from .conversation.characters import CharacterSet
from .errors import TroupeError
from .frontdoor import routes as frontdoor
from .realtime import resume
from .realtime.resume import Resumer
from .state import (
    CONFIG,
    FRONT_DOOR,
    LLM_BACKEND,
    NO_SESSIONS,
    POOL,
    RESUMER,
    SESSIONS,
    SPEECH,
    VOICES,
    WARM,
)

log = logging.getLogger(__name__)


async def front_door(app: web.Application) -> AsyncIterator[None]:
    """The keys, read first (a bad file stops start-up), and re-read on SIGHUP."""
    config = app[CONFIG]
    door = app[FRONT_DOOR] = frontdoor.open_door(config)
    path = config.api_keys
    loop = asyncio.get_running_loop()
    watching = False
    if path is not None:
        try:
            loop.add_signal_handler(signal.SIGHUP, frontdoor.reload_keys, door, path)
            watching = True
        except (RuntimeError, ValueError) as exc:  # not the main thread, or no SIGHUP
            log.warning("the keys file is not re-read on SIGHUP here: %s", exc)
    yield
    if watching:
        loop.remove_signal_handler(signal.SIGHUP)


async def sandbox_pool(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    pool = Pool(config.sandbox, metrics.MetricsObserver(logging.getLogger("sandbox")))
    await pool.start()  # raises SandboxUnavailable under --require-sandbox
    app[POOL] = pool
    if pool.missing_protections:
        log.warning("sandbox running WEAKER than designed: this kernel lacks %s (in force: "
                    "%s); see the README's Security model; --require-sandbox refuses to start",
                    ", ".join(pool.missing_protections), ", ".join(pool.protections))
    else:
        log.info("sandbox protections in force: %s", ", ".join(pool.protections))
    voices = CharacterSet(pool, config, "server-wide set")
    app[VOICES] = voices
    try:
        loaded = await voices.load("default")
        log.info("server-wide set: %d characters from %s, %d errors",
                 len(loaded.characters), loaded.directory, len(loaded.errors))
    except TroupeError as exc:
        log.error("server-wide set not loaded (%s): %s", exc.code, exc.message)
    yield
    await voices.close()
    await pool.close()


async def resumer(app: web.Application) -> AsyncIterator[None]:
    """Resume tokens, the sessions kept for them, and Redis when --state-url is set."""
    config = app[CONFIG]
    store = resume.RedisStore(config.state_url) if config.state_url else None
    resumer = app[RESUMER] = Resumer(config.resume_window, store)
    try:
        await resumer.start()
    except Exception as exc:
        await resumer.close()
        raise RuntimeError(f"--state-url: Redis does not answer ({exc}); start it, or fix "
                           "the URL, or leave --state-url out (resume on this replica only)"
                           ) from None
    if store is not None:
        log.info("sessions' state kept in Redis; any replica can resume them")
    yield
    await resumer.close()


async def language_model(app: web.Application) -> AsyncIterator[None]:
    backend = Backend.for_config(app[CONFIG])
    await backend.start()
    app[LLM_BACKEND] = backend
    yield
    await backend.close()


async def speech(app: web.Application) -> AsyncIterator[None]:
    speech = SpeechBackends.for_config(app[CONFIG])
    await speech.start()
    app[SPEECH] = speech
    yield
    await speech.close()


async def warm_up(app: web.Application) -> AsyncIterator[None]:
    """The first reply after start-up as quick as the next ones: the embedded model
    reads the server-wide set's default character's prompt into its cache (seconds;
    the first reply used to wait for it) in the background. ``/v1/ready`` answers 503
    ("warming") until then; ``/v1/health`` says the server lives meanwhile."""
    warm = app[WARM] = asyncio.Event()
    task = asyncio.create_task(_warm(app), name="warm-up")
    task.add_done_callback(lambda _: warm.set())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _warm(app: web.Application) -> None:
    llm, voices = app[LLM_BACKEND].llm, app[VOICES]
    if not isinstance(llm, EmbeddedLLM) or voices.sandbox is None:
        return  # a remote model warms itself; nothing to read without a set
    good = [c for c in voices.characters if c.good is not False] or voices.characters
    if not good:
        return
    started = asyncio.get_running_loop().time()
    try:  # the character a session answers with when it picks none (dialogue._speaker)
        await llm.prepare(await voices.sandbox.system_prompt(good[0].name))
    except (BackendUnavailable, SandboxError) as exc:
        log.warning("warm-up skipped (the first reply reads its prompt): %s", exc)
        return
    log.info("warm: %s's prompt read by the language model in %.1f s", good[0].name,
             asyncio.get_running_loop().time() - started)


async def freeze_startup_objects(app: web.Application) -> None:
    """What start-up made lives as long as the server: out of the collector's way
    (full collections of ~113k objects stalled the loop 50-130 ms under load)."""
    gc.collect()
    gc.freeze()


async def drain_on_sigterm(app: web.Application) -> None:
    """SIGTERM drains (DESIGN.md section 10): not ready at once, no new sessions, live
    ones go on for --drain-timeout or until they end, then the usual shutdown closes
    what is left with 1001 and exits 0. (aiohttp's runner installed its own SIGTERM
    handler before start-up; this one replaces it. A second SIGTERM, or SIGINT,
    shuts down at once.)"""
    loop = asyncio.get_running_loop()
    drained: set[asyncio.Task[None]] = set()

    def drain() -> None:
        door = app[FRONT_DOOR]
        if door.admission.draining:
            signal.raise_signal(signal.SIGINT)
            return
        door.admission.draining = True
        log.info("SIGTERM: draining %d sessions for up to %g s (--drain-timeout)",
                 len(app[SESSIONS]), app[CONFIG].drain_timeout)
        task = asyncio.create_task(_drain(app))
        drained.add(task)
        task.add_done_callback(drained.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGTERM, drain)


async def _drain(app: web.Application) -> None:
    if app[SESSIONS]:  # (no await between the check and the clear: no session ends)
        app[NO_SESSIONS].clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(app[CONFIG].drain_timeout):
                await app[NO_SESSIONS].wait()
    signal.raise_signal(signal.SIGINT)  # aiohttp's graceful exit: on_shutdown, cleanup


async def close_sessions(app: web.Application) -> None:
    sessions = list(app[SESSIONS].values())
    reason = "server shutting down" + (
        "; reconnect with your resume_token" if app[RESUMER].enabled else "")
    await asyncio.gather(
        *(session.go_away(reason) for session in sessions),
        return_exceptions=True,
    )
