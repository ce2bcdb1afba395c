"""Which character directories a session may load (DESIGN.md §4).

``"default"`` is always allowed. Any other path must be absolute and, once ``..`` and
symlinks are resolved, lie inside one of the configured allowed roots; only then is it
checked for existence and readability, so that a refused path reveals nothing about
the file system. Readability is judged by the permission bits, as an unprivileged
sandbox would see them, even when the server runs as root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import TroupeError

DEFAULT = "default"


def resolve(requested: str, default: Path, allowed_roots: tuple[Path, ...]) -> Path:
    """The real path to load for ``requested``. Raises ``TroupeError``."""
    if requested == DEFAULT:
        return default.resolve()
    if not requested or "\x00" in requested or not os.path.isabs(requested):
        raise TroupeError(
            "invalid_directory_format",
            f"directory must be an absolute path or 'default', got {requested!r}",
            param="directory",
        )
    path = Path(requested).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in allowed_roots):
        roots = ", ".join(str(root) for root in allowed_roots) or "none"
        raise TroupeError(
            "directory_not_allowed",
            f"{requested} is outside the roots this session may load ({roots}); the "
            "operator allows roots with --allowed-root, or per API key with allowed_roots "
            "in the keys file",
            param="directory",
        )
    try:
        info = path.stat()
    except FileNotFoundError:
        raise TroupeError(
            "directory_not_found", f"{requested} does not exist", param="directory"
        ) from None
    except PermissionError:
        raise TroupeError(
            "directory_not_readable", f"{requested} cannot be accessed", param="directory"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise TroupeError(
            "invalid_directory_format", f"{requested} is not a directory", param="directory"
        )
    if not _readable(info):
        raise TroupeError(
            "directory_not_readable",
            f"{requested} is not readable and searchable (mode {stat.filemode(info.st_mode)}); "
            "give it r and x permissions",
            param="directory",
        )
    return path


def count_character_files(path: Path) -> int:
    """How many files the sandbox would try to load from ``path``."""
    try:
        with os.scandir(path) as entries:
            return sum(
                1
                for entry in entries
                if entry.name.endswith(".py") and not entry.name.startswith("_")
                and entry.is_file()
            )
    except PermissionError:
        raise TroupeError(
            "directory_not_readable", f"{path} cannot be listed", param="directory"
        ) from None


def _readable(info: os.stat_result) -> bool:
    """r and x for whoever we are, by the mode bits alone (root's override ignored)."""
    needed_user, needed_group, needed_other = (
        stat.S_IRUSR | stat.S_IXUSR,
        stat.S_IRGRP | stat.S_IXGRP,
        stat.S_IROTH | stat.S_IXOTH,
    )
    mode = info.st_mode
    if info.st_uid == os.geteuid():
        return mode & needed_user == needed_user
    if info.st_gid in (os.getegid(), *os.getgroups()):
        return mode & needed_group == needed_group
    return mode & needed_other == needed_other
