"""Metric labels that untrusted input cannot choose (DESIGN.md §7, STYLE.md's security
habits): a character file picks the class name of what it raises, and with it the
``error_type`` a reload reports; the ``character_load_errors`` label must not follow."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from conftest import Connect, character_source, write_directory
from prometheus_client.parser import text_string_to_metric_families

from server import metrics

ERROR_SERIES = "character_load_errors"
ALLOWED_LABELS = metrics.SANDBOX_ERROR_TYPES | metrics.BUILTIN_ERROR_TYPES | {"other"}

# Each raises, at import, an exception whose type name the attacker chose.
RANDOM_CLASS = """
raise type({name!r}, (Exception,), {{}})("a class name nobody chose but me")
"""
BASE_EXCEPTION_CLASS = """
raise type({name!r}, (BaseException,), {{}})()
"""
# The loader's own CharacterError carries an error_type it reports as given.
CHOSEN_ERROR_TYPE = """
import sys

for module in list(sys.modules.values()):
    chosen = getattr(module, "CharacterError", None)
    if isinstance(chosen, type) and issubclass(chosen, Exception):
        raise chosen({name!r}, "an error_type picked by the file")
raise type({name!r}, (Exception,), {{}})()
"""
TEMPLATES = (RANDOM_CLASS, BASE_EXCEPTION_CLASS, CHOSEN_ERROR_TYPE)


def hostile_name() -> str:
    """5000 characters of the attacker's choosing, some that the exposition format
    would have to escape."""
    return 'Evil"},x="1\n# ' + secrets.token_hex(2500)


def hostile_files(count: int) -> tuple[dict[str, str], list[str]]:
    names = [hostile_name() for _ in range(count)]
    files = {
        f"hostile_{index:02}.py": TEMPLATES[index % len(TEMPLATES)].format(name=name)
        for index, name in enumerate(names)
    }
    return files, names


async def error_series(client: TestClient) -> tuple[str, dict[str, float]]:
    """The /metrics text, and the character_load_errors counter by label value."""
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    series = {
        sample.labels["error_type"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == ERROR_SERIES
        for sample in family.samples
        if sample.name == f"{ERROR_SERIES}_total"
    }
    return text, series


@pytest.mark.parametrize(("error_type", "label"), [
    pytest.param("MissingPromptGenerator", "MissingPromptGenerator", id="sandbox-verdict"),
    pytest.param("Timeout", "Timeout", id="sandbox-timeout"),
    pytest.param("ZeroDivisionError", "ZeroDivisionError", id="builtin"),
    pytest.param("KeyboardInterrupt", "KeyboardInterrupt", id="builtin-base-exception"),
    pytest.param("MyOwnError", "other", id="a-class-of-the-file"),
    pytest.param("", "other", id="empty"),
    pytest.param("x" * 5000, "other", id="long"),
    pytest.param('ValueError"}', "other", id="near-miss"),
])
def test_error_type_label_keeps_only_names_the_server_knows(error_type: str, label: str) -> None:
    assert metrics.error_type_label(error_type) == label


async def test_class_names_chosen_by_character_code_never_become_label_values(
    server: TestClient, connect: Connect, allowed_root: Path
) -> None:
    files, names = hostile_files(9)
    directory = write_directory(allowed_root, "hostile", {
        **files, "anne.py": character_source("Anne"),
    })
    session = await connect()
    _, before = await error_series(server)

    reloaded = await session.reload(directory)

    assert reloaded["type"] == "session.characters.reloaded", reloaded
    assert [c["name"] for c in reloaded["characters"]] == ["Anne"]
    # The attack reaches the server: the client is told the chosen names...
    assert {error["error_type"] for error in reloaded["errors"]} == set(names)
    # ...but no label value carries them: they all count as "other".
    text, after = await error_series(server)
    for name in names:
        assert name[-40:] not in text
    assert set(after) <= ALLOWED_LABELS, set(after) - ALLOWED_LABELS
    assert after["other"] - before.get("other", 0) == len(files)

    # A reload that loads nothing counts its errors too, into the same series.
    files, names = hostile_files(9)
    directory = write_directory(allowed_root, "all-hostile", files)

    refused = await session.reload(directory)

    assert refused["type"] == "error", refused
    assert refused["error"]["code"] == "no_valid_characters"
    text, again = await error_series(server)
    for name in names:
        assert name[-40:] not in text
    assert set(again) == set(after)
    assert again["other"] - after["other"] == len(files)
