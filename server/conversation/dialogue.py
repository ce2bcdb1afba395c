"""The dialogue without I/O: what the session decides, apart from how it is done.

    client event ─────receive()────▶ ┐
    session start ────start()──────▶ │
    a load asked ─────load()───────▶ │            ┌▶ Send(event)    Load(dir) ─▶ Loaded
    end of turn ──────end_of_turn()▶ ├ Dialogue ──┤  Prompt(name) ─▶ its system prompt
    barge-in, speech ─heard()──────▶ │  (steps)   │  StartReply ─▶ started?  CancelReply
    long silence ─────nudge()──────▶ │            │  StopReply, AwaitReply, Warm, Part,
    a pause, words ───paused()─────▶ │            │  DraftReply, DropDraft,
    speech goes on ───went_on()────▶ │            │  Hear, Commit, ClearAudio, StopListening,
    a reply's text ───finished()───▶ ┘            └▶ Listen, ListCharacters (commands.py)

Each entry point returns its *steps*: a generator of commands, in order, that the
session executes one after the other, sending each command's result back in
(``generator.send``): a ``Prompt`` answers with the character's system prompt, a
``Load`` with what was loaded. The decisions and the state changes between them happen
in the order they always did; none waits for anything, so each is a pure function of
what came in, and ``tests/test_dialogue.py`` drives them with plain values. A
``TroupeError`` raised by a step (or by a command) ends the steps: the client is told.

The dialogue's state — the settings, the history, the set's characters, the selected
character and its prompt, whether it greeted — belongs to no connection. The
decisions, as in Unmute:

- a turn that ends with words: the reply in progress stops, the words are committed to
  the history, the character answers (a noise without words: nothing to answer);
- the person speaks over the reply (barge-in): it stops at once, before their words
  are sent on;
- a long silence after the character spoke: it goes on (``SILENCE_MARKER``);
- a pause that may end the turn: the reply to the words so far is drafted (its
  completion starts); the turn's reply uses it if the turn ends with those words;
- a dialect that ``greets`` (Unmute's): the character speaks first, after the first
  ``session.update``;
- a reply that ends with ``GOODBYE``: the session closes once the audio has played;
- a new set of characters, or another character: the reply stops, the history goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbox import CharacterInfo

from ..errors import TroupeError
from . import events, voices
from .commands import (
    AwaitReply,
    CancelReply,
    ClearAudio,
    Commit,
    DraftReply,
    DropDraft,
    Hear,
    ListCharacters,
    Listen,
    Load,
    Part,
    Prompt,
    Reply,
    Send,
    StartReply,
    Steps,
    StopListening,
    StopReply,
    Warm,
)
from .history import Conversation, Message
from .settings import SessionSettings
from .turns import Action

if TYPE_CHECKING:
    from .characters import Loaded
    from .listening import Utterance

SILENCE_MARKER = "..."
"""The person's turn when they stayed silent (Unmute's marker): the character goes on."""
GOODBYE = "Bye!"
"""A reply ending with this closes the session once it has been spoken."""


class Dialogue:
    def __init__(self, settings: SessionSettings, *, greets: bool = False) -> None:
        self.settings = settings
        self.greets = greets
        """The character speaks first, after the first ``session.update`` (Unmute)."""
        self.greeted = False
        self.history = Conversation()
        self.characters: list[CharacterInfo] = []
        """The session's set, as last loaded."""
        self.system_prompt: str | None = None
        """The selected character's (``settings.voice``), once built."""
        self.resume_token: str | None = None
        """Shown in ``session.created`` / ``session.updated`` (README "Resume")."""
        self.resumed_from: str | None = None
        self._replies = 0
        self._replying: int | None = None
        """The number of the reply in progress."""

    @property
    def replying(self) -> bool:
        return self._replying is not None

    def start(self) -> Steps:
        """A new session: the client first hears its settings."""
        yield Send(events.SessionCreated(session=self.settings, **self._resume_fields(),
                                         **_given(resumed_from=self.resumed_from)))

    def restore(self, settings: SessionSettings, history: list[Message], *, greeted: bool,
                resumed_from: str) -> None:
        """Carry on a conversation whose connection ended (README "Resume"): its
        settings (the selected character among them) and history; its set comes with
        ``load(..., restoring=True)``, or is already ``characters``."""
        self.settings = settings
        self.history.messages[:] = history
        self.greeted = greeted
        self.resumed_from = resumed_from
        self.system_prompt = None  # built again by the character's sandbox when needed

    def _resume_fields(self) -> dict[str, str]:
        return _given(resume_token=self.resume_token)

    def receive(self, event: events.ClientEventUnion) -> Steps:
        """One client event, in the order they came."""
        match event:
            case events.CharactersReload(directory=directory):
                yield from self.load(directory, answer=True)
            case events.CharactersList():
                yield from self._list()
            case events.SessionUpdate(session=fields):
                yield from self._update(fields)
            case events.ItemCreate(item=item):
                yield from self._add_item(item)
            case events.ResponseCreate():
                yield from self._reply(turn=False)
            case events.ResponseCancel():
                self._replying = None
                if not (yield CancelReply()):
                    raise TroupeError("invalid_event", "no response is in progress to cancel")
            case events.AudioAppend(audio=audio):
                yield Hear(audio)
            case events.AudioCommit():
                utterance: Utterance = yield Commit()
                yield from self._committed(utterance)
            case events.AudioClear():
                yield ClearAudio()
                yield Send(events.AudioCleared())

    def load(self, directory: str, *, answer: bool, restoring: bool = False) -> Steps:
        """Load a new set (``"default"``: the server's); a reload ends the
        conversation, then is answered (``answer``). ``restoring``: the set of a
        resumed conversation, which goes on (with its character, if the set has it)."""
        loaded: Loaded = yield Load(directory)
        self.characters = loaded.characters
        if not restoring:
            yield from self._end_conversation()
        elif self.settings.voice is not None and voices.find(
                self.characters, self.settings.voice) is None:
            self.settings.voice = None
        if answer:
            yield Send(loaded.event())

    def heard(self, action: Action, at: float, item_id: str) -> Steps:
        """The start of the person's speech (``SPEECH_STARTED``), or their speech over
        the reply (``INTERRUPT``): acted on at once, before their words are sent on
        (they belong to the person's turn, not to the reply)."""
        started = events.SpeechStarted(item_id=item_id, audio_start_ms=int(at * 1000))
        if action is Action.INTERRUPT:
            self._replying = None
            stopping = yield StopReply()  # at once: no more text, audio or model
            yield Send(started)
            yield Send(events.InterruptedByVad())
            if stopping is not None:
                yield AwaitReply(stopping)  # its response.done goes out first
        else:
            yield Send(started)

    def end_of_turn(self, utterance: Utterance, at: float) -> Steps:
        """The person finished: words are answered, a noise is not."""
        yield Send(events.SpeechStopped(item_id=utterance.item_id, audio_end_ms=int(at * 1000)))
        if not utterance.transcript:
            yield Listen()
            return
        self._replying = None
        yield CancelReply()  # the person's new turn comes first
        yield from self._committed(utterance)
        yield from self._reply(turn=True)

    def paused(self, transcript: str) -> Steps:
        """The person paused, perhaps at the end of their turn (or more words came
        during the pause): draft the reply to ``transcript``, as ``end_of_turn`` would
        start it. Nothing is sent; the client sees only the reply it becomes."""
        character = self._speaker()
        if not transcript or self._replying is not None or character is None:
            return
        yield from self._prompt_of(character)
        yield DraftReply(self._reply_of(character, 0, self.history.with_user_text(transcript),
                                        turn=True))

    def went_on(self) -> Steps:
        """The person went on speaking after the pause: the draft is of no use."""
        yield DropDraft()

    def nudge(self) -> Steps:
        """A long silence after the character spoke: it goes on."""
        if self._replying is not None:
            return
        self.history.add_user_text(SILENCE_MARKER)
        yield from self._reply(turn=True)

    def finished(self, text: str | None) -> Steps:
        """A reply ended with ``text`` (None: it failed or was cancelled)."""
        if text is not None and text.rstrip().endswith(GOODBYE):
            yield Part()

    def reply_ended(self, number: int) -> None:
        if self._replying == number:
            self._replying = None

    # ── the decisions ────────────────────────────────────────────────────────

    def _list(self) -> Steps:
        if not self.characters:
            raise TroupeError(
                "no_valid_characters",
                "this session has no characters loaded; send session.characters.reload",
            )
        yield Send((yield ListCharacters()))

    def _update(self, fields: events.SessionFields) -> Steps:
        voice = self.settings.requested_voice(fields)
        character = None
        if voice is not None:
            character = voices.find(self.characters, voice)
            if character is None:
                names = ", ".join(c.name for c in self.characters) or "none loaded"
                raise TroupeError(
                    "character_not_found",
                    f"no character {voice!r} in this session's set ({names}); "
                    "pick one from session.characters.list",
                    param="session.voice",
                )
        detecting = self.settings.turn_detection is not None
        self.settings.apply(fields)
        if (self.settings.turn_detection is not None) != detecting:
            yield StopListening()  # the next audio opens a stream in the new mode
        if character is not None and character.name != self.settings.voice:
            yield from self._end_conversation()
            self.system_prompt = yield Prompt(character.name)
            self.settings.voice = character.name
            yield Warm(self.system_prompt)
        yield Send(events.SessionUpdated(session=self.settings, **self._resume_fields()))
        if self.greets and not self.greeted:
            self.greeted = True  # the character speaks first, once it knows who it is
            yield from self._reply(turn=False)

    def _add_item(self, item: events.Item) -> Steps:
        try:
            text = user_text(item)
        except ValueError as exc:
            raise TroupeError("invalid_event", str(exc), param="item") from None
        self.history.add_user_text(text)
        yield Send(events.ItemCreated(previous_item_id=None, item=events.MessageItem(
            id=item.id or events.new_id("item"), role="user",
            content=[{"type": "input_text", "text": text}],
        )))

    def _committed(self, utterance: Utterance) -> Steps:
        item_id, transcript = utterance.item_id, utterance.transcript
        yield Send(events.AudioCommitted(item_id=item_id))
        yield Send(events.ItemCreated(previous_item_id=None, item=events.MessageItem(
            id=item_id, role="user",
            content=[{"type": "input_audio", "transcript": transcript}],
        )))
        yield Send(events.TranscriptionCompleted(
            item_id=item_id, transcript=transcript,
            usage={"type": "duration", "seconds": utterance.seconds}))
        if transcript:
            self.history.add_user_text(transcript)

    def _reply(self, *, turn: bool) -> Steps:
        """Start a reply of the selected character (else the first good one)."""
        if self._replying is not None:
            raise TroupeError(
                "invalid_event",
                "a response is already in progress; wait for response.done or send "
                "response.cancel",
            )
        character = self._speaker()
        if character is None:
            raise TroupeError(
                "no_valid_characters",
                "this session has no character to answer; send session.characters.reload",
            )
        yield from self._prompt_of(character)
        self._replies += 1
        reply = self._reply_of(character, self._replies, self.history, turn=turn)
        self._replying = reply.number
        if not (yield StartReply(reply)):
            self._replying = None

    def _prompt_of(self, character: str) -> Steps:
        """``character`` selected, its system prompt built."""
        if self.system_prompt is None or self.settings.voice != character:
            self.system_prompt = yield Prompt(character)
            self.settings.voice = character

    def _reply_of(self, character: str, number: int, history: Conversation, *,
                  turn: bool) -> Reply:
        assert self.system_prompt is not None  # _prompt_of came first
        info = voices.find(self.characters, character)
        return Reply(
            number=number, character=character, system_prompt=self.system_prompt,
            history=history, temperature=self.settings.temperature,
            spoken="audio" in self.settings.modalities,
            voice_source=info.voice_source if info is not None else {}, turn=turn,
        )

    def _speaker(self) -> str | None:
        """The selected character, else the first good one of the set."""
        if not self.characters:
            return None
        if self.settings.voice is not None:
            return self.settings.voice
        good = [c for c in self.characters if c.good is not False] or self.characters
        return good[0].name

    def _end_conversation(self) -> Steps:
        """A new set or another character: the reply stops, the history goes."""
        self._replying = None
        yield CancelReply()
        self.history.clear()
        self.system_prompt = None
        self.settings.voice = None


def _given(**fields: str | None) -> dict[str, str]:
    return {name: value for name, value in fields.items() if value is not None}


def user_text(item: events.Item) -> str:
    """The text of a user message item; raises ``ValueError`` for anything else."""
    if item.type != "message" or item.role != "user":
        raise ValueError(f"only user messages can be added, not {item.type}/{item.role}")
    parts = [part.text or part.transcript or "" for part in item.content
             if part.type in ("input_text", "text", "input_audio")]
    text = " ".join(part for part in parts if part)
    if not text:
        raise ValueError("the message has no text (content parts of type input_text)")
    return text
