"""The application's state, under typed ``web.AppKey``s: set by ``create_app`` and the
lifecycles (``lifecycle.py``), read by the route handlers (``handlers.py``).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from sandbox import Pool

from .backends.configured_llm import Backend
from .backends.configured_speech import SpeechBackends
from .config import Config
from .conversation.characters import CharacterSet
from .frontdoor.auth import FrontDoor, Scope
from .realtime.resume import Resumer
from .realtime.session import Session

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", Pool)
VOICES = web.AppKey("voices", CharacterSet)
SESSIONS = web.AppKey("sessions", dict[str, Session])
SCOPES = web.AppKey("scopes", dict[str, Scope])
"""What each live session may do (its key, its roots), by session id."""
NO_SESSIONS = web.AppKey("no_sessions", asyncio.Event)
"""Set whenever the last session ends (a drain waits for it)."""
FRONT_DOOR = web.AppKey("front_door", FrontDoor)
LLM_BACKEND = web.AppKey("llm", Backend)
SPEECH = web.AppKey("speech", SpeechBackends)
RESUMER = web.AppKey("resumer", Resumer)
WARM = web.AppKey("warm", asyncio.Event)
"""Set once start-up's warm-up has ended (``/v1/ready`` says 503 until then)."""
