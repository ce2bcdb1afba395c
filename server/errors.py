"""Errors a session reports to its client as ``error`` events (DESIGN.md §2).

    TroupeError(code, message)          → {"type": "invalid_request_error", "code": …}
    └── ServerSideError(code, message)  → {"type": "server_error", "code": …}

``code`` is an ``ErrorCode``: mypy refuses any other string. A sandbox failure becomes
the client's error in one place, ``from_sandbox``.

Only the session's event loop catches these; anything else escaping a handler is a
bug, logged with its traceback and reported as ``server_error``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from sandbox import (
    CallFailed,
    DirectoryNotFound,
    DirectoryNotReadable,
    LoadFailed,
    SandboxError,
    SandboxTimeout,
    TooManyCharacters,
)

ErrorCode = Literal[
    # the character directory
    "directory_not_found", "directory_not_readable", "invalid_directory_format",
    "directory_not_allowed", "no_valid_characters", "character_reload_failed",
    "character_not_found", "too_many_characters",
    # the characters' sandbox and their code
    "sandbox_crashed", "sandbox_timeout", "character_error",
    # the client's events and pace
    "invalid_event", "message_too_large", "rate_limited", "session_expired",
    # the server and its backends
    "backend_unavailable", "server_error",
]
"""Every code an ``error`` event carries (DESIGN.md §2; README "Errors")."""
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


class TroupeError(Exception):
    """A request the client can fix; ``code`` says which kind."""

    error_type = "invalid_request_error"

    def __init__(
        self, code: ErrorCode, message: str, *, param: str | None = None, details: Any = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.param = param
        self.details = details


class ServerSideError(TroupeError):
    """The server or a sandbox failed; the request may succeed if retried."""

    error_type = "server_error"


def from_sandbox(exc: SandboxError, doing: str) -> TroupeError:
    """The client's error for a sandbox failure while ``doing`` (e.g. "loading /x")."""
    match exc:
        case SandboxTimeout():
            return ServerSideError("sandbox_timeout", f"{doing}: {exc}")
        case CallFailed():
            return TroupeError(
                "character_error", f"{doing}: character code raised {exc.error_type}: {exc}",
                details={"traceback": exc.traceback},
            )
        case TooManyCharacters():
            return TroupeError("too_many_characters", f"{doing}: {exc}", param="directory")
        case DirectoryNotReadable():
            return TroupeError("directory_not_readable", f"{doing}: {exc}", param="directory")
        case DirectoryNotFound():
            return TroupeError("directory_not_found", f"{doing}: {exc}", param="directory")
        case LoadFailed():
            return TroupeError("character_reload_failed", f"{doing}: {exc}", param="directory",
                               details={"error_type": exc.error_type})
        case _:  # crashed, or no sandbox could start: it restarts on the next request
            return ServerSideError("sandbox_crashed", f"{doing}: {exc}")
