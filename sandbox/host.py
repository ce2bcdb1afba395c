"""One session's sandbox, as the server sees it.

    Sandbox.start(directory)
        pool.acquire() ─▶ Load ─▶ Progress(a.py) … Progress(b.py) ─▶ Loaded
                         │ a file hangs past file_timeout, or the child dies on it:
                         └▶ kill the child, report that file, acquire another child,
                            Load again without it; all within load_timeout
    list() / system_prompt() / tools() / call_tool() / ping()
        one request at a time, each under call_timeout; a missed deadline or a dead
        child means kill, restart on the same directory, then raise
        SandboxTimeout / SandboxCrashed so the session can tell its client
    close()  kill the process group and reap it

A sandbox never changes directory: a reload is a new ``Sandbox`` swapped in by the
caller once it has loaded, then the old one closed.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from . import wire
from .errors import CallFailed, LoadFailed, SandboxCrashed, SandboxError, SandboxTimeout
from .pool import Pool, directory_fingerprint
from .process import ChildDied, ChildProcess

_R = TypeVar("_R", bound=wire.Message)


def died_how(child: ChildProcess, died: ChildDied) -> str:
    """How a child ended: its exit status once reaped, else what broke."""
    if child.exitcode is not None and not str(died).startswith("it "):
        return child.exit_description()
    return str(died)


async def _preload(pool: Pool, directory: str, max_characters: int) -> None:
    """Load ``directory`` into a sandbox that nobody uses yet, and give it to the
    pool to keep warm (its files' fingerprint taken before the load)."""
    fingerprint = await asyncio.to_thread(directory_fingerprint, directory)
    sandbox = Sandbox(pool, f"warm {directory}")
    try:
        await sandbox._start_cold(directory, max_characters)
    except SandboxError:
        await sandbox.close()
        return
    await pool.keep_warm(directory, max_characters, fingerprint, sandbox)


class LoadReport(msgspec.Struct, kw_only=True):
    """The outcome of loading one directory: the one shape of a load result, which the
    server turns into its WebSocket event and its HTTP answer without copying it."""

    directory: str
    """The host's own word for it, not the child's."""
    total_files: int
    characters: list[wire.CharacterInfo]
    errors: list[wire.FileError]
    """Files skipped, by file name: those the child reported and those that killed it."""
    duration_ms: float

    @classmethod
    def of(
        cls, directory: str, loaded: wire.Loaded, killers: list[wire.FileError], seconds: float
    ) -> LoadReport:
        """The report of the child's ``loaded``, with the files that killed earlier
        children (``killers``), taking ``seconds``."""
        return cls(
            directory=directory,
            total_files=loaded.total_files,
            characters=loaded.characters,
            errors=sorted(killers + loaded.errors, key=lambda error: error.file),
            duration_ms=_milliseconds(seconds),
        )


def _milliseconds(seconds: float) -> float:
    """``seconds`` as milliseconds rounded to 0.01, as load results report them."""
    return round(seconds * 1000, 2)


class _ChildLost(Exception):
    """The child was killed for a reason of ours during a load, not by a file."""


class _FileKilledChild(Exception):
    def __init__(self, error: wire.FileError) -> None:
        super().__init__(error.message)
        self.error = error


class Sandbox:
    def __init__(self, pool: Pool, label: str = "sandbox") -> None:
        self._pool = pool
        self._config = pool.config
        self._observer = pool.observer
        self.label = label
        self._child: ChildProcess | None = None
        self._lock = asyncio.Lock()
        self._directory: str | None = None
        self._excluded: builtins.list[str] = []
        self._max_characters = 100
        self.report: LoadReport | None = None
        self.on_idle_death: Callable[[str], None] | None = None
        """Told why, when the child dies between requests (killed for burning CPU
        while idle, or a thread of character code ended it); the next call restarts it."""

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    async def start(self, directory: str, max_characters: int = 100) -> LoadReport:
        """Load ``directory`` (an absolute path the caller has checked) into a child:
        a child the pool kept warm with it, if its files are unchanged, else a fresh
        one. Then the pool may warm another for the next load of the same directory.

        Raises ``LoadFailed`` (the directory cannot be imported at all, or it holds
        more than ``max_characters`` files) or ``SandboxTimeout`` (past load_timeout).
        """
        if self._directory is not None:
            raise RuntimeError("a Sandbox loads one directory; make a new one to reload")
        started = time.perf_counter()
        warm = await self._pool.take_warm(directory, max_characters)
        if warm is not None:
            report = await self._take_over(warm, started)
        else:
            report = await self._start_cold(directory, max_characters)
        self._pool.warm_up(directory, lambda: _preload(self._pool, directory, max_characters))
        return report

    async def _start_cold(self, directory: str, max_characters: int) -> LoadReport:
        async with self._lock:
            if self._directory is not None:
                raise RuntimeError("a Sandbox loads one directory; make a new one to reload")
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._config.load_timeout):
                    child, loaded, errors = await self._load(directory, [], max_characters)
            except TimeoutError:
                self._observer.timed_out(self.label, f"load of {directory}")
                raise SandboxTimeout(
                    f"loading {directory} took longer than {self._config.load_timeout:g} s"
                ) from None
            self._adopt(child)
            self._directory = directory
            self._max_characters = max_characters
            self._excluded = [error.file for error in errors]
            seconds = time.perf_counter() - started
            self.report = LoadReport.of(directory, loaded, errors, seconds)
            self._observer.call("load", seconds)
            return self.report

    async def _take_over(self, warm: Sandbox, started: float) -> LoadReport:
        """Adopt the child (and what it loaded) of a sandbox the pool kept warm."""
        async with self._lock, warm._lock:
            if self._directory is not None:
                raise RuntimeError("a Sandbox loads one directory; make a new one to reload")
            child, report = warm._child, warm.report
            assert child is not None and report is not None  # the pool keeps loaded ones
            warm._child = None
            self._adopt(child)
            self._directory, self._max_characters = warm._directory, warm._max_characters
            self._excluded = warm._excluded
            seconds = time.perf_counter() - started
            report.duration_ms = _milliseconds(seconds)
            self.report = report
            self._observer.call("load", seconds)
            return report

    @property
    def alive(self) -> bool:
        """Loaded, and its child still running."""
        return self._child is not None and self._child.alive

    async def list(self) -> builtins.list[wire.CharacterInfo]:
        reply = await self._call(lambda id: wire.ListCharacters(id=id), "list", wire.Listed)
        return reply.characters

    async def system_prompt(self, name: str) -> str:
        reply = await self._call(
            lambda id: wire.SystemPrompt(id=id, name=name), "system_prompt", wire.Prompt
        )
        return reply.text

    async def tools(self, name: str) -> builtins.list[dict[str, Any]]:
        reply = await self._call(lambda id: wire.GetTools(id=id, name=name), "tools", wire.Tools)
        try:
            tools = json.loads(reply.tools)
        except (ValueError, RecursionError):
            tools = None
        if not isinstance(tools, builtins.list) or not all(
                isinstance(tool, dict) for tool in tools):
            raise CallFailed(f"{name}'s tools did not come back as a JSON list", "InvalidTools")
        return tools

    async def call_tool(self, name: str, tool: str, arguments: dict[str, Any]) -> str:
        reply = await self._call(
            lambda id: wire.CallTool(id=id, name=name, tool=tool, arguments=arguments),
            "call_tool", wire.ToolResult,
        )
        return reply.result

    async def ping(self) -> int:
        """The child's pid (as the server sees it), once it answered."""
        await self._call(lambda id: wire.Ping(id=id), "ping", wire.Pong)
        assert self._child is not None  # our own invariant: _call leaves a child in place
        return self._child.pid

    async def close(self) -> None:
        async with self._lock:
            if self._child is not None:
                await self._pool.release(self._child)
                self._child = None

    # ── internals ────────────────────────────────────────────────────────────

    async def _load(
        self, directory: str, exclude: builtins.list[str], max_characters: int
    ) -> tuple[ChildProcess, wire.Loaded, builtins.list[wire.FileError]]:
        """Load into fresh children until one survives; each killer file is excluded.
        The pool refills once the load is over, not beside it."""
        try:
            return await self._load_until_one_survives(directory, exclude, max_characters)
        finally:
            self._pool.replenish()

    async def _load_until_one_survives(
        self, directory: str, exclude: builtins.list[str], max_characters: int
    ) -> tuple[ChildProcess, wire.Loaded, builtins.list[wire.FileError]]:
        errors: builtins.list[wire.FileError] = []
        exclude = builtins.list(exclude)
        for _ in range(self._config.max_restarts_per_load + 1):
            child = await self._pool.acquire()
            try:
                loaded = await self._load_into(child, directory, exclude, max_characters)
            except _ChildLost:
                await self._pool.release(child)
                continue  # not the files' fault: try again on a fresh child
            except _FileKilledChild as killed:
                await self._pool.release(child)
                if killed.error.file == "__init__.py":
                    raise LoadFailed(
                        f"{directory}/__init__.py {killed.error.message}", "PackageError"
                    ) from None
                errors.append(killed.error)
                exclude.append(killed.error.file)
                continue
            except BaseException:
                await self._pool.release(child)
                raise
            return child, loaded, errors
        raise LoadFailed(
            f"{len(errors)} files of {directory} killed the sandbox; giving up. "
            f"Fix or remove: {', '.join(error.file for error in errors)}"
        )

    async def _load_into(
        self, child: ChildProcess, directory: str, exclude: builtins.list[str], max_characters: int
    ) -> wire.Loaded:
        request = wire.Load(
            id=child.next_id(), directory=directory, exclude=exclude,
            max_characters=max_characters, code=self._pool.code_cache.get(directory),
        )
        file_timeout = self._config.file_timeout
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(file_timeout)
        current, running = "__init__.py", False

        def progress(reply: wire.Progress | wire.Compiled) -> None:
            """Each file gets ``file_timeout`` from its Progress on (called from the
            channel's reader, so a load wakes this coroutine once, at its end)."""
            nonlocal current, running
            match reply:
                case wire.Progress(file=file, running=is_running):
                    current, running = file, running or is_running
                    deadline.reschedule(loop.time() + file_timeout)
                case wire.Compiled(blobs=blobs) if not running:
                    # No character code has run in this child yet: trustworthy.
                    self._pool.code_cache.put(directory, blobs)
                case _:
                    child.kill_now(f"it sent {type(reply).__name__} after running a file")

        replies = child.expect(request.id, progress)
        try:
            async with deadline:
                await child.send_frame(request)
                reply = await child.receive(replies)
            match reply:
                case wire.Loaded():
                    self._report_output(reply.output)
                    return reply
                case wire.Failed(error_type=error_type, message=message):
                    self._report_output(reply.output)
                    raise LoadFailed.of(message, error_type)
                case _:
                    child.kill_now(f"it sent {type(reply).__name__} during a load")
                    raise ChildDied(child.dead_reason)
        except TimeoutError:
            self._observer.timed_out(self.label, f"{directory}/{current}")
            raise _FileKilledChild(
                wire.FileError(
                    file=current,
                    error_type="Timeout",
                    message=f"did not finish loading within {file_timeout:g} s (an endless loop?)",
                )
            ) from None
        except ChildDied as died:
            if child.innocent:
                raise _ChildLost() from None
            await child.wait_exit(1.0)
            how = died_how(child, died)
            self._observer.crashed(self.label, f"{directory}/{current}: {how}")
            raise _FileKilledChild(
                wire.FileError(
                    file=current,
                    error_type="Crashed",
                    message=f"killed the sandbox interpreter while loading: {how}",
                )
            ) from None
        finally:
            child.finish(request.id)

    async def _call(self, make: Any, method: str, expected: type[_R]) -> _R:
        """One request under ``call_timeout``. A missed deadline, a dead child or a
        reply of the wrong type: kill, restart on the same directory, raise. A caller
        cancelled mid-call costs nothing: the child's late reply is dropped."""
        async with self._lock:
            if self._child is None or self._directory is None or not self._child.alive:
                # Never started, or died between requests (already told through
                # on_idle_death): start afresh on the same directory.
                await self._restart("the sandbox was not running")
            child = self._child
            assert child is not None  # our own invariant: _restart sets it or raises
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._config.call_timeout):
                    reply = await child.request(make(child.next_id()))
                if not isinstance(reply, expected | wire.Failed):
                    child.kill_now(
                        f"it answered {method} with {type(reply).__name__}, "
                        f"not {expected.__name__}"
                    )
                    raise ChildDied(child.dead_reason)
            except TimeoutError:
                self._observer.timed_out(self.label, method)
                await self._restart(f"{method} timed out")
                raise SandboxTimeout(
                    f"character code did not answer {method} within "
                    f"{self._config.call_timeout:g} s; the sandbox was restarted"
                ) from None
            except ChildDied as died:
                await child.wait_exit(1.0)
                how = died_how(child, died)
                self._observer.crashed(self.label, f"{method}: {how}")
                await self._restart(f"{method} crashed")
                raise SandboxCrashed(
                    f"the sandbox died during {method} ({how}); it was restarted"
                ) from None
            finally:
                self._observer.call(method, time.perf_counter() - started)
            if isinstance(reply, wire.Failed):
                self._report_output(reply.output)
                raise CallFailed(reply.message, reply.error_type, reply.traceback)
            self._report_output(getattr(reply, "output", ""))
            return reply

    async def _restart(self, why: str) -> None:
        """Replace the child with a fresh one on the same directory (lock held)."""
        if self._child is not None:
            await self._pool.release(self._child)
            self._child = None
        if self._directory is None:
            raise SandboxCrashed(f"{why}, and no directory was ever loaded")
        try:
            async with asyncio.timeout(self._config.load_timeout):
                child, _, errors = await self._load(
                    self._directory, self._excluded, self._max_characters
                )
        except (TimeoutError, SandboxError) as exc:
            raise SandboxCrashed(
                f"{why}, and reloading {self._directory} failed ({exc}); reload a directory"
            ) from None
        self._adopt(child)
        self._excluded += [error.file for error in errors]

    def _adopt(self, child: ChildProcess) -> None:
        self._child = child
        child.on_idle_death = self._died_idle

    def _died_idle(self, reason: str) -> None:
        self._observer.crashed(self.label, f"between requests: {reason}")
        if self.on_idle_death is not None:
            self.on_idle_death(reason)

    def _report_output(self, text: str) -> None:
        """Character output, cut to the child's cap here too (a file writing frames
        itself would bypass the child's own)."""
        if text:
            self._observer.output(self.label, text[: self._config.limits.output_bytes])
