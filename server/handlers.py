"""The route handlers (the routes' table is in ``app.py``'s docstring): each reads the
application's state (``state.py``) and asks the front door before anything else.

    GET /v1/realtime ─▶ FrontDoor.enter ─▶ (resume claim) ─▶ a Session until it ends
    admin routes     ─▶ FrontDoor.admin (an admin key or the admin token)
    refused anywhere ─▶ frontdoor.refusal(): OpenAI's error shape, 4xx/503
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from aiohttp import WSCloseCode, web
from prometheus_async.aio.web import server_stats

from . import metrics
from .errors import ServerSideError, TroupeError
from .frontdoor import admin, auth
from .frontdoor import routes as frontdoor
from .frontdoor.auth import Refused, Scope
from .frontdoor.deadlines import Deadlines, watch
from .realtime import dialects, resume
from .realtime.session import Session
from .state import (
    CONFIG,
    FRONT_DOOR,
    LLM_BACKEND,
    NO_SESSIONS,
    POOL,
    RESUMER,
    SCOPES,
    SESSIONS,
    SPEECH,
    VOICES,
    WARM,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


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
             f"key {key.name}" if key else "an open server", frontdoor.who(request), seconds)
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
