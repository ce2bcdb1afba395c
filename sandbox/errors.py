"""Errors the host side of the sandbox raises.

    SandboxError
    ├── SandboxCrashed     the child died or broke the protocol during a call
    ├── SandboxTimeout     a call or a whole load missed its deadline
    ├── LoadFailed         the directory as a whole could not be loaded
    │   ├── DirectoryNotFound
    │   ├── DirectoryNotReadable
    │   └── TooManyCharacters
    ├── SandboxUnavailable no child can start, or protections required are missing
    └── CallFailed         character code raised; the child is fine

After ``SandboxCrashed`` and ``SandboxTimeout`` the sandbox has already been restarted
on the same directory, so the caller may go on using it.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every sandbox failure; ``error_type`` is a short machine name."""

    error_type = "SandboxError"

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type is not None:
            self.error_type = error_type


class SandboxCrashed(SandboxError):
    error_type = "Crashed"


class SandboxTimeout(SandboxError):
    error_type = "Timeout"


class SandboxUnavailable(SandboxError):
    error_type = "Unavailable"


class LoadFailed(SandboxError):
    error_type = "LoadFailed"

    @staticmethod
    def of(message: str, error_type: str) -> LoadFailed:
        """The failure the child reported as ``error_type``, as its own class."""
        kind = _LOAD_FAILURES.get(error_type, LoadFailed)
        return kind(message, error_type)


class DirectoryNotFound(LoadFailed):
    error_type = "FileNotFoundError"


class DirectoryNotReadable(LoadFailed):
    error_type = "PermissionError"


class TooManyCharacters(LoadFailed):
    error_type = "TooManyCharacters"


_LOAD_FAILURES: dict[str, type[LoadFailed]] = {
    kind.error_type: kind for kind in (DirectoryNotFound, DirectoryNotReadable, TooManyCharacters)
}


class CallFailed(SandboxError):
    """Character code raised ``error_type``; ``traceback`` is the child's, formatted."""

    def __init__(self, message: str, error_type: str, traceback: str = "") -> None:
        super().__init__(message, error_type)
        self.traceback = traceback
