"""The aiohttp application: ``create_app(config)`` wires routes, state and lifecycles.

    GET  /v1/realtime                  WebSocket, subprotocol "realtime" (session.py),
                                       through the front door (auth.py)
    POST /v1/realtime/client_secrets   short-lived client secrets (OpenAI's shape)
    GET  /v1/health                    sandbox pool and backend status (200 / 503)
    GET  /v1/voices                    the server-wide default set, good characters only
    POST /v1/characters/reload         reloads that server-wide set (deprecated; admin)
    GET  /v1/sessions                  live sessions (admin)
    GET  /admin                        the same as a page (admin; Basic login too)
    GET  /metrics                      Prometheus (behind the metrics key, if one is set)
    GET  /                             the web client (server/static/index.html)
    GET  /static/{name}                its files

State lives under typed ``web.AppKey``s; the front door, the sandbox pool and the
server-wide set are opened and closed in ``cleanup_ctx``; shutdown closes live
sessions with 1001. Admin routes take an admin key or the admin token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web
from prometheus_async.aio.web import server_stats

from sandbox import Pool, SandboxError

from . import metrics
from .backends.configured_llm import Backend
from .backends.configured_speech import SpeechBackends
from .backends.embedded.llm import EmbeddedLLM
from .backends.errors import BackendUnavailable
from .config import Config
from .conversation.characters import CharacterSet
from .errors import ServerSideError, TroupeError
from .frontdoor import admin, auth
from .frontdoor import routes as frontdoor
from .frontdoor.auth import FrontDoor, Refused, Scope
from .frontdoor.deadlines import Deadlines, watch
from .realtime import dialects, resume
from .realtime.resume import Resumer
from .realtime.session import Session

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
VOICES = web.AppKey("voices", CharacterSet)
SESSIONS = web.AppKey("sessions", dict[str, Session])
SCOPES = web.AppKey("scopes", dict[str, Scope])
NO_SESSIONS = web.AppKey("no_sessions", asyncio.Event)
"""Set whenever the last session ends (a drain waits for it)."""
"""What each live session may do (its key, its roots), by session id."""
FRONT_DOOR = web.AppKey("front_door", FrontDoor)
LLM_BACKEND = web.AppKey("llm", Backend)
SPEECH = web.AppKey("speech", SpeechBackends)
RESUMER = web.AppKey("resumer", Resumer)
WARM = web.AppKey("warm", asyncio.Event)
"""Set once start-up's warm-up has ended (``/v1/ready`` says 503 until then)."""


def create_app(config: Config) -> web.Application:
    """Raises ``ValueError`` for a configuration that must not serve (without keys
    on an address other than loopback, unless ``no_auth``)."""
    problem = auth.startup_problem(host=config.host, keys=config.api_keys is not None,
                                   no_auth=config.no_auth)
    if problem is not None:
        raise ValueError(problem)
    # aiohttp closes the connection on frames above max_msg_size; below that we
    # answer message_too_large ourselves and the session goes on.
    app = web.Application(client_max_size=config.max_message_bytes)
    app[CONFIG] = config
    app[SESSIONS] = {}
    app[SCOPES] = {}
    app[NO_SESSIONS] = asyncio.Event()
    app.cleanup_ctx.append(_front_door)
    app.cleanup_ctx.append(_sandbox_pool)
    app.cleanup_ctx.append(_resumer)  # after the pool: kept sandboxes close before it
    app.cleanup_ctx.append(_language_model)
    app.cleanup_ctx.append(_speech)
    app.cleanup_ctx.append(_warm_up)  # last: it needs the set and the model
    app.on_startup.append(_freeze_startup_objects)
    app.on_startup.append(_drain_on_sigterm)
    app.on_shutdown.append(_close_sessions)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_post("/v1/realtime/client_secrets", client_secrets)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/ready", ready)
    app.router.add_get("/v1/voices", voices)
    app.router.add_post("/v1/characters/reload", reload_voices)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/", index)
    # Files of server/static only: no directory listing, no symlinks followed.
    app.router.add_static("/static/", STATIC, name="static")
    return app


async def _front_door(app: web.Application) -> AsyncIterator[None]:
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


async def _sandbox_pool(app: web.Application) -> AsyncIterator[None]:
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


async def _resumer(app: web.Application) -> AsyncIterator[None]:
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


async def _language_model(app: web.Application) -> AsyncIterator[None]:
    backend = Backend.for_config(app[CONFIG])
    await backend.start()
    app[LLM_BACKEND] = backend
    yield
    await backend.close()


async def _speech(app: web.Application) -> AsyncIterator[None]:
    speech = SpeechBackends.for_config(app[CONFIG])
    await speech.start()
    app[SPEECH] = speech
    yield
    await speech.close()


