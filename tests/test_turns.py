"""Turn-taking as a plain state machine on the audio clock, no sockets."""

from __future__ import annotations

from server.conversation.turns import MAX_NUDGES, Action, State, TurnTaking


def feed(turns: TurnTaking, probability: float, start: float, end: float,
         step: float = 0.08) -> list[tuple[float, Action]]:
    """The same pause estimate every ``step`` seconds from ``start`` to ``end``."""
    actions = []
    steps = round((end - start) / step)
    for i in range(steps):
        time = round(start + i * step, 6)
        if action := turns.pause(probability, time):
            actions.append((round(time, 2), action))
    return actions


def test_a_pause_after_words_ends_the_turn() -> None:
    turns = TurnTaking()

    assert turns.pause(0.9, 0.08) is None  # silence before anyone spoke ends nothing
    assert turns.word(0.16) is Action.SPEECH_STARTED
    assert turns.word(0.24) is None
    assert turns.pause(0.5, 0.32) is None
    assert turns.pause(0.7, 0.40) is Action.END_TURN
    assert turns.state is State.REPLYING


def test_a_word_during_the_reply_interrupts_it() -> None:
    turns = TurnTaking()
    turns.word(0.1)
    turns.pause(0.9, 0.2)

    assert turns.word(0.3) is Action.INTERRUPT
    assert turns.state is State.HEARING
    assert turns.pause(0.95, 0.4) is Action.END_TURN


def test_after_the_reply_the_next_word_starts_a_new_turn() -> None:
    turns = TurnTaking()
    turns.word(0.1)
    turns.pause(0.9, 0.2)
    turns.reply_ended()

    assert turns.state is State.LISTENING
    assert turns.word(0.3) is Action.SPEECH_STARTED


def test_with_a_hold_a_short_gap_between_words_does_not_end_the_turn() -> None:
    turns = TurnTaking(pause_hold=0.6)
    turns.word(0.0)

    assert feed(turns, 0.95, 0.08, 0.48) == []  # 0.4 s between two words
    assert turns.word(0.5) is None
    assert feed(turns, 0.95, 0.56, 2.0) == [(1.2, Action.END_TURN)]


def test_a_voice_activity_detector_starts_the_turn_before_any_word() -> None:
    turns = TurnTaking(pause_hold=0.6, speech_starts_turn=True)

    assert feed(turns, 0.9, 0.0, 1.0) == []
    assert feed(turns, 0.1, 1.0, 1.5) == [(1.16, Action.SPEECH_STARTED)]
    assert turns.state is State.HEARING


def test_speech_over_the_reply_interrupts_it_once_it_lasts() -> None:
    turns = TurnTaking(pause_hold=0.6, speech_starts_turn=True)
    feed(turns, 0.1, 0.0, 0.5)
    feed(turns, 0.9, 0.5, 1.5)
    assert turns.state is State.REPLYING

    assert feed(turns, 0.1, 1.5, 1.66) == []  # a cough: 160 ms
    assert feed(turns, 0.9, 1.66, 2.0) == []
    assert feed(turns, 0.1, 2.0, 2.5) == [(2.32, Action.INTERRUPT)]


def test_without_a_detector_speech_alone_never_interrupts() -> None:
    turns = TurnTaking()
    turns.word(0.1)
    turns.pause(0.9, 0.2)

    assert feed(turns, 0.1, 0.3, 3.0) == []
    assert turns.state is State.REPLYING


def test_a_long_silence_after_the_reply_nudges_the_character() -> None:
    turns = TurnTaking(nudge_after=7.0)
    turns.word(0.1)
    turns.pause(0.9, 0.2)
    feed(turns, 0.9, 0.2, 3.0)  # the character speaks meanwhile
    turns.reply_ended()

    assert feed(turns, 0.9, 3.0, 12.0) == [(9.96, Action.NUDGE)]
    assert turns.state is State.REPLYING


def test_nudges_stop_when_nobody_answers_and_resume_after_speech() -> None:
    turns = TurnTaking(nudge_after=1.0)
    nudges = 0
    for second in range(10):
        nudges += len(feed(turns, 0.9, second, second + 1))
        turns.reply_ended()

    assert nudges == MAX_NUDGES
    assert turns.word(10.0) is Action.SPEECH_STARTED
    turns.pause(0.9, 10.1)
    turns.reply_ended()
    assert feed(turns, 0.9, 10.2, 12.0) == [(11.16, Action.NUDGE)]


def test_speech_without_words_is_not_silence() -> None:
    turns = TurnTaking(nudge_after=1.0)

    assert feed(turns, 0.1, 0.0, 3.0) == []  # Kyutai hears someone, no word yet


def test_a_reply_started_elsewhere_can_be_interrupted() -> None:
    turns = TurnTaking(speech_starts_turn=True)
    turns.reply_started()  # e.g. a text turn, or the greeting

    assert feed(turns, 0.1, 0.0, 0.5) == [(0.32, Action.INTERRUPT)]


def test_with_drafts_a_pause_whose_words_are_all_out_is_reported_before_the_turn_ends() -> None:
    # The embedded STT's last words come out 0.3 s into the pause, dated when said.
    turns = TurnTaking(pause_hold=0.48, drafts=True)
    turns.word(0.0)

    assert feed(turns, 0.95, 0.08, 0.40) == []  # a pause alone drafts nothing
    assert turns.word(0.04) is None  # a word said before the pause: it goes on
    assert turns.words_ended(0.06) is Action.PAUSED
    assert feed(turns, 0.95, 0.40, 1.0) == [(0.56, Action.END_TURN)]


def test_words_that_end_while_the_person_speaks_draft_nothing() -> None:
    turns = TurnTaking(pause_hold=0.48, drafts=True)
    turns.word(0.0)
    assert turns.pause(0.1, 0.08) is None

    assert turns.words_ended(0.08) is None


def test_speech_after_the_pause_means_the_person_goes_on() -> None:
    turns = TurnTaking(pause_hold=0.48, drafts=True)
    turns.word(0.0)
    turns.pause(0.95, 0.08)
    assert turns.words_ended(0.04) is Action.PAUSED

    assert turns.pause(0.5, 0.16) is None  # neither pause nor speech: maybe still pausing
    assert turns.pause(0.2, 0.24) is Action.GOES_ON
    assert turns.pause(0.1, 0.32) is None  # said once
    turns.pause(0.95, 0.40)
    assert turns.words_ended(0.30) is Action.PAUSED
    assert turns.word(0.48) is Action.GOES_ON  # a word said after the pause began
    assert turns.state is State.HEARING


def test_without_a_hold_or_drafts_no_pause_is_reported() -> None:
    for turns in (TurnTaking(drafts=True), TurnTaking(pause_hold=0.48)):
        turns.word(0.0)
        turns.pause(0.95, 0.08)
        assert turns.words_ended(0.04) is None
