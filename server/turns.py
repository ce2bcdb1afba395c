"""Turn-taking without I/O: when the person's turn ends, and when they interrupt.

Fed with what the speech-to-text hears (words, pause probabilities on its audio
clock) and with the character's replies starting and ending; answers with what the
session should do. As in Unmute: the turn ends when the pause probability passes
``END_OF_TURN`` after at least one word; a word heard while the character speaks is
a barge-in.

    LISTENING ──word──▶ HEARING ──pause > 0.6──▶ END_TURN ─(reply starts)─▶ REPLYING
        ▲                  ▲                                                 │
        └──reply ends──────┴──────────────word (barge-in: INTERRUPT)─────────┘
"""

from __future__ import annotations

import enum

END_OF_TURN = 0.6
"""Pause probability above which the person has finished (Unmute's threshold)."""


class State(enum.Enum):
    LISTENING = "listening"
    HEARING = "hearing"
    REPLYING = "replying"


class Action(enum.Enum):
    SPEECH_STARTED = "speech_started"
    END_TURN = "end_turn"
    INTERRUPT = "interrupt"


class TurnTaking:
    def __init__(self, end_of_turn: float = END_OF_TURN) -> None:
        self.state = State.LISTENING
        self.end_of_turn = end_of_turn

    def word(self) -> Action | None:
        """The person said a word."""
        if self.state is State.HEARING:
            return None
        interrupted = self.state is State.REPLYING
        self.state = State.HEARING
        return Action.INTERRUPT if interrupted else Action.SPEECH_STARTED

    def pause(self, probability: float) -> Action | None:
        """The STT's estimate that the person has stopped speaking."""
        if self.state is State.HEARING and probability > self.end_of_turn:
            self.state = State.REPLYING
            return Action.END_TURN
        return None

    def reply_ended(self) -> None:
        """The character finished (or was cancelled without a barge-in)."""
        if self.state is State.REPLYING:
            self.state = State.LISTENING
