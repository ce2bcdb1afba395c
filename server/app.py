"""The aiohttp application: ``create_app(config)`` wires routes, state and lifecycles.

    GET  /v1/realtime                  WebSocket, subprotocol "realtime" (session.py),
                                       through the front door (auth.py)
    POST /v1/realtime/client_secrets   short-lived client secrets (OpenAI's shape)
    GET  /v1/health                    sandbox pool and backend status (200 / 503)
    GET  /v1/ready                     readiness: 503 draining, warming, full or a backend down
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

    state.py      the typed AppKeys (re-exported here: tests and scripts import them
                  from ``server.app``)
    lifecycle.py  the cleanup contexts, the SIGTERM drain, the shutdown
    handlers.py   the route handlers
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import handlers, lifecycle
from .config import Config
from .frontdoor import auth
from .state import CONFIG as CONFIG
from .state import FRONT_DOOR as FRONT_DOOR
from .state import LLM_BACKEND as LLM_BACKEND
from .state import NO_SESSIONS as NO_SESSIONS
from .state import POOL as POOL
from .state import RESUMER as RESUMER
from .state import SCOPES as SCOPES
from .state import SESSIONS as SESSIONS
from .state import SPEECH as SPEECH
from .state import VOICES as VOICES
from .state import WARM as WARM


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
    app.cleanup_ctx.append(lifecycle.front_door)
    app.cleanup_ctx.append(lifecycle.sandbox_pool)
    app.cleanup_ctx.append(lifecycle.resumer)  # after the pool: kept sandboxes close before it
    app.cleanup_ctx.append(lifecycle.language_model)
    app.cleanup_ctx.append(lifecycle.speech)
    app.cleanup_ctx.append(lifecycle.warm_up)  # last: it needs the set and the model
    app.on_startup.append(lifecycle.freeze_startup_objects)
    app.on_startup.append(lifecycle.drain_on_sigterm)
    app.on_shutdown.append(lifecycle.close_sessions)
    app.router.add_get("/v1/realtime", handlers.realtime)
    app.router.add_post("/v1/realtime/client_secrets", handlers.client_secrets)
    app.router.add_get("/v1/health", handlers.health)
    app.router.add_get("/v1/ready", handlers.ready)
    app.router.add_get("/v1/voices", handlers.voices)
    app.router.add_post("/v1/characters/reload", handlers.reload_voices)
    app.router.add_get("/v1/sessions", handlers.list_sessions)
    app.router.add_get("/admin", handlers.admin_page)
    app.router.add_get("/metrics", handlers.metrics_page)
    app.router.add_get("/", handlers.index)
    # Files of server/static only: no directory listing, no symlinks followed.
    app.router.add_static("/static/", handlers.STATIC, name="static")
    return app
