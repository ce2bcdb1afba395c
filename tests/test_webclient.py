"""The web client of ``GET /`` (DESIGN.md §6): ``server/static/index.html`` and
``client.js``, checked without a browser or node.

    index.html ──<script src>──▶ static/client.js (resolved as the page at "/" would)
    client.js  ──case "…"──▶ server events it handles  ⊆ what the GA dialect can send
               ──send("…")──▶ client events it sends   ⊆ protocol.CLIENT_EVENT_TYPES
               ──$("…")────▶ elements it looks up     ⊆ ids in index.html

The server-side sets come from ``server.realtime.protocol`` and
``server.realtime.dialects``, so a renamed event breaks these tests instead of the page.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import msgspec
import pytest

from server.realtime import dialects, protocol

STATIC = Path(__file__).resolve().parent.parent / "server" / "static"
PAGE = STATIC / "index.html"
SCRIPT = STATIC / "client.js"
ORIGIN = "http://troupe.test"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.references: list[tuple[str, str]] = []  # (tag, src or href)
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.references.append((tag, value))
            if name == "id" and value is not None:
                self.ids.add(value)


def _page() -> _Page:
    page = _Page()
    page.feed(PAGE.read_text(encoding="utf-8"))
    page.close()
    return page


def _script() -> str:
    return SCRIPT.read_text(encoding="utf-8")


# ── what the server can send to a GA client ──────────────────────────────────


def _sample_value(info: msgspec.inspect.Type) -> Any:
    match info:
        case msgspec.inspect.StrType():
            return "x"
        case msgspec.inspect.IntType():
            return 0
        case msgspec.inspect.FloatType():
            return 0.0
        case msgspec.inspect.BoolType():
            return False
        case msgspec.inspect.ListType():
            return []
        case msgspec.inspect.DictType():
            return {}
        case msgspec.inspect.UnionType(types=types):
            return _sample_value(types[0])
        case msgspec.inspect.StructType(cls=cls):
            return _sample(cls)
        case _:
            return None


def _sample(cls: type[msgspec.Struct]) -> Any:
    """An instance of ``cls`` with placeholder values in its required fields."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return cls(**{f.name: _sample_value(f.type) for f in info.fields if f.required})


def _subclasses(cls: type) -> list[type]:
    direct = cls.__subclasses__()
    return direct + [deeper for sub in direct for deeper in _subclasses(sub)]


def ga_server_events() -> set[str]:
    """Every event type a GA client can be sent: each server event as ``to_ga`` names
    it, as far as the dialect lets it through."""
    names = set()
    for cls in _subclasses(protocol.ServerEvent):
        tag = type(protocol.to_ga(_sample(cls))).__struct_config__.tag
        if isinstance(tag, str) and dialects.accepts(dialects.Dialect.GA, tag):
            names.add(tag)
    return names


# ── a syntax check that needs no JavaScript engine ───────────────────────────

_CLOSERS = {")": "(", "]": "[", "}": "{"}


def js_structure_problems(source: str) -> list[str]:
    """Unclosed or mismatched brackets, strings, template literals and comments.

    Not a full parser: it takes every ``/`` that does not start a comment as division,
    which holds because client.js uses no regular-expression literals."""
    stack: list[tuple[str, int]] = []  # (opener or "${", offset)
    problems: list[str] = []

    def line(offset: int) -> int:
        return source.count("\n", 0, offset) + 1

    def template(start: int, opened: int) -> int:
        """Scan a template literal from ``start``; return the offset after its end or
        after a ``${`` (then pushed)."""
        i = start
        while i < len(source):
            if source[i] == "\\":
                i += 2
            elif source[i] == "`":
                return i + 1
            elif source.startswith("${", i):
                stack.append(("${", i))
                return i + 2
            else:
                i += 1
        problems.append(f"line {line(opened)}: unterminated template literal")
        return len(source)

    i = 0
    while i < len(source):
        char = source[i]
        if source.startswith("//", i):
            end = source.find("\n", i)
            i = len(source) if end < 0 else end
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            if end < 0:
                problems.append(f"line {line(i)}: unterminated comment")
                break
            i = end + 2
        elif char in "'\"":
            j = i + 1
            while j < len(source) and source[j] not in (char, "\n"):
                j += 2 if source[j] == "\\" else 1
            if j >= len(source) or source[j] != char:
                problems.append(f"line {line(i)}: unterminated string")
            i = j + 1
        elif char == "`":
            i = template(i + 1, i)
        elif char in "([{":
            stack.append((char, i))
            i += 1
        elif char in ")]}":
            if char == "}" and stack and stack[-1][0] == "${":
                _, opened = stack.pop()
                i = template(i + 1, opened)
                continue
            if not stack or stack[-1][0] != _CLOSERS[char]:
                problems.append(f"line {line(i)}: unexpected {char!r}")
            else:
                stack.pop()
            i += 1
        else:
            i += 1
    problems += [f"line {line(offset)}: {opener!r} never closed" for opener, offset in stack]
    return problems


