"""A load's result: one shape (``LoadReport``, the session's ``Loaded``), seen by clients
as the ``session.characters.reloaded`` event and as the HTTP reload's answer; and how
each sandbox failure becomes the client's error code (``from_sandbox``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from conftest import SCALE, Connect, MakeServer, character_source, write_directory

from sandbox import (
    CallFailed,
    CharacterInfo,
    DirectoryNotFound,
    DirectoryNotReadable,
    FileError,
    LoadFailed,
    LoadReport,
    Pool,
    Sandbox,
    SandboxConfig,
    SandboxCrashed,
    SandboxError,
    SandboxTimeout,
    SandboxUnavailable,
    TooManyCharacters,
    wire,
)
from server.conversation.characters import Loaded
from server.errors import ServerSideError, from_sandbox
from server.realtime import protocol

# The event's fields in the order DESIGN.md §2 "Character events" shows them.
RELOADED_FIELDS = ["directory", "loaded_count", "error_count", "total_files", "characters",
                   "errors", "duration_ms"]


def a_load() -> Loaded:
    return Loaded(
        directory="/characters",
        total_files=4,
        characters=[
            CharacterInfo("Anne", "anne.py", {"source_type": "file", "path_on_server": "a.wav"},
                          good=True, comment="calm", tool_names=["weather"]),
            CharacterInfo("Bruno", "bruno.py", {}, good=None),
        ],
        errors=[FileError("broken.py", "SyntaxError", "invalid syntax (line 3)"),
                FileError("slow.py", "Timeout", "did not finish loading within 5 s")],
        duration_ms=41.27,
    )


# ── the shape and its two conversions ────────────────────────────────────────


def test_the_event_and_the_http_answer_carry_the_same_fields() -> None:
    load = a_load()

    event = json.loads(protocol.encode(load.event()))
    answer = load.fields()

    assert event.pop("type") == "session.characters.reloaded"
    assert event.pop("event_id").startswith("event_")
    assert list(event) == RELOADED_FIELDS
    assert list(answer) == RELOADED_FIELDS
    assert answer == event
    assert json.loads(json.dumps(answer)) == answer  # JSON-ready as it is


def test_clients_see_a_summary_of_each_character_and_each_error_as_reported() -> None:
    answer = a_load().fields()

    assert answer["loaded_count"] == 2
    assert answer["error_count"] == 2
    assert answer["total_files"] == 4
    assert answer["characters"] == [{"name": "Anne", "good": True, "comment": "calm"},
                                    {"name": "Bruno", "good": None, "comment": None}]
    assert answer["errors"] == [
        {"file": "broken.py", "error_type": "SyntaxError",
         "message": "invalid syntax (line 3)"},
        {"file": "slow.py", "error_type": "Timeout",
         "message": "did not finish loading within 5 s"},
    ]
    assert answer["duration_ms"] == 41.27


def test_a_report_lists_the_files_that_killed_children_with_the_others_by_name() -> None:
    loaded = wire.Loaded(id=1, directory="/child/sees/this", total_files=3, characters=[],
                         errors=[FileError("c.py", "NameError", "name 'x' is not defined")])
    killers = [FileError("d.py", "Crashed", "killed the sandbox interpreter"),
               FileError("a.py", "Timeout", "did not finish loading")]

    report = LoadReport.of("/host/says/this", loaded, killers, seconds=0.012345)

    assert report.directory == "/host/says/this"
    assert [error.file for error in report.errors] == ["a.py", "c.py", "d.py"]
    assert report.duration_ms == 12.35


async def test_a_session_and_the_http_reload_answer_the_same_load_alike(
    make_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "set", {
        "anne.py": character_source("Anne"),
        "bruno.py": character_source("Bruno"),
        "broken.py": "this is not python\n",
    })
    client = await make_server(characters_dir=directory, admin_token="t")
    session = await connect(on=client)

    event = await session.reload("default")
    response = await client.post("/v1/characters/reload", headers={"Authorization": "Bearer t"})
    answer = await response.json()

    assert response.status == 200
    assert event.pop("type") == "session.characters.reloaded"
    del event["event_id"]
    assert answer.pop("deprecated") is True
    assert list(event) == list(answer) == RELOADED_FIELDS
    assert event.pop("duration_ms") > 0 and answer.pop("duration_ms") > 0
    assert answer == event
    assert answer["loaded_count"] == 2
    assert [error["file"] for error in answer["errors"]] == ["broken.py"]


async def test_a_directory_without_one_valid_character_lists_each_error(
    make_server: MakeServer, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "set", {"anne.py": character_source("Anne")})
    client = await make_server(characters_dir=directory, admin_token="t")
    write_directory(tmp_path, "set", {"anne.py": "raise RuntimeError('no')\n"})

    response = await client.post("/v1/characters/reload", headers={"Authorization": "Bearer t"})
    error = (await response.json())["error"]

    assert response.status == 422
    assert error["code"] == "no_valid_characters"
    assert error["details"] == {
        "total_files": 1,
        "errors": [{"file": "anne.py", "error_type": "RuntimeError", "message": "no"}],
    }


# ── sandbox failures as client errors ────────────────────────────────────────


@pytest.mark.parametrize(("error_type", "kind"), [
    ("FileNotFoundError", DirectoryNotFound),
    ("PermissionError", DirectoryNotReadable),
    ("TooManyCharacters", TooManyCharacters),
    ("PackageError", LoadFailed),
])
def test_a_failed_load_is_raised_as_its_own_class(
    error_type: str, kind: type[LoadFailed]
) -> None:
    failure = LoadFailed.of("it failed", error_type)

    assert type(failure) is kind
    assert failure.error_type == error_type


@pytest.mark.parametrize(("failure", "code", "server_side"), [
    (DirectoryNotFound("no such directory"), "directory_not_found", False),
    (DirectoryNotReadable("permission denied"), "directory_not_readable", False),
    (TooManyCharacters("101 files"), "too_many_characters", False),
    (LoadFailed("__init__.py raised", "PackageError"), "character_reload_failed", False),
    (CallFailed("boom", "ValueError", "Traceback ..."), "character_error", False),
    (SandboxTimeout("took 5 s"), "sandbox_timeout", True),
    (SandboxCrashed("killed by SIGKILL"), "sandbox_crashed", True),
    (SandboxUnavailable("no child starts"), "sandbox_crashed", True),
])
def test_each_sandbox_failure_has_its_code(
    failure: SandboxError, code: str, server_side: bool
) -> None:
    error = from_sandbox(failure, "loading /x")

    assert error.code == code
    assert isinstance(error, ServerSideError) == server_side
    assert error.message.startswith("loading /x: ")


def test_what_a_client_is_told_beyond_the_code() -> None:
    crashed_in = from_sandbox(CallFailed("boom", "ValueError", "Traceback ..."), "calling")
    package = from_sandbox(LoadFailed("__init__.py raised", "PackageError"), "loading /x")
    missing = from_sandbox(DirectoryNotFound("gone"), "loading /x")

    assert "ValueError" in crashed_in.message
    assert crashed_in.details == {"traceback": "Traceback ..."}
    assert package.details == {"error_type": "PackageError"}
    assert missing.param == "directory"


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = Pool(SandboxConfig(file_timeout=2.0 * SCALE, call_timeout=2.0 * SCALE,
                              pool_size=1))
    await pool.start()
    yield pool
    await pool.close()


async def test_a_child_refusing_too_many_files_raises_too_many_characters(
    pool: Pool, tmp_path: Path
) -> None:
    directory = write_directory(tmp_path, "set", {
        "anne.py": character_source("Anne"), "bruno.py": character_source("Bruno"),
    })
    sandbox = Sandbox(pool, "test")
    try:
        with pytest.raises(TooManyCharacters) as refused:
            await sandbox.start(str(directory), max_characters=1)
    finally:
        await sandbox.close()

    assert from_sandbox(refused.value, "loading").code == "too_many_characters"


async def test_a_directory_gone_before_the_child_loads_it_raises_directory_not_found(
    pool: Pool, tmp_path: Path
) -> None:
    sandbox = Sandbox(pool, "test")
    try:
        with pytest.raises(DirectoryNotFound) as refused:
            await sandbox.start(str(tmp_path / "gone"))
    finally:
        await sandbox.close()

    assert from_sandbox(refused.value, "loading").code == "directory_not_found"


async def test_a_real_load_reports_in_the_one_shape(pool: Pool, tmp_path: Path) -> None:
    directory = write_directory(tmp_path, "set", {
        "anne.py": character_source("Anne"), "broken.py": "import nowhere_at_all\n",
    })
    sandbox = Sandbox(pool, "test")
    try:
        report = await sandbox.start(str(directory))
    finally:
        await sandbox.close()

    builtins = msgspec.to_builtins(report)
    assert list(builtins) == ["directory", "total_files", "characters", "errors", "duration_ms"]
    assert builtins["directory"] == str(directory)
    assert builtins["total_files"] == 2
    assert [c["name"] for c in builtins["characters"]] == ["Anne"]
    assert [(e["file"], e["error_type"]) for e in builtins["errors"]] == [
        ("broken.py", "ImportError")]
    assert builtins["duration_ms"] > 0
