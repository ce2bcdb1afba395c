"""Child side: import a character directory and validate every file (DESIGN.md §3).

The directory becomes the package ``characters`` (its ``__init__.py`` runs if there is
one), so ``from characters.resources.x import y`` works inside character files. Each
``*.py`` file in sorted order (``__init__.py`` and ``_*`` skipped) is executed as its
own module; a file that raises or fails validation is reported with an error type and
skipped, the rest load. Duplicate names: the first file wins.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

import msgspec

from .wire import MAX_TOOLS_JSON, CharacterInfo, VoiceSource

PACKAGE = "characters"
_MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CharacterError(Exception):
    """A file that cannot be a character; ``error_type`` goes to the client."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class PackageError(Exception):
    """The directory as a whole cannot be imported (its ``__init__.py`` failed)."""


class Character:
    """One loaded character, with the prompt generator instance it keeps."""

    def __init__(self, info: CharacterInfo, module: ModuleType, tools: list[dict[str, Any]]):
        self.info = info
        self.tools = tools
        self._module = module
        self._generator: Any = None

    @property
    def generator(self) -> Any:
        """The file's ``PromptGenerator(INSTRUCTIONS)``, created on first use, then kept
        for the session so that tool calls can hold state."""
        if self._generator is None:
            self._generator = self._module.PromptGenerator(self._module.INSTRUCTIONS)
        return self._generator


def character_files(directory: Path) -> list[Path]:
    """The candidate character files of ``directory``, in load order."""
    with os.scandir(directory) as entries:
        return sorted(
            Path(entry.path)
            for entry in entries
            if entry.name.endswith(".py") and not entry.name.startswith("_") and entry.is_file()
        )


def compile_file(path: Path) -> CodeType:
    """Compile one file (no character code runs). Raises ``SyntaxError``, ``OSError``."""
    return compile(path.read_bytes(), str(path), "exec", dont_inherit=True)


def import_package(directory: Path, code: CodeType | None) -> None:
    """Make ``directory`` the package ``characters``, running ``code`` (its compiled
    ``__init__.py``, if it has one). Raises ``PackageError``."""
    init = directory / "__init__.py"
    if code is not None:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, init, submodule_search_locations=[str(directory)]
        )
    else:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(directory)]
    assert spec is not None  # a .py path always has a spec
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    if code is not None:
        try:
            exec(code, package.__dict__)
        except BaseException as exc:
            del sys.modules[PACKAGE]
            raise PackageError(f"{init} raised {type(exc).__name__}: {exc}") from exc


def load_file(path: Path, code: CodeType) -> Character:
    """Execute one character file's ``code`` and validate it. Raises ``CharacterError``
    or whatever the file raises."""
    module = _execute(path, code)
    name = _required(module, "CHARACTER_NAME", str)
    if not name.strip():
        raise CharacterError("InvalidAttribute", "CHARACTER_NAME is empty")
    voice_source = _required(module, "VOICE_SOURCE", dict)
    _check_voice_source(voice_source)
    _required(module, "INSTRUCTIONS", dict)
    generator = getattr(module, "PromptGenerator", None)
    if not isinstance(generator, type) or not callable(
        getattr(generator, "make_system_prompt", None)
    ):
        raise CharacterError(
            "MissingPromptGenerator",
            "define `class PromptGenerator` taking INSTRUCTIONS, with make_system_prompt()",
        )
    good, comment = _metadata(module)
    tools = _tools(module, generator)
    info = CharacterInfo(
        name=name,
        file=path.name,
        voice_source=voice_source,
        good=good,
        comment=comment,
        tool_names=[tool["function"]["name"] for tool in tools],
    )
    return Character(info, module, tools)


def describe(exc: BaseException) -> tuple[str, str]:
    """Error type and message for an exception raised while loading a file."""
    if isinstance(exc, CharacterError):
        return exc.error_type, str(exc)
    if isinstance(exc, SyntaxError):
        return "SyntaxError", f"line {exc.lineno}: {exc.msg}"
    if isinstance(exc, ImportError):
        return "ImportError", str(exc)
    if isinstance(exc, MemoryError):
        return "MemoryLimitExceeded", "the file used more memory than the sandbox allows"
    return type(exc).__name__, str(exc) or repr(exc)


