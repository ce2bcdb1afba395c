"""Every error code comes from the input that should produce it, over a real WebSocket
session, and the session goes on afterwards with the characters it had
(DESIGN.md §2, §3, §4). Also the per-file validation errors of a successful reload."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Connect,
    MakeServer,
    Realtime,
    character_source,
    error_code,
    write_directory,
)

from server.errors import ERROR_CODES

ROOT = Path(__file__).resolve().parent.parent

# ── helpers ──────────────────────────────────────────────────────────────────


def reload_event(directory: str | Path) -> dict[str, Any]:
    return {"type": "session.characters.reload", "directory": str(directory)}


def select(voice: str) -> dict[str, Any]:
    return {"type": "session.update", "session": {"voice": voice}}


async def assert_refused(
    session: Realtime, code: str, event: dict[str, Any] | None = None,
    *, frame: str | bytes | None = None,
) -> dict[str, Any]:
    """Send ``event`` (or the raw ``frame``), expect an ``error`` with ``code``, and
    check that the session still answers a list with the characters it had.
    Returns the error object."""
    before = await session.names()
    if event is not None:
        await session.send(event)
    elif isinstance(frame, bytes):
        await session.ws.send_bytes(frame)
    else:
        assert frame is not None
        await session.ws.send_str(frame)
    reply = await session.receive()
    assert error_code(reply) == code, reply
    assert await session.names() == before
    error: dict[str, Any] = reply["error"]
    return error


def voice_of(updated: dict[str, Any]) -> str:
    """The selected character in a GA-dialect ``session.updated``."""
    assert updated["type"] == "session.updated", updated
    voice: str = updated["session"]["audio"]["output"]["voice"]
    return voice


def without(name: str, attribute: str) -> str:
    """A character file that deletes one of its required attributes."""
    return character_source(name) + f"del {attribute}\n"


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    parameters = parameters or {"type": "object", "properties": {}}
    return {"type": "function",
            "function": {"name": name, "description": "a tool", "parameters": parameters}}


def with_tools(name: str, tools: list[dict[str, Any]], *, handler: bool = True) -> str:
    source = character_source(name) + f"TOOLS = {tools!r}\n"
    if handler:
        source += textwrap.dedent("""
            def _handle(self, name, arguments):
                return "ok"

            PromptGenerator.handle_tool_call = _handle
            """)
    return source


def with_prompt(name: str, statement: str) -> str:
    """A character whose make_system_prompt runs ``statement``."""
    return character_source(name) + textwrap.dedent(f"""
        def _prompt(self):
            {statement}

        PromptGenerator.make_system_prompt = _prompt
        """)


# file name → (source, the error_type its reload must report)
BROKEN_FILES: dict[str, tuple[str, str]] = {
    "missing_attribute.py": (without("No Voice", "VOICE_SOURCE"), "MissingAttribute"),
    "missing_prompt.py": (without("No Prompt", "PromptGenerator"), "MissingPromptGenerator"),
    "bad_voice.py": (
        character_source("Bad Voice") + "VOICE_SOURCE = {'path_on_server': 'x.wav'}\n",
        "InvalidVoiceSource",
    ),
    "duplicate_tools.py": (with_tools("Twice", [tool("roll"), tool("roll")]), "InvalidTools"),
    "string_parameters.py": (
        with_tools("Stringly", [tool("spell", {"type": "string"})]), "InvalidTools"
    ),
    "no_handler.py": (with_tools("Handless", [tool("roll")], handler=False),
                      "MissingToolHandler"),
    "syntax_error.py": ("CHARACTER_NAME = 'Broken'\ndef oops(:\n    pass\n", "SyntaxError"),
    "import_error.py": (
        character_source("Importer", body="import troupe_no_such_module\n"), "ImportError"
    ),
}


def broken_directory(root: Path, name: str) -> Path:
    return write_directory(root, name, {f: source for f, (source, _) in BROKEN_FILES.items()})


def error_types(errors: list[dict[str, Any]]) -> dict[str, str]:
    return {error["file"]: error["error_type"] for error in errors}


def outside(root: Path) -> Path:
    """A valid character directory next to the allowed root, not inside it."""
    return write_directory(root.parent, "outside", {"anne.py": character_source("Anne")})


def symlink_to_outside(root: Path) -> str:
    link = root / "link"
    link.symlink_to(outside(root), target_is_directory=True)
    return str(link)


def dotdot_out_of_root(root: Path) -> str:
    return f"{root}/../{outside(root).name}"


def regular_file(root: Path) -> str:
    path = root / "anne.py"
    path.write_text(character_source("Anne"))
    return str(path)


# ── directories refused before any sandbox sees them ─────────────────────────


@pytest.mark.parametrize(("make_path", "code"), [
    pytest.param(lambda root: str(root / "nowhere"), "directory_not_found", id="missing"),
    pytest.param(lambda root: "relative/characters", "invalid_directory_format", id="relative"),
    pytest.param(regular_file, "invalid_directory_format", id="regular-file"),
    pytest.param(lambda root: str(outside(root)), "directory_not_allowed", id="outside"),
    pytest.param(dotdot_out_of_root, "directory_not_allowed", id="dotdot-out-of-root"),
    pytest.param(symlink_to_outside, "directory_not_allowed", id="symlink-out-of-root"),
])
async def test_a_refused_directory_leaves_the_set_in_place(
    connect: Connect, allowed_root: Path, make_path: Callable[[Path], str], code: str
) -> None:
    session = await connect()
    directory = make_path(allowed_root)

    error = await assert_refused(session, code, reload_event(directory))

    assert error["type"] == "invalid_request_error"
    assert error["param"] == "directory"
    assert directory in error["message"]


async def test_an_unreadable_directory(connect: Connect, allowed_root: Path) -> None:
    locked = write_directory(allowed_root, "locked", {"anne.py": character_source("Anne")})
    session = await connect()
    locked.chmod(0o000)
    try:
        error = await assert_refused(session, "directory_not_readable", reload_event(locked))
    finally:
        locked.chmod(0o755)

    assert str(locked) in error["message"]


# ── directories a sandbox tried and refused ──────────────────────────────────


async def test_a_directory_without_one_valid_character(
    connect: Connect, allowed_root: Path
) -> None:
    directory = broken_directory(allowed_root, "all-broken")
    session = await connect()

    error = await assert_refused(session, "no_valid_characters", reload_event(directory))

    assert str(directory) in error["message"]
    assert error_types(error["details"]["errors"]) == {
        file: error_type for file, (_, error_type) in BROKEN_FILES.items()
    }


async def test_a_package_init_that_raises(connect: Connect, allowed_root: Path) -> None:
    directory = write_directory(allowed_root, "bad-init", {
        "__init__.py": "raise RuntimeError('this package refuses to import')\n",
        "anne.py": character_source("Anne"),
    })
    session = await connect()

    error = await assert_refused(session, "character_reload_failed", reload_event(directory))

    assert str(directory) in error["message"]


async def test_too_many_character_files(
    make_server: MakeServer, connect: Connect, allowed_root: Path
) -> None:
    directory = write_directory(allowed_root, "crowd", {
        f"person_{i}.py": character_source(f"Person {i}") for i in range(4)
    })
    small_default = write_directory(allowed_root, "small", {"anne.py": character_source("Anne")})
    session = await connect(on=await make_server(max_characters=3, characters_dir=small_default))

    error = await assert_refused(session, "too_many_characters", reload_event(directory))

    assert str(directory) in error["message"]


async def test_the_third_reload_in_a_minute_is_rate_limited(
    make_server: MakeServer, connect: Connect, allowed_root: Path
) -> None:
    first = write_directory(allowed_root, "first", {"anne.py": character_source("Anne")})
    second = write_directory(allowed_root, "second", {"bruno.py": character_source("Bruno")})
    session = await connect(on=await make_server(max_reloads_per_minute=2))

    assert (await session.reload(first))["type"] == "session.characters.reloaded"
    assert (await session.reload(second))["type"] == "session.characters.reloaded"
    await assert_refused(session, "rate_limited", reload_event(first))

    assert await session.names() == ["Bruno"]


# ── character code that dies or hangs ────────────────────────────────────────


@pytest.mark.parametrize(("statement", "code"), [
    pytest.param("import os; os._exit(1)", "sandbox_crashed", id="exit"),
    pytest.param("while True: pass", "sandbox_timeout", id="endless-loop"),
])
async def test_a_prompt_that_kills_or_hangs_the_sandbox(
    connect: Connect, allowed_root: Path, statement: str, code: str
) -> None:
    directory = write_directory(allowed_root, "risky", {
        "anne.py": character_source("Anne"),
        "risky.py": with_prompt("Risky", statement),
    })
    session = await connect()
    await session.reload(directory)

    error = await assert_refused(session, code, select("Risky"))

    assert error["type"] == "server_error"
    assert voice_of(await session.request(select("Anne"))) == "Anne"


async def test_an_unknown_character(connect: Connect) -> None:
    session = await connect()

    error = await assert_refused(session, "character_not_found", select("Nobody At All"))

    assert "Nobody At All" in error["message"]


# ── frames that are not valid events ─────────────────────────────────────────


@pytest.mark.parametrize(("frame", "param"), [
    pytest.param('{"type": "session.characters.list"', None, id="malformed-json"),
    pytest.param(json.dumps({"type": "session.dance"}), "type", id="unknown-type"),
    pytest.param(json.dumps({"event_id": "e1"}), "type", id="no-type"),
    pytest.param(json.dumps({"type": "session.characters.reload", "directory": 5}),
                 "directory", id="wrong-type"),
    pytest.param(json.dumps({"type": "session.update", "session": {"allow_recording": "yes"}}),
                 "session.allow_recording", id="wrong-type-nested"),
    pytest.param(b'{"type": "session.characters.list"}', None, id="binary-frame"),
])
async def test_an_invalid_event(connect: Connect, frame: str | bytes, param: str | None) -> None:
    session = await connect()

    error = await assert_refused(session, "invalid_event", frame=frame)

    assert error["param"] == param


async def test_a_frame_above_the_size_limit(make_server: MakeServer, connect: Connect) -> None:
    session = await connect(on=await make_server(max_message_bytes=1000))
    envelope = json.dumps({"type": "input_audio_buffer.append", "audio": ""})
    frame = json.dumps({"type": "input_audio_buffer.append",
                        "audio": "A" * (5000 - len(envelope))})
    assert len(frame) == 5000

    error = await assert_refused(session, "message_too_large", frame=frame)

    assert "1000" in error["message"]


# ── per-file errors of a successful reload ───────────────────────────────────


async def test_a_reload_reports_each_broken_file_and_loads_the_rest(
    connect: Connect, allowed_root: Path
) -> None:
    directory = broken_directory(allowed_root, "mixed")
    write_directory(allowed_root, "mixed", {
        # written b before a: the sorted order decides, not the order on disk
        "twin_b.py": character_source("Twin", voice_path="voices/twin-b.wav"),
        "twin_a.py": character_source("Twin", voice_path="voices/twin-a.wav"),
        "anne.py": character_source("Anne"),
        "_helper.py": "HELPER = 'not a character'\n",
        "resources/__init__.py": "",
        "resources/names.py": "GREETER_NAME = 'Greta from resources'\n",
        "greeter.py": character_source(
            "placeholder", body="from characters.resources.names import GREETER_NAME\n"
        ) + "CHARACTER_NAME = GREETER_NAME\n",
    })
    session = await connect()

    reloaded = await session.reload(directory)

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert {c["name"] for c in reloaded["characters"]} == {"Anne", "Twin", "Greta from resources"}
    assert error_types(reloaded["errors"]) == {
        file: error_type for file, (_, error_type) in BROKEN_FILES.items()
    } | {"twin_b.py": "DuplicateName"}
    assert all(error["message"] for error in reloaded["errors"])
    assert reloaded["loaded_count"] == 3
    assert reloaded["error_count"] == len(BROKEN_FILES) + 1
    assert reloaded["total_files"] == len(BROKEN_FILES) + 4  # no _helper.py, no resources/
    assert reloaded["duration_ms"] >= 0
    assert voice_of(await session.request(select("voices/twin-a.wav"))) == "Twin"
    refused = await session.request(select("voices/twin-b.wav"))
    assert error_code(refused) == "character_not_found"


# ── files written for the Unmute fork ────────────────────────────────────────


def unmute_fork_source(name: str, language: str | None) -> str:
    """A character file as written for the original Unmute fork."""
    return textwrap.dedent(f"""
        CHARACTER_NAME = {name!r}
        VOICE_SOURCE = {{
            "source_type": "file",
            "path_on_server": "unmute-prod-website/{name.lower()}.wav",
            "description": "From the Unmute fork.",
        }}
        INSTRUCTIONS = {{"instruction_prompt": None, "language": {language!r}}}
        METADATA = {{"good": True, "comment": None}}


        class PromptGenerator:
            def __init__(self, instructions):
                self.instructions = instructions

            def make_system_prompt(self) -> str:
                from unmute.llm.system_prompt import (
                    _SYSTEM_PROMPT_TEMPLATE,
                    _SYSTEM_PROMPT_BASICS,
                    _DEFAULT_ADDITIONAL_INSTRUCTIONS,
                    LANGUAGE_CODE_TO_INSTRUCTIONS,
                    get_readable_llm_name,
                )

                return _SYSTEM_PROMPT_TEMPLATE.format(
                    _SYSTEM_PROMPT_BASICS=_SYSTEM_PROMPT_BASICS,
                    additional_instructions=self.instructions["instruction_prompt"]
                    or _DEFAULT_ADDITIONAL_INSTRUCTIONS,
                    language_instructions=LANGUAGE_CODE_TO_INSTRUCTIONS[
                        self.instructions["language"]
                    ],
                    llm_name=get_readable_llm_name(),
                )
        """)


async def test_an_unmute_fork_directory_loads_unchanged(
    connect: Connect, allowed_root: Path
) -> None:
    # one character per language of the shim's map; a hyphenated file name too
    characters = {
        "any_language.py": ("Polyglot", None),
        "english.py": ("Ellen", "en"),
        "french.py": ("Fanny", "fr"),
        "english_french.py": ("Eddie", "en/fr"),
        "french_english.py": ("Francis", "fr/en"),
        "quiz-show.py": ("Quizmaster", "en"),
    }
    directory = write_directory(allowed_root, "unmute-fork", {
        file: unmute_fork_source(name, language) for file, (name, language) in characters.items()
    })
    names = {name for name, _ in characters.values()}
    session = await connect()

    reloaded = await session.reload(directory)

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert reloaded["errors"] == []
    assert {c["name"] for c in reloaded["characters"]} == names
    for name in sorted(names):
        assert voice_of(await session.request(select(name))) == name


def test_every_error_code_is_in_the_readme_and_the_readme_lists_no_other():
    section = (ROOT / "README.md").read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", section)) - {"error", "details"}
    assert listed == ERROR_CODES