@pytest.mark.parametrize("source", [
    "f(a, [b, {c: 1}]);",
    "const s = `a ${ {b: `${1}`}.b } c` + 'it\\'s' + \"}\"; // ) in a comment",
    "/* ( [ */ x = a / b / c;",
])
def test_the_structure_check_accepts_valid_javascript(source: str) -> None:
    assert js_structure_problems(source) == []


@pytest.mark.parametrize("source", [
    "f(a;", "f(a]);", "x = 'abc;", "x = `a ${b`;", "/* open", "}",
])
def test_the_structure_check_finds_broken_javascript(source: str) -> None:
    assert js_structure_problems(source) != []


# ── the page ─────────────────────────────────────────────────────────────────


def test_client_js_is_well_formed() -> None:
    assert js_structure_problems(_script()) == []


def test_the_page_loads_client_js_through_the_static_route() -> None:
    scripts = [urljoin(ORIGIN + "/", src) for tag, src in _page().references if tag == "script"]

    assert scripts == [ORIGIN + "/static/client.js"]


def test_the_page_needs_nothing_from_another_origin() -> None:
    for _, reference in _page().references:
        url = urlsplit(urljoin(ORIGIN + "/", reference))
        assert url.netloc == urlsplit(ORIGIN).netloc, reference
        assert url.path.startswith("/static/"), reference
        assert (STATIC / url.path.removeprefix("/static/")).is_file(), reference
    assert not re.search(r"\bhttps?://", _script())


def test_every_element_the_script_uses_is_on_the_page() -> None:
    used = set(re.findall(r'\$\("([^"]+)"\)', _script()))

    assert used
    assert used <= _page().ids


def test_every_server_event_handled_is_one_the_ga_dialect_sends() -> None:
    handled = set(re.findall(r'case "([^"]+)":', _script()))
    sent = ga_server_events()

    assert {"response.output_audio.delta", "response.output_text.delta", "error",
            "input_audio_buffer.speech_started", "unmute.interrupted_by_vad",
            "session.characters.listed", "session.characters.reloaded"} <= sent
    assert handled, "no `case \"event.type\":` found in client.js"
    assert handled <= sent, f"not sent to GA clients: {sorted(handled - sent)}"


def test_every_client_event_sent_is_one_the_server_accepts() -> None:
    sent = set(re.findall(r'send\("([^"]+)"', _script()))

    assert {"session.characters.list", "session.characters.reload", "session.update",
            "conversation.item.create", "response.create",
            "input_audio_buffer.append"} <= sent
    assert sent <= set(protocol.CLIENT_EVENT_TYPES)


def test_the_script_connects_in_the_ga_dialect() -> None:
    script = _script()

    assert "/v1/realtime?model=troupe" in script
    assert ('new WebSocket(serverUrl(), ["realtime", `openai-insecure-api-key.${secret.value}`])'
            in script)
    assert dialects.detect({"model": "troupe"}, {}) is dialects.Dialect.GA


def test_the_script_trades_a_key_for_a_client_secret_and_keeps_neither_key_nor_secret() -> None:
    """The long-lived key goes in one request (README "The front door"); nothing is
    written where it would outlive the page."""
    script = _script()

    assert 'fetch("/v1/realtime/client_secrets"' in script
    assert "headers.Authorization = `Bearer ${key}`" in script
    assert '$("api-key").value = "";' in script
    for storage in ("localStorage", "sessionStorage", "document.cookie", "indexedDB",
                    "history.", "location.hash ="):
        assert storage not in script, storage
    assert 'type="password"' in PAGE.read_text(encoding="utf-8")
