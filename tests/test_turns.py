"""Turn-taking as a plain state machine, no sockets."""

from __future__ import annotations

from server.turns import Action, State, TurnTaking


def test_a_pause_after_words_ends_the_turn() -> None:
    turns = TurnTaking()

    assert turns.pause(0.9) is None  # silence before anyone spoke ends nothing
    assert turns.word() is Action.SPEECH_STARTED
    assert turns.word() is None
    assert turns.pause(0.5) is None
    assert turns.pause(0.7) is Action.END_TURN
    assert turns.state is State.REPLYING


def test_a_word_during_the_reply_interrupts_it() -> None:
    turns = TurnTaking()
    turns.word()
    turns.pause(0.9)

    assert turns.word() is Action.INTERRUPT
    assert turns.state is State.HEARING
    assert turns.pause(0.95) is Action.END_TURN


def test_after_the_reply_the_next_word_starts_a_new_turn() -> None:
    turns = TurnTaking()
    turns.word()
    turns.pause(0.9)
    turns.reply_ended()

    assert turns.state is State.LISTENING
    assert turns.word() is Action.SPEECH_STARTED
