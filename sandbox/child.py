"""The sandbox child: one interpreter holding one session's characters.

Forked by the zygote (``sandbox.zygote``, which has this module imported), it
contains itself (``containment.enter``; Landlock once it knows its directory), then
serves requests from its channel one at a time until the channel closes:

    Load         → Progress(file) before each file … Loaded(characters, errors)
    ListCharacters → Listed        SystemPrompt → Prompt     GetTools → Tools
    CallTool     → ToolResult      Ping → Pong               anything failing → Failed

Keep this module's imports small: the zygote imports it once and every child starts
from that copy. Nothing may be imported lazily after ``confine``: the server's own
tree is unreadable from then on.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import sys
import traceback
from pathlib import Path
from types import CodeType
from typing import Any

from . import containment, landlock, loader, wire
from .config import ChildLimits


class Child:
    """Request handlers; state is the loaded characters, by name."""

    def __init__(self, fd: int, output: containment.CappedOutput, landlocked: bool) -> None:
        self.fd = fd
        self.output = output
        self.landlocked = landlocked
        self.characters: dict[str, loader.Character] = {}
        self.loaded = False

    def serve(self) -> None:
        while (frame := wire.read_frame(self.fd)) is not None:
            request = wire.decode_request(frame)
            try:
                reply = self.handle(request)
            except BaseException as exc:  # character code may raise anything
                text, _ = self.output.take()
                reply = wire.Failed(
                    id=request.id,
                    error_type=getattr(exc, "error_type", type(exc).__name__),
                    message=str(exc) or repr(exc),
                    traceback=traceback.format_exc(limit=8),
                    output=text,
                )
            wire.write_frame(self.fd, reply)

    def handle(self, request: wire.Request) -> wire.Reply:
        match request:
            case wire.Load(id, directory, exclude, max_characters, code):
                return self.load(id, Path(directory), set(exclude), max_characters, code)
            case wire.ListCharacters(id):
                return wire.Listed(id=id, characters=[c.info for c in self.characters.values()])
            case wire.SystemPrompt(id, name):
                text = self.character(name).generator.make_system_prompt()
                if not isinstance(text, str):
                    raise TypeError(f"make_system_prompt() returned {type(text).__name__}, not str")
                return wire.Prompt(id=id, text=text, output=self.output.take()[0])
            case wire.GetTools(id, name):
                return wire.Tools(id=id, tools=json.dumps(self.character(name).tools))
            case wire.CallTool(id, name, tool, arguments):
                return wire.ToolResult(id=id, result=self.call_tool(name, tool, arguments),
                                       output=self.output.take()[0])
            case wire.Ping(id):
                return wire.Pong(id=id, pid=os.getpid())

    def character(self, name: str) -> loader.Character:
        try:
            return self.characters[name]
        except KeyError:
            raise LookupError(f"no character named {name!r} in this sandbox") from None

    def call_tool(self, name: str, tool: str, arguments: dict[str, Any]) -> str:
        character = self.character(name)
        if tool not in character.info.tool_names:
            raise LookupError(f"{name!r} has no tool named {tool!r}")
        result = character.generator.handle_tool_call(tool, arguments)
        if not isinstance(result, str):
            raise TypeError(f"handle_tool_call() returned {type(result).__name__}, not str")
        return result

    def load(
        self, id: int, directory: Path, exclude: set[str], max_characters: int,
        cached: list[wire.CodeBlob],
    ) -> wire.Reply:
        if self.loaded:
            raise RuntimeError("this sandbox already holds a directory; start a new one")
        self.loaded = True
        if self.landlocked:
            try:
                containment.confine(str(directory))
            except landlock.LandlockError as exc:
                raise loader.CharacterError("SandboxError", f"cannot confine: {exc}") from None
        candidates = loader.character_files(directory)
        if len(candidates) > max_characters:
            raise loader.CharacterError(
                "TooManyCharacters",
                f"{directory} holds {len(candidates)} character files; "
                f"the limit is {max_characters}",
            )
        files = [path for path in candidates if path.name not in exclude]
        init = directory / "__init__.py"
        code, failures = self._compile(id, ([init] if init.is_file() else []) + files, cached)
        if init.name in failures:
            error_type, message = failures[init.name]
            raise loader.CharacterError("PackageError", f"{init}: {error_type}: {message}")
        wire.write_frame(self.fd, wire.Progress(id=id, file=init.name))
        try:
            loader.import_package(directory, code.get(init.name))
        except loader.PackageError as exc:
            raise loader.CharacterError("PackageError", str(exc)) from None
        errors: list[wire.FileError] = []
        outputs = [self.output.take()[0]]
        for path in files:
            wire.write_frame(self.fd, wire.Progress(id=id, file=path.name))
            error = failures.get(path.name) or self._load_one(path, code[path.name])
            outputs.append(self.output.take()[0])
            if error is not None:
                errors.append(wire.FileError(file=path.name, error_type=error[0], message=error[1]))
        return wire.Loaded(
            id=id,
            directory=str(directory),
            total_files=len(candidates),
            characters=[c.info for c in self.characters.values()],
            errors=errors,
            output="".join(outputs)[: self.output.limit],
        )

    def _compile(
        self, id: int, paths: list[Path], cached: list[wire.CodeBlob]
    ) -> tuple[dict[str, CodeType], dict[str, tuple[str, str]]]:
        """Code for every path, from the host's cache when the stamp matches, else
        compiled here; the fresh ones go to the host before any character code runs."""
        by_file = {blob.file: blob for blob in cached}
        code: dict[str, CodeType] = {}
        failures: dict[str, tuple[str, str]] = {}
        fresh = []
        for path in paths:
            try:
                info = path.stat()
            except OSError as exc:
                failures[path.name] = type(exc).__name__, str(exc)
                continue
            stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
            blob = by_file.get(path.name)
            if blob is not None and blob.stamp == stamp:
                code[path.name] = marshal.loads(blob.code)
                continue
            wire.write_frame(self.fd, wire.Progress(id=id, file=path.name, running=False))
            try:
                code[path.name] = loader.compile_file(path)
            except BaseException as exc:  # SyntaxError, OSError, MemoryError, RecursionError
                failures[path.name] = loader.describe(exc)
                continue
            fresh.append(wire.CodeBlob(path.name, stamp, marshal.dumps(code[path.name])))
        wire.write_frame(self.fd, wire.Compiled(id=id, blobs=fresh))
        return code, failures

    def _load_one(self, path: Path, code: CodeType) -> tuple[str, str] | None:
        try:
            character = loader.load_file(path, code)
        except BaseException as exc:  # character code may raise anything, SystemExit too
            failure: tuple[str, str] | None = loader.describe(exc)
        else:
            failure = None
        if self.output.overflowed:
            return "OutputLimitExceeded", (
                f"the file wrote more than {self.output.limit} bytes to stdout/stderr"
            )
        if failure is not None:
            return failure
        name = character.info.name
        if name in self.characters:
            first = self.characters[name].info.file
            return "DuplicateName", f"{name!r} is already defined by {first}, which wins"
        self.characters[name] = character
        return None


def main(
    channel: int, limits: ChildLimits, seccomp_program: bytes | None, namespaces: list[str]
) -> None:
    """Process body (never returns): contain, announce readiness with a Pong, serve."""
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)
    try:
        protections = namespaces + containment.enter(limits, channel, seccomp_program)
        os.environ["TROUPE_LLM_NAME"] = limits.llm_name
        # No threads in a sandbox (seccomp): numeric libraries must not try to start any.
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = "1"
        output = containment.CappedOutput(limits.output_bytes)
        sys.stdout = sys.stderr = output
        sys.path.insert(0, containment.SHIMS)
        sys.dont_write_bytecode = True
        child = Child(channel, output, "landlock" in protections)
        wire.write_frame(channel, wire.Pong(id=0, pid=os.getpid(), protections=protections))
        child.serve()
    finally:
        os._exit(0)
