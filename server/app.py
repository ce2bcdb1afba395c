"""The aiohttp application: ``create_app(config)`` wires routes, state and lifecycles.

    GET  /v1/realtime            WebSocket, subprotocol "realtime" (session.py)
    GET  /v1/health              sandbox pool and backend status (200 / 503)
    GET  /v1/voices              the server-wide default set, good characters only
    POST /v1/characters/reload   reloads that server-wide set (deprecated)
    GET  /v1/sessions            live sessions, behind the admin token
    GET  /metrics                Prometheus
    GET  /                       the web client (server/static/index.html)
    GET  /static/{name}          its files

State lives under typed ``web.AppKey``s; the sandbox pool and the server-wide set are
opened and closed in ``cleanup_ctx``; shutdown closes live sessions with 1001.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import WSCloseCode, web
from prometheus_async.aio.web import server_stats

from sandbox import Pool

from . import dialects, metrics
from .characters import CharacterSet
from .config import Config
from .errors import TroupeError
from .llm_backend import Backend
from .session import Session
from .speech_backends import SpeechBackends

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
VOICES = web.AppKey("voices", CharacterSet)
SESSIONS = web.AppKey("sessions", dict[str, Session])
LLM_BACKEND = web.AppKey("llm", Backend)
SPEECH = web.AppKey("speech", SpeechBackends)


def create_app(config: Config) -> web.Application:
    # aiohttp closes the connection on frames above max_msg_size; below that we
    # answer message_too_large ourselves and the session goes on.
    app = web.Application(client_max_size=config.max_message_bytes)
    app[CONFIG] = config
    app[SESSIONS] = {}
    app.cleanup_ctx.append(_sandbox_pool)
    app.cleanup_ctx.append(_language_model)
    app.cleanup_ctx.append(_speech)
    app.on_startup.append(_freeze_startup_objects)
    app.on_shutdown.append(_close_sessions)
    app.router.add_get("/v1/realtime", realtime)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/voices", voices)
    app.router.add_post("/v1/characters/reload", reload_voices)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/metrics", server_stats)
    app.router.add_get("/", index)
    # Files of server/static only: no directory listing, no symlinks followed.
    app.router.add_static("/static/", STATIC, name="static")
    return app


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


async def _freeze_startup_objects(app: web.Application) -> None:
    """What start-up made lives as long as the server: out of the collector's way
    (full collections of ~113k objects stalled the loop 50-130 ms under load)."""
    gc.collect()
    gc.freeze()


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[SESSIONS].values())
    await asyncio.gather(
        *(s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
          for s in sessions),
        return_exceptions=True,
    )


async def realtime(request: web.Request) -> web.WebSocketResponse:
    app, config = request.app, request.app[CONFIG]
    ws = web.WebSocketResponse(
        protocols=("realtime",), max_msg_size=config.max_message_bytes * 16
    )
    await ws.prepare(request)
    sessions = app[SESSIONS]
    if len(sessions) >= config.max_sessions:
        metrics.SESSIONS_REJECTED.inc()
        await ws.close(
            code=WSCloseCode.TRY_AGAIN_LATER,
            message=f"server full ({config.max_sessions} sessions); retry later".encode(),
        )
        return ws
    dialect = dialects.detect(request.query, request.headers)
    session = Session(ws, dialect, request.query.get("model"), app[POOL], config,
                      app[LLM_BACKEND].llm, app[SPEECH].tts, app[SPEECH].stt)
    sessions[session.id] = session
    metrics.SESSIONS.inc()
    metrics.SESSIONS_ACTIVE.inc()
    log.info("%s: opened (%s dialect)", session.id, dialect.value)
    try:
        await session.run()
    except Exception:
        log.exception("%s: failed", session.id)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
    finally:
        del sessions[session.id]
        metrics.SESSIONS_ACTIVE.dec()
        metrics.SESSION_DURATION.observe(session.age)
        log.info("%s: closed after %.1f s", session.id, session.age)
        await session.close()
    return ws


async def index(request: web.Request) -> web.FileResponse:
    """The web client (DESIGN.md section 6)."""
    return web.FileResponse(STATIC / "index.html")


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
            "default_set_loaded": voices.sandbox is not None,
            "protections": pool.protections,
            "missing": pool.missing_protections,
        },
        "sessions": {"active": len(app[SESSIONS]), "max": app[CONFIG].max_sessions},
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
        status = 500 if exc.error_type == "server_error" else 422
        return web.json_response(
            {"error": {"type": exc.error_type, "code": exc.code, "message": exc.message,
                       "details": exc.details}},
            status=status, headers=headers,
        )
    finally:
        voices.retire()
    return web.json_response({
        "directory": loaded.directory,
        "loaded_count": len(loaded.characters),
        "error_count": len(loaded.errors),
        "total_files": loaded.total_files,
        "characters": [{"name": c.name, "good": c.good, "comment": c.comment}
                       for c in loaded.characters],
        "errors": [{"file": e.file, "error_type": e.error_type, "message": e.message}
                   for e in loaded.errors],
        "duration_ms": loaded.duration_ms,
        "deprecated": True,
    }, headers=headers)


async def list_sessions(request: web.Request) -> web.Response:
    token = request.app[CONFIG].admin_token
    if not token:
        raise web.HTTPNotFound(text="the admin API is off; set TROUPE_ADMIN_TOKEN (or "
                               "--admin-token-file) to enable it")
    # Exactly "Bearer <token>": a bare token or another scheme is refused, not guessed at.
    expected = f"Bearer {token}".encode()
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not secrets.compare_digest(given, expected):
        raise web.HTTPUnauthorized(text="send Authorization: Bearer <admin token>")
    sessions = list(request.app[SESSIONS].values())
    pids = [session.characters.sandbox.pid if session.characters.sandbox else None
            for session in sessions]
    # Reading smaps_rollup costs ~2.5 ms a process: 0.5 s for 200 sessions, off the loop.
    pss = await asyncio.to_thread(lambda: [_pss_kb(pid) for pid in pids])
    return web.json_response([
        {
            "id": session.id,
            "dialect": session.dialect.value,
            "age_s": round(session.age, 1),
            "directory": session.characters.directory,
            "characters": [c.name for c in session.characters.characters],
            "voice": session.settings.voice,
            "sandbox_pid": pid,
            "sandbox_pss_kb": kb,
        }
        for session, pid, kb in zip(sessions, pids, pss, strict=True)
    ])


def _pss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None
