"""What stops a command, and how it is told: the ``Failure`` tree, ``report`` and
``note`` (both to stderr, so stdout holds only what was asked for).

    Failure          the command cannot go on (exit status 1)
    ├── Closed       the server closed the session (1000: a normal end)
    ├── CannotStart  something needed before anything is sent (exit status 2)
    └── ServerError  an ``error`` event from the server
"""

from __future__ import annotations

import json
import sys
from typing import Any

Event = dict[str, Any]


class Failure(Exception):
    """The command cannot go on; the message says why, for stderr."""


class Closed(Failure):
    """The server closed the session; code 1000 is a normal end (a character that
    says goodbye closes it)."""

    def __init__(self, code: int | None, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"the server closed the connection (code {code})"
                         + (f": {reason}" if reason else ""))


class CannotStart(Failure):
    """Something the command needs before it sends anything is missing: an input file,
    a place for the output, PortAudio, a microphone (exit status 2)."""


class ServerError(Failure):
    """An ``error`` event from the server."""

    def __init__(self, event: Event) -> None:
        error = event.get("error")
        error = error if isinstance(error, dict) else {}
        self.code = str(error.get("code") or "unknown_error")
        self.message = str(error.get("message") or "(no message)")
        self.details: Any = error.get("details")
        self.event_id: Any = error.get("event_id")
        super().__init__(f"{self.code}: {self.message}")

    def report(self) -> str:
        """The code and message, then the details (a character's traceback) if any."""
        lines = [f"error: {self}"]
        if isinstance(self.details, dict) and isinstance(self.details.get("traceback"), str):
            lines.append(self.details["traceback"].rstrip())
        elif self.details is not None:
            lines.append(f"details: {json.dumps(self.details)}")
        return "\n".join(lines)


def report(failure: Failure) -> None:
    text = failure.report() if isinstance(failure, ServerError) else f"error: {failure}"
    print(text, file=sys.stderr, flush=True)


def note(text: str) -> None:
    """Progress for the person (stderr, so stdout holds only what was asked for)."""
    print(text, file=sys.stderr, flush=True)
