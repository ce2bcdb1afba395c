"""``replies.Words``: a model's text pieces cut into the whole words that Unmute's
clients show one per ``response.text.delta`` (pure, no sockets)."""

from __future__ import annotations

import random

import pytest

from server.realtime.dialects import Words


def words_of(pieces: list[str]) -> list[str]:
    words = Words()
    found = [word for piece in pieces for word in words.feed(piece)]
    return found + words.flush()


@pytest.mark.parametrize("text", [
    "Don't worry, I'll help you.",
    " Leading and trailing spaces ",
    "Lines\nand\ttabs  and   runs of spaces.",
    "One",
    "",
    "   ",
])
@pytest.mark.parametrize("seed", range(5))
def test_any_cut_of_the_text_gives_its_words(text: str, seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if text else []
    pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    assert "".join(pieces) == text
    assert words_of(pieces) == text.split()


def test_one_character_at_a_time() -> None:
    assert words_of(list("I'm here.")) == ["I'm", "here."]


def test_a_word_waits_for_the_space_after_it() -> None:
    words = Words()

    assert words.feed(" d") == []
    assert words.feed("on't") == []
    assert words.feed(" wor") == ["don't"]
    assert words.feed("ry") == []
    assert words.flush() == ["worry"]
    assert words.flush() == []
