"""Errors a session reports to its client as ``error`` events (DESIGN.md §2).

    TroupeError(code, message)          → {"type": "invalid_request_error", "code": …}
    └── ServerSideError(code, message)  → {"type": "server_error", "code": …}

Only the session's event loop catches these; anything else escaping a handler is a
bug, logged with its traceback and reported as ``server_error``.
"""

from __future__ import annotations

from typing import Any


class TroupeError(Exception):
    """A request the client can fix; ``code`` is one of DESIGN.md's error codes."""

    error_type = "invalid_request_error"

    def __init__(
        self, code: str, message: str, *, param: str | None = None, details: Any = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.details = details


class ServerSideError(TroupeError):
    """The server or a sandbox failed; the request may succeed if retried."""

    error_type = "server_error"
