"""Each session sees only its own characters, also under concurrent reloads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import Connect, character_source, error_code, write_directory


def two_charles(root: Path) -> tuple[Path, Path]:
    """Two directories whose charles.py share a file name but not their content."""
    first = write_directory(root, "first", {
        "charles.py": character_source("Charles the First", prompt="I am the first Charles."),
        "anne.py": character_source("Anne"),
    })
    second = write_directory(root, "second", {
        "charles.py": character_source("Charles the Second", prompt="I am the second Charles."),
        "bruno.py": character_source("Bruno"),
    })
    return first, second


async def test_sessions_see_only_their_own_directory(
    connect: Connect, allowed_root: Path
) -> None:
    first, second = two_charles(allowed_root)
    alice, bob = await connect(), await connect()

    reloaded_alice = await alice.reload(first)
    reloaded_bob = await bob.reload(second)

    assert reloaded_alice["type"] == "session.characters.reloaded"
    assert {c["name"] for c in reloaded_alice["characters"]} == {"Anne", "Charles the First"}
    assert {c["name"] for c in reloaded_bob["characters"]} == {"Bruno", "Charles the Second"}
    assert set(await alice.names()) == {"Anne", "Charles the First"}
    assert set(await bob.names()) == {"Bruno", "Charles the Second"}


async def test_concurrent_reloads_never_mix_sets(connect: Connect, allowed_root: Path) -> None:
    first, second = two_charles(allowed_root)
    sessions = [await connect() for _ in range(6)]
    wanted = [first if i % 2 == 0 else second for i in range(len(sessions))]
    expected = {first: {"Anne", "Charles the First"}, second: {"Bruno", "Charles the Second"}}

    for _ in range(3):
        pairs = zip(sessions, wanted, strict=True)
        replies = await asyncio.gather(*(session.reload(d) for session, d in pairs))
        for reply, directory in zip(replies, wanted, strict=True):
            assert reply["directory"] == str(directory)
            assert {c["name"] for c in reply["characters"]} == expected[directory]
        wanted.reverse()

    listed = await asyncio.gather(*(s.names() for s in sessions))
    for names, directory in zip(listed, reversed(wanted), strict=True):
        assert set(names) == expected[directory]


async def test_prompt_comes_from_the_sessions_own_file(
    connect: Connect, allowed_root: Path
) -> None:
    first, second = two_charles(allowed_root)
    alice, bob = await connect(), await connect()
    await asyncio.gather(alice.reload(first), bob.reload(second))

    updated = await alice.request({"type": "session.update",
                                   "session": {"voice": "Charles the First"}})

    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["output"]["voice"] == "Charles the First"


async def test_a_session_cannot_select_another_sessions_character(
    connect: Connect, allowed_root: Path
) -> None:
    first, second = two_charles(allowed_root)
    alice, bob = await connect(), await connect()
    await asyncio.gather(alice.reload(first), bob.reload(second))

    refused = await alice.request({"type": "session.update",
                                   "session": {"voice": "Charles the Second"}})
    by_path = await alice.request({"type": "session.update",
                                   "session": {"voice": "voices/Bruno.wav"}})

    assert error_code(refused) == "character_not_found"
    assert error_code(by_path) == "character_not_found"
    chosen = await bob.request({"type": "session.update", "session": {"voice": "voices/Bruno.wav"}})
    assert chosen["session"]["audio"]["output"]["voice"] == "Bruno"


async def test_in_order_answers_and_last_successful_reload_wins(
    connect: Connect, allowed_root: Path
) -> None:
    first, second = two_charles(allowed_root)
    session = await connect()
    events = [
        {"type": "session.characters.reload", "directory": str(first), "event_id": "a"},
        {"type": "session.characters.reload", "directory": "/nonexistent", "event_id": "b"},
        {"type": "session.characters.list", "event_id": "c"},
        {"type": "session.characters.reload", "directory": str(second), "event_id": "d"},
        {"type": "session.characters.reload", "directory": str(allowed_root / "nope"),
         "event_id": "e"},
    ]
    for event in events:
        await session.send(event)
    replies = [await session.receive() for _ in events]

    assert [r["type"] for r in replies] == [
        "session.characters.reloaded", "error", "session.characters.listed",
        "session.characters.reloaded", "error",
    ]
    assert replies[1]["error"]["event_id"] == "b"
    assert {c["name"] for c in replies[2]["characters"]} == {"Anne", "Charles the First"}
    assert set(await session.names()) == {"Bruno", "Charles the Second"}
