"""A set of characters loaded in a sandbox, and how a reload replaces it.

    load(requested)
      directories.resolve ─▶ count files ─▶ new Sandbox.start(path) ─▶ swap in
      (any refusal raises TroupeError and leaves the current set as it was)
    retire(): kill the previous sandbox, after the client has its answer

A load's result is one shape, ``Loaded`` (the sandbox's ``LoadReport``, timed from the
request), turned once into the WebSocket event (``event()``) and once into the HTTP
answer (``fields()``, the event's fields without its envelope).

Used by each session and by the server-wide set behind ``/v1/voices``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from sandbox import (
    CharacterInfo,
    LoadReport,
    Pool,
    Sandbox,
    SandboxError,
)

from .. import metrics
from ..config import Config
from ..errors import TroupeError, from_sandbox
from . import directories
from . import events as protocol  # the event Structs moved here (conversation/events.py)
from . import voices as dialects  # voice_path moved here (conversation/voices.py)


class Loaded(LoadReport, kw_only=True):
    """What a successful load reports to the client: the sandbox's report, with
    ``duration_ms`` counted from the request (resolving the path included)."""

    def event(self) -> protocol.CharactersReloaded:
        """The ``session.characters.reloaded`` event (DESIGN.md §2)."""
        return protocol.CharactersReloaded(
            directory=self.directory,
            loaded_count=len(self.characters),
            error_count=len(self.errors),
            total_files=self.total_files,
            characters=summaries(self.characters),
            errors=self.errors,
            duration_ms=self.duration_ms,
        )

    def fields(self) -> dict[str, Any]:
        """The event's fields as JSON-ready builtins, without ``type`` and ``event_id``:
        the body of the HTTP reload's answer."""
        fields: dict[str, Any] = msgspec.to_builtins(self.event())
        del fields["type"], fields["event_id"]
        return fields


def summaries(characters: list[CharacterInfo]) -> list[protocol.CharacterSummary]:
    """What clients see of each character: its name, ``good`` and ``comment``."""
    return [protocol.CharacterSummary(c.name, c.good, c.comment) for c in characters]


class CharacterSet:
    def __init__(
        self, pool: Pool, config: Config, label: str,
        on_sandbox_death: Callable[[str], None] | None = None,
    ) -> None:
        self._pool = pool
        self._config = config
        self.label = label
        self._on_sandbox_death = on_sandbox_death
        """Told why when the set's sandbox dies between requests (it restarts on the
        next one)."""
        self.sandbox: Sandbox | None = None
        self.report: LoadReport | None = None
        self.requested: str | None = None
        """The directory as the client asked for the set in place (``"default"`` or
        a path): what another replica loads to resume the conversation."""
        self._retired: list[Sandbox] = []
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def characters(self) -> list[CharacterInfo]:
        return self.report.characters if self.report is not None else []

    @property
    def directory(self) -> str:
        return self.report.directory if self.report is not None else ""

    def listed(self, characters: list[CharacterInfo]) -> protocol.CharactersListed:
        """The ``session.characters.listed`` event for ``characters``, as the set's
        sandbox listed them."""
        return protocol.CharactersListed(
            directory=self.directory,
            character_count=len(characters),
            characters=summaries(characters),
        )

    def find(self, voice: str) -> CharacterInfo | None:
        """The character named ``voice``, else the one whose voice path is ``voice``:
        the ``path_on_server`` that ``/v1/voices`` shows for it, or the one its file
        gives. The TTS still speaks with the character's own ``voice_source``."""
        for character in self.characters:
            if character.name == voice:
                return character
        for character in self.characters:
            source = character.voice_source
            if voice in (dialects.voice_path(character.name, source),
                         source.get("path_on_server")):
                return character
        return None

    async def load(self, requested: str) -> Loaded:
        """Load ``requested`` (a path or ``"default"``) into a new sandbox and swap it in.

        Raises ``TroupeError`` with the code the client should see; on any error the
        current set stays in place.
        """
        started = time.perf_counter()
        path = directories.resolve(
            requested, self._config.characters_dir, self._config.allowed_roots
        )
        limit = self._config.max_characters
        count = directories.count_character_files(path)
        if count > limit:
            raise TroupeError(
                "too_many_characters",
                f"{requested} holds {count} character files; this server allows {limit} "
                "(--max-characters)",
                param="directory",
                details={"total_files": count, "limit": limit},
            )
        sandbox = Sandbox(self._pool, self.label)
        sandbox.on_idle_death = self._on_sandbox_death
        try:
            report = await sandbox.start(str(path), limit)
        except SandboxError as exc:
            await sandbox.close()
            raise from_sandbox(exc, f"loading {requested}") from None
        except BaseException:
            await sandbox.close()
            raise
        for error in report.errors:  # counted whether or not the set is swapped in
            metrics.CHARACTER_LOAD_ERRORS.labels(metrics.error_type_label(error.error_type)).inc()
        if not report.characters:
            await sandbox.close()
            raise TroupeError(
                "no_valid_characters",
                f"none of the {report.total_files} files in {requested} defines a valid "
                "character; see details.errors",
                param="directory",
                details={"total_files": report.total_files,
                         "errors": msgspec.to_builtins(report.errors)},
            )
        duration = time.perf_counter() - started
        loaded = Loaded(
            directory=report.directory,
            total_files=report.total_files,
            characters=report.characters,
            errors=report.errors,
            duration_ms=round(duration * 1000, 2),
        )
        if self.sandbox is not None:
            self._retired.append(self.sandbox)
        self.sandbox, self.report, self.requested = sandbox, loaded, requested
        metrics.CHARACTER_RELOAD_DURATION.observe(duration)
        return loaded

    def adopt(self, label: str, on_sandbox_death: Callable[[str], None] | None) -> None:
        """The set goes on in a new session (a resumed conversation)."""
        self.label, self._on_sandbox_death = label, on_sandbox_death
        if self.sandbox is not None:
            self.sandbox.on_idle_death = on_sandbox_death

    def retire(self) -> None:
        """Kill the sandboxes that loads have replaced, in the background: the next
        request of the session need not wait for the old child to be reaped."""
        while self._retired:
            task = asyncio.create_task(self._retired.pop().close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self.retire()
        await asyncio.gather(*self._closing)
        if self.sandbox is not None:
            await self.sandbox.close()
            self.sandbox = None