async def _warm_up(app: web.Application) -> AsyncIterator[None]:
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


async def _freeze_startup_objects(app: web.Application) -> None:
    """What start-up made lives as long as the server: out of the collector's way
    (full collections of ~113k objects stalled the loop 50-130 ms under load)."""
    gc.collect()
    gc.freeze()


async def _drain_on_sigterm(app: web.Application) -> None:
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


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[SESSIONS].values())
    reason = "server shutting down" + (
        "; reconnect with your resume_token" if app[RESUMER].enabled else "")
    await asyncio.gather(
        *(session.go_away(reason) for session in sessions),
        return_exceptions=True,
    )


async def realtime(request: web.Request) -> web.StreamResponse:
    door = request.app[FRONT_DOOR]
    try:
        entry = door.enter(frontdoor.knock(request))
    except Refused as refused:
        return frontdoor.refusal(request, refused)
    try:
        claimed = None
        if (token := request.query.get("resume")) is not None:
            try:
                claimed = await request.app[RESUMER].claim(token, entry.scope.key)
            except resume.ResumeRefused as refused:
                return frontdoor.refusal(request, _resume_refusal(refused))
        return await _serve(request, entry.scope, claimed)
    finally:
        door.leave(entry)


def _resume_refusal(refused: resume.ResumeRefused) -> Refused:
    match refused.reason:
        case "not_yours":
            return Refused(403, "resume_token_not_yours", refused.message, param="resume")
        case "unavailable":
            return Refused(503, "resume_unavailable", refused.message, retry_after=2,
                           param="resume")
    return Refused(404, "resume_token_invalid", refused.message, param="resume")


async def _serve(request: web.Request, scope: Scope,
                 claimed: resume.Claimed | None) -> web.WebSocketResponse:
    app, config = request.app, request.app[CONFIG]
    ws = web.WebSocketResponse(
        protocols=(auth.SUBPROTOCOL,), max_msg_size=config.max_message_bytes * 16,
        heartbeat=config.heartbeat or None,
    )
    try:
        await ws.prepare(request)
    except BaseException:
        if claimed is not None and claimed.characters is not None:
            await claimed.characters.close()
        raise
    if scope.allowed_roots != config.allowed_roots:
        config = dataclasses.replace(config, allowed_roots=scope.allowed_roots)
    sessions, scopes = app[SESSIONS], app[SCOPES]
    dialect = dialects.detect(request.query, request.headers)
    session = Session(ws, dialect, request.query.get("model"), app[POOL], config,
                      app[LLM_BACKEND].llm, app[SPEECH].tts, app[SPEECH].stt,
                      resumer=app[RESUMER], identity=scope.key, claimed=claimed)
    sessions[session.id], scopes[session.id] = session, scope
    metrics.SESSIONS.inc()
    metrics.SESSIONS_ACTIVE.inc()
    log.info("%s: opened (%s dialect, %s)", session.id, dialect.value,
             f"key {scope.key} by {scope.via}" if scope.key else "no key")
    deadlines = Deadlines(idle=config.idle_timeout or None,
                          max_length=config.max_session or None)
    watcher = asyncio.create_task(watch(session, deadlines), name=f"{session.id}-deadlines")
    try:
        await session.run()
    except Exception:
        log.exception("%s: failed", session.id)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        del sessions[session.id], scopes[session.id]
        if not sessions:
            app[NO_SESSIONS].set()
        metrics.SESSIONS_ACTIVE.dec()
        metrics.SESSION_DURATION.observe(session.age)
        log.info("%s: closed after %.1f s", session.id, session.age)
        await session.close()
    return ws


async def client_secrets(request: web.Request) -> web.Response:
    """OpenAI's ``POST /v1/realtime/client_secrets``: a secret that opens sessions with
    the key's scope until it expires (the web client's way in)."""
    door = request.app[FRONT_DOOR]
    try:
        key = door.minter(frontdoor.knock(request))
        seconds, session = await frontdoor.client_secret_request(request)
    except Refused as refused:
        return frontdoor.refusal(request, refused)
    value, expires_at = door.mint(key, seconds)
    log.info("client secret for %s from %s, good for %d s",
             f"key {key.name}" if key else "an open server", request.remote, seconds)
    return web.json_response(frontdoor.client_secret_answer(value, expires_at, session))


async def index(request: web.Request) -> web.FileResponse:
    """The web client (DESIGN.md section 6)."""
    return web.FileResponse(STATIC / "index.html")


