"""The session's characters and a reload's result, as ``list``, ``reload`` and
``chat`` print them."""

from __future__ import annotations

import sys
from typing import Any

from scripts.client.errors import Event


def print_characters(characters: list[Event]) -> None:
    if not characters:
        print("(no characters)")
        return
    names = [str(c.get("name")) for c in characters]
    width = max(len("NAME"), *(len(name) for name in names))
    print(f"{'NAME':<{width}}  GOOD  COMMENT")
    for name, character in zip(names, characters, strict=True):
        good = good_label(character.get("good"))
        comment = character.get("comment") or ""
        print(f"{name:<{width}}  {good:<4}  {comment}".rstrip())


def good_label(good: object) -> str:
    return "yes" if good is True else "no" if good is False else "-"


def print_listed(listed: Event) -> None:
    print(f"{listed.get('character_count')} characters in {listed.get('directory')}")
    print_characters(listed.get("characters") or [])


def reload_summary(reloaded: Event) -> str:
    errors = reloaded.get("error_count")
    return (f"loaded {reloaded.get('loaded_count')} of {reloaded.get('total_files')} files "
            f"from {reloaded.get('directory')}, {errors} error{'' if errors == 1 else 's'}, "
            f"in {float(reloaded.get('duration_ms') or 0):.0f} ms")


def print_reloaded(reloaded: Event) -> None:
    print(reload_summary(reloaded))
    print_characters(reloaded.get("characters") or [])
    print_load_errors(reloaded, sys.stdout)


def print_load_errors(reloaded: Event, stream: Any) -> None:
    for error in reloaded.get("errors") or []:
        print(f"error in {error.get('file')}: {error.get('error_type')}: "
              f"{error.get('message')}", file=stream)
