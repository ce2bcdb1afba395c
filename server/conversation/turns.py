"""Turn-taking without I/O: when the person's turn ends, when they interrupt, and
when a long silence calls for the character to speak.

Driven by what the speech-to-text hears, on its audio clock (seconds of audio since
the stream began): words, and a pause estimate for every step (Kyutai's pause head,
or 1 − Silero's speech probability). No wall clock: the same audio gives the same
decisions, and the tests feed it numbers.

    LISTENING ──word, or speech held SPEECH_HOLD*──▶ HEARING  (SPEECH_STARTED)
    HEARING ──pause > END_OF_TURN held pause_hold──▶ REPLYING (END_TURN)
    REPLYING ──word, or speech held INTERRUPT_HOLD*──▶ HEARING (INTERRUPT: barge-in)
    REPLYING ──reply_ended()──▶ LISTENING ──reply_started()──▶ REPLYING
    LISTENING ──silence for nudge_after──▶ REPLYING (NUDGE: the character speaks)

    * only with ``speech_starts_turn`` (a voice activity detector); Kyutai's STT
      starts a turn with its first word, as in Unmute.

With ``drafts`` and a ``pause_hold``, HEARING also reports the pauses that may end the
turn, for preemptive generation (a reply drafted before the turn is certain):

    HEARING ──the STT's words are all out (EndWord) during a pause──▶ PAUSED
    HEARING ──after PAUSED, speech (< SPEECH) or a word said after the pause──▶ GOES_ON

(The embedded STT finishes an utterance 0.3 s into a pause, 0.15 s before the hold
ends the turn: the first moment its whole transcript is known.)
"""

from __future__ import annotations

import enum

END_OF_TURN = 0.6
"""Pause estimate above which the person has finished (Unmute's threshold)."""
SPEECH = 0.4
"""Pause estimate below which the person is speaking (Unmute's barge-in level)."""
SPEECH_HOLD = 0.1
"""Seconds of speech before a voice activity detector's turn starts."""
INTERRUPT_HOLD = 0.25
"""Seconds of speech over the character before it stops: a cough is not a barge-in."""
NUDGE_AFTER = 7.0
"""Seconds of silence after the character spoke before it speaks again (Unmute's)."""
MAX_NUDGES = 2
"""Nudges in a row without the person speaking; then the character waits quietly."""


class State(enum.Enum):
    LISTENING = "listening"
    HEARING = "hearing"
    REPLYING = "replying"


class Action(enum.Enum):
    SPEECH_STARTED = "speech_started"
    END_TURN = "end_turn"
    INTERRUPT = "interrupt"
    NUDGE = "nudge"
    PAUSED = "paused"
    """The person paused, their words so far all recognised: they may have finished."""
    GOES_ON = "goes_on"
    """The pause reported as ``PAUSED`` broke: the person is still speaking."""


class TurnTaking:
    def __init__(self, *, end_of_turn: float = END_OF_TURN, pause_hold: float = 0.0,
                 speech_starts_turn: bool = False, nudge_after: float | None = NUDGE_AFTER,
                 drafts: bool = False) -> None:
        self.state = State.LISTENING
        self.end_of_turn = end_of_turn
        self.pause_hold = pause_hold
        self.speech_starts_turn = speech_starts_turn
        self.nudge_after = nudge_after
        self.drafts = drafts and pause_hold > 0
        """Report ``PAUSED`` and ``GOES_ON`` (with no hold, a pause ends the turn at once)."""
        self.now = 0.0
        self._paused_since: float | None = None
        self._speaking_since: float | None = None
        self._quiet_since: float | None = None
        self._nudges = 0
        self._drafting = False
        """``PAUSED`` was reported; neither the turn ended nor the person went on since."""

    def word(self, time: float) -> Action | None:
        """The person said a word at ``time``."""
        self._tick(time)
        if self._paused_since is not None and time >= self._paused_since:
            self._paused_since = None  # (a word said before the pause leaves it running)
        if self.state is not State.HEARING:
            return self._start_hearing()
        return self._went_on() if self._paused_since is None else None

    def words_ended(self, time: float) -> Action | None:
        """The STT has put out every word so far; the last ended at ``time``."""
        self._tick(time)
        if self.state is State.HEARING and self._paused_since is not None:
            return self._drafted()
        return None

    def pause(self, probability: float, time: float) -> Action | None:
        """The estimate that the person has stopped speaking, for the audio at ``time``."""
        self._tick(time)
        self._paused_since = (self._paused_since if self._paused_since is not None
                              else time) if probability > self.end_of_turn else None
        self._speaking_since = (self._speaking_since if self._speaking_since is not None
                                else time) if probability < SPEECH else None
        match self.state:
            case State.HEARING if self._held(self._paused_since, self.pause_hold):
                self.state = State.REPLYING
                self._drafting = False
                return Action.END_TURN
            case State.HEARING if self._speaking_since is not None:
                return self._went_on()
            case State.LISTENING | State.REPLYING if self.speech_starts_turn and self._held(
                    self._speaking_since,
                    SPEECH_HOLD if self.state is State.LISTENING else INTERRUPT_HOLD):
                return self._start_hearing()
            case State.LISTENING if self._speaking_since is not None:
                self._quiet_since = None  # speech without words yet: not a silence
            case State.LISTENING if self.nudge_after is not None:
                if self._quiet_since is None:
                    self._quiet_since = time
                elif (time - self._quiet_since >= self.nudge_after - 1e-6
                      and self._nudges < MAX_NUDGES):
                    self.state = State.REPLYING
                    self._nudges += 1
                    return Action.NUDGE
        return None

    def reply_started(self) -> None:
        """The character started speaking on its own account (a text turn, a
        greeting): speech from now on is a barge-in."""
        if self.state is State.LISTENING:
            self.state = State.REPLYING

    def reply_ended(self) -> None:
        """The character finished (or was cancelled without a barge-in): the silence
        that may call for a nudge starts now."""
        if self.state is State.REPLYING:
            self.state = State.LISTENING
            self._quiet_since = self.now

    def _start_hearing(self) -> Action:
        interrupted = self.state is State.REPLYING
        self.state = State.HEARING
        self._paused_since = None
        self._nudges = 0
        self._drafting = False
        return Action.INTERRUPT if interrupted else Action.SPEECH_STARTED

    def _drafted(self) -> Action | None:
        if not self.drafts:
            return None
        self._drafting = True
        return Action.PAUSED

    def _went_on(self) -> Action | None:
        if not self._drafting:
            return None
        self._drafting = False
        return Action.GOES_ON

    def _held(self, since: float | None, hold: float) -> bool:
        return since is not None and self.now - since >= hold - 1e-6  # float steps

    def _tick(self, time: float) -> None:
        self.now = max(self.now, time)
