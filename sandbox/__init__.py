"""Sandboxed character interpreters: one child process per session.

Public surface: ``Pool`` (pre-started children), ``Sandbox`` (one session's loaded
directory), ``SandboxConfig``/``ChildLimits``, the errors and ``Observer``. This
package never imports the server or aiohttp.
"""

from .config import ChildLimits, SandboxConfig
from .errors import (
    CallFailed,
    DirectoryNotFound,
    DirectoryNotReadable,
    LoadFailed,
    SandboxCrashed,
    SandboxError,
    SandboxTimeout,
    SandboxUnavailable,
    TooManyCharacters,
)
from .host import LoadReport, Sandbox
from .observer import Observer
from .pool import Pool
from .wire import CharacterInfo, FileError

__all__ = [
    "CallFailed",
    "CharacterInfo",
    "ChildLimits",
    "DirectoryNotFound",
    "DirectoryNotReadable",
    "FileError",
    "LoadFailed",
    "LoadReport",
    "Observer",
    "Pool",
    "Sandbox",
    "SandboxConfig",
    "SandboxCrashed",
    "SandboxError",
    "SandboxTimeout",
    "SandboxUnavailable",
    "TooManyCharacters",
]