def _execute(path: Path, code: CodeType) -> ModuleType:
    stem = re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{stem}", path)
    if spec is None:
        raise CharacterError("ImportError", f"cannot import {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _required(module: ModuleType, attribute: str, kind: type) -> Any:
    if not hasattr(module, attribute):
        raise CharacterError("MissingAttribute", f"{attribute} is not defined")
    value = getattr(module, attribute)
    if not isinstance(value, kind):
        raise CharacterError(
            "InvalidAttribute",
            f"{attribute} must be a {kind.__name__}, not {type(value).__name__}",
        )
    return value


def _check_voice_source(voice_source: dict[str, Any]) -> None:
    if not isinstance(voice_source.get("source_type"), str):
        raise CharacterError(
            "InvalidVoiceSource", "VOICE_SOURCE needs a string 'source_type' (e.g. 'file')"
        )
    _require_json("InvalidVoiceSource", "VOICE_SOURCE", voice_source)
    try:
        msgspec.convert(voice_source, VoiceSource)
    except msgspec.ValidationError as exc:
        raise CharacterError(
            "InvalidVoiceSource",
            f"VOICE_SOURCE must map at most 32 names to strings, numbers, booleans or None "
            f"(or to one flat dict of those): {exc}",
        ) from None


def _metadata(module: ModuleType) -> tuple[bool | None, str | None]:
    metadata = getattr(module, "METADATA", {})
    if not isinstance(metadata, dict):
        raise CharacterError("InvalidMetadata", "METADATA must be a dict")
    good, comment = metadata.get("good"), metadata.get("comment")
    if good is not None and not isinstance(good, bool):
        raise CharacterError("InvalidMetadata", "METADATA['good'] must be True, False or None")
    if comment is not None and not isinstance(comment, str):
        raise CharacterError("InvalidMetadata", "METADATA['comment'] must be a string or None")
    return good, comment


def _tools(module: ModuleType, generator: type) -> list[dict[str, Any]]:
    """Validate TOOLS; return them in the chat-completions shape
    ``{"type": "function", "function": {"name", "description", "parameters"}}``."""
    raw = getattr(module, "TOOLS", None)
    if raw is None or raw == []:
        return []
    if not isinstance(raw, list):
        raise CharacterError("InvalidTools", "TOOLS must be a list of function definitions")
    if len(raw) > _MAX_TOOLS:
        raise CharacterError("InvalidTools", f"TOOLS holds {len(raw)} tools; at most {_MAX_TOOLS}")
    tools, names = [], set()
    for index, entry in enumerate(raw):
        function = entry.get("function", entry) if isinstance(entry, dict) else None
        if not isinstance(function, dict) or entry.get("type", "function") != "function":
            raise CharacterError("InvalidTools", f"TOOLS[{index}] is not a function definition")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise CharacterError(
                "InvalidTools", f"TOOLS[{index}] needs a name of 1-64 letters, digits, _ or -"
            )
        if name in names:
            raise CharacterError("InvalidTools", f"tool name {name!r} is used twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise CharacterError(
                "InvalidTools", f"tool {name!r}: parameters must be a JSON schema of type object"
            )
        tool = {
            "type": "function",
            "function": {
                "name": name,
                "description": str(function.get("description", "")),
                "parameters": parameters,
            },
        }
        _require_json("InvalidTools", f"tool {name!r}", tool)
        tools.append(tool)
    if len(json.dumps(tools)) > MAX_TOOLS_JSON:
        raise CharacterError("InvalidTools", f"TOOLS is over {MAX_TOOLS_JSON} bytes as JSON")
    handler: Callable[..., Any] | None = getattr(generator, "handle_tool_call", None)
    if not callable(handler):
        raise CharacterError(
            "MissingToolHandler",
            "TOOLS is set, so PromptGenerator needs handle_tool_call(name, arguments) -> str",
        )
    return tools


def _require_json(error_type: str, what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CharacterError(error_type, f"{what} must hold only JSON values: {exc}") from exc
