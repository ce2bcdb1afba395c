"""What the admin routes show (behind an admin key or the admin token, app.py):
``GET /v1/sessions`` as JSON, ``GET /admin`` as a page, from the same rows.

Each row: the session's id, the key it opened with, its dialect, age, directory,
characters, selected voice, the ordinal its metric series carry (``metrics_label``),
and its sandbox child's pid and memory (PSS, read from /proc off the event loop).
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path
from typing import Any

from .. import metrics
from ..realtime.session import Session
from .auth import Scope


async def rows(sessions: dict[str, Session], scopes: dict[str, Scope]) -> list[dict[str, Any]]:
    live = list(sessions.values())
    pids = [session.characters.sandbox.pid if session.characters.sandbox else None
            for session in live]
    # Before the await: a session that ends meanwhile must not get an ordinal again.
    labels = [metrics.session_label(session.id) for session in live]
    # Reading smaps_rollup costs ~2.5 ms a process: 0.5 s for 200 sessions, off the loop.
    pss = await asyncio.to_thread(lambda: [_pss_kb(pid) for pid in pids])
    return [
        {
            "id": session.id,
            "key": scope.key if (scope := scopes.get(session.id)) is not None else None,
            "dialect": session.dialect.value,
            "age_s": round(session.age, 1),
            "directory": session.characters.directory,
            "characters": [c.name for c in session.characters.characters],
            "voice": session.settings.voice,
            "metrics_label": label,
            "sandbox_pid": pid,
            "sandbox_pss_kb": kb,
        }
        for session, label, pid, kb in zip(live, labels, pids, pss, strict=True)
    ]


_COLUMNS = ("id", "key", "dialect", "age_s", "directory", "characters", "voice",
            "metrics_label", "sandbox_pid", "sandbox_pss_kb")


def page(table: list[dict[str, Any]], who: str) -> str:
    """The admin page: the live sessions, every value escaped."""
    def cell(value: Any) -> str:
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        return f"<td>{html.escape('' if value is None else str(value))}</td>"

    head = "".join(f"<th>{name}</th>" for name in _COLUMNS)
    body = "".join("<tr>" + "".join(cell(row[name]) for name in _COLUMNS) + "</tr>"
                   for row in table)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Troupe admin</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:1rem}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:.2rem .4rem;text-align:left}</style>"
        f"</head><body><h1>Troupe: {len(table)} live sessions</h1>"
        f"<p>Signed in as {html.escape(who)}. JSON: <code>GET /v1/sessions</code>.</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>"
    )


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