async def ready(request: web.Request) -> web.Response:
    """Readiness (DESIGN.md section 6): 503 while draining, warming up, at the session
    limit, or with a configured backend down, so that a balancer sends new sessions
    elsewhere."""
    app = request.app
    admission, limit = app[FRONT_DOOR].admission, app[CONFIG].max_sessions
    stt, tts = await app[SPEECH].probe()
    down = [name for name, status in (("stt", stt.status), ("tts", tts.status),
                                      ("llm", app[LLM_BACKEND].status))
            if status.startswith("down")]
    reasons = (["draining"] if admission.draining else []) + (
        [] if app[WARM].is_set() else ["warming"]) + (
        ["full"] if admission.total >= limit else []) + [f"{name}_down" for name in down]
    body = {"ready": not reasons, "reasons": reasons, "sessions": admission.total,
            "capacity": limit, "draining": admission.draining}
    return web.json_response(body, status=503 if reasons else 200,
                             headers={"Retry-After": "5"} if reasons else None)


async def health(request: web.Request) -> web.Response:
    app = request.app
    pool, voices, llm = app[POOL], app[VOICES], app[LLM_BACKEND]
    ok = voices.sandbox is not None
    stt, tts = await app[SPEECH].probe()
    body = {
        "ok": ok,
        "pid": os.getpid(),
        "stt_up": stt.up,
        "llm_up": llm.up,
        "tts_up": tts.up,
        "voice_cloning_up": False,
        "backends": {"stt": stt.status, "llm": llm.status, "tts": tts.status},
        "sandbox": {
            "pool_idle": pool.idle,
            "pool_size": pool.config.pool_size,
            "children": len(pool.live_pids),
            "warm": len(pool.warm_directories),
            "default_set_loaded": voices.sandbox is not None,
            "protections": pool.protections,
            "missing": pool.missing_protections,
        },
        "sessions": {"active": len(app[SESSIONS]), "max": app[CONFIG].max_sessions,
                     "kept": app[RESUMER].kept},
        "resume": {"window_s": app[CONFIG].resume_window,
                   "shared": app[RESUMER].store is not None},
    }
    return web.json_response(body, status=200 if ok else 503)


async def voices(request: web.Request) -> web.Response:
    """Unmute's ``VoiceSample`` list (DESIGN.md §6): its clients forbid other fields and
    take ``source.path_on_server`` as the id they send back as ``voice``."""
    return web.json_response([
        {"name": c.name, "comment": c.comment, "good": c.good,
         "source": dialects.voice_source(c.name, c.voice_source)}
        for c in request.app[VOICES].characters
        if c.good is True
    ])


async def reload_voices(request: web.Request) -> web.Response:
    try:
        who = request.app[FRONT_DOOR].admin(frontdoor.admin_credential(request))
    except Refused as refused:
        return frontdoor.refusal(request, refused)
    log.info("server-wide set reloaded over HTTP by %s (deprecated route)", who)
    headers = {
        "Deprecation": "true",
        "Link": '</v1/realtime>; rel="successor-version"',
        "Warning": '299 - "deprecated: reloads only the server-wide set; sessions use '
        'session.characters.reload"',
    }
    voices = request.app[VOICES]
    try:
        loaded = await voices.load("default")
    except TroupeError as exc:
        status = 500 if isinstance(exc, ServerSideError) else 422
        return web.json_response(
            {"error": {"type": exc.error_type, "code": exc.code, "message": exc.message,
                       "details": exc.details}},
            status=status, headers=headers,
        )
    finally:
        voices.retire()
    return web.json_response(loaded.fields() | {"deprecated": True}, headers=headers)


async def list_sessions(request: web.Request) -> web.Response:
    try:
        request.app[FRONT_DOOR].admin(frontdoor.admin_credential(request))
    except Refused as refused:
        return frontdoor.refusal(request, refused)
    return web.json_response(await admin.rows(request.app[SESSIONS], request.app[SCOPES]))


async def admin_page(request: web.Request) -> web.Response:
    """The admin page; a browser's own login prompt (Basic, the password being an
    admin key or the admin token) works as well as a Bearer header."""
    try:
        who = request.app[FRONT_DOOR].admin(frontdoor.admin_credential(request, basic=True))
    except Refused as refused:
        return frontdoor.refusal(request, refused, basic=True)
    table = await admin.rows(request.app[SESSIONS], request.app[SCOPES])
    return web.Response(text=admin.page(table, who), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def metrics_page(request: web.Request) -> web.StreamResponse:
    try:
        request.app[FRONT_DOOR].metrics(auth.bearer(request.headers.get("Authorization")))
    except Refused as refused:
        return frontdoor.refusal(request, refused)
    return await server_stats(request)
