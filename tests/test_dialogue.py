"""The dialogue's decisions, without a socket, a sandbox or a model: each entry point's
steps are driven here with plain values standing for what the session's I/O would
answer (a load's result, a system prompt, whether a reply started)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox import CharacterInfo
from server.conversation import commands as do
from server.conversation import events
from server.conversation.characters import Loaded
from server.conversation.dialogue import GOODBYE, SILENCE_MARKER, Dialogue
from server.conversation.history import Conversation
from server.conversation.listening import Utterance
from server.conversation.settings import SessionSettings
from server.conversation.turns import Action
from server.errors import TroupeError
from server.realtime.limits import ReloadLimit

ADA = CharacterInfo("Ada", "ada.py", {"source_type": "file", "path_on_server": "v/ada.wav"})
BEA = CharacterInfo("Bea", "bea.py", {"source_type": "piper", "voice": "joe"})
HIDDEN = CharacterInfo("Hid", "hid.py", {}, good=False)


def loaded(*characters: CharacterInfo, directory: str = "/chars") -> Loaded:
    return Loaded(directory=directory, total_files=len(characters),
                  characters=list(characters), errors=[], duration_ms=1.0)


class Run:
    """Drives steps as the session would: each command gets the answer the test
    scripted for its kind (a system prompt is ``"<name>'s prompt"``)."""

    def __init__(self, *, load: Loaded | None = None, started: bool = True,
                 cancelled: bool = True, utterance: Utterance | None = None) -> None:
        self.load, self.started, self.cancelled = load, started, cancelled
        self.utterance = utterance
        self.commands: list[do.Command] = []

    def __call__(self, steps: do.Steps) -> list[do.Command]:
        self.commands = []
        result: Any = None
        while True:
            try:
                command = steps.send(result)
            except StopIteration:
                return self.commands
            self.commands.append(command)
            result = self._answer(command)

    def _answer(self, command: do.Command) -> Any:
        match command:
            case do.Load():
                return self.load
            case do.Prompt(character=name):
                return f"{name}'s prompt"
            case do.StartReply():
                return self.started
            case do.CancelReply():
                return self.cancelled
            case do.StopReply():
                return "the stopped reply" if self.cancelled else None
            case do.Commit():
                return self.utterance
            case do.ListCharacters():
                return events.CharactersListed(directory="/chars", character_count=0,
                                               characters=[])
        return None


def sent(commands: list[do.Command]) -> list[str]:
    """The types of the events sent, in order."""
    return [events_tag(c.event) for c in commands if isinstance(c, do.Send)]


def events_tag(event: events.Outgoing) -> str:
    tag = type(event).__struct_config__.tag
    return tag if isinstance(tag, str) else type(event).__name__


def kinds(commands: list[do.Command]) -> list[str]:
    return [type(c).__name__ if not isinstance(c, do.Send) else events_tag(c.event)
            for c in commands]


def replies(commands: list[do.Command]) -> list[do.Reply]:
    return [c.reply for c in commands if isinstance(c, do.StartReply)]


def dialogue(*characters: CharacterInfo, greets: bool = False) -> Dialogue:
    """A dialogue whose default set (``characters``) is loaded."""
    talk = Dialogue(SessionSettings("sess_1", None), greets=greets)
    Run(load=loaded(*characters))(talk.load("default", answer=False))
    return talk


def say(text: str) -> events.ItemCreate:
    return events.ItemCreate(item=events.Item(content=[
        events.ContentPart(type="input_text", text=text)]))


# ── loading and selecting ────────────────────────────────────────────────────


def test_a_session_starts_with_its_settings_and_loads_quietly() -> None:
    talk = Dialogue(SessionSettings("sess_1", None))
    [created] = Run()(talk.start())
    assert isinstance(created, do.Send) and isinstance(created.event, events.SessionCreated)
    assert created.event.session is talk.settings  # the edge renders them for the dialect

    commands = Run(load=loaded(ADA))(talk.load("default", answer=False))

    assert commands == [do.Load("default"), do.CancelReply()]
    assert talk.characters == [ADA]


def test_a_reload_ends_the_conversation_then_answers() -> None:
    talk = dialogue(ADA)
    run = Run(load=loaded(BEA, directory="/other"))
    run(talk.receive(say("hello")))
    run(talk.receive(events.ResponseCreate()))
    assert talk.history.messages and talk.settings.voice == "Ada"

    commands = run(talk.receive(events.CharactersReload(directory="/other")))

    assert kinds(commands) == ["Load", "CancelReply", "session.characters.reloaded"]
    assert talk.history.messages == []
    assert talk.settings.voice is None and talk.system_prompt is None
    assert not talk.replying  # a new response.create is no longer refused
    [reply] = replies(run(talk.receive(events.ResponseCreate())))
    assert reply.character == "Bea"


def test_select_a_character_by_name_or_voice_path() -> None:
    talk = dialogue(ADA, BEA)
    run = Run()

    commands = run(talk.receive(events.SessionUpdate(session=events.SessionFields(
        voice="piper/joe/Bea"))))

    assert commands[:3] == [do.CancelReply(), do.Prompt("Bea"), do.Warm("Bea's prompt")]
    assert sent(commands) == ["session.updated"]
    assert talk.settings.voice == "Bea"
    # Selecting the same one again changes nothing.
    again = run(talk.receive(events.SessionUpdate(session=events.SessionFields(voice="Bea"))))
    assert kinds(again) == ["session.updated"]


def test_an_unknown_character_is_refused_and_nothing_changes() -> None:
    talk = dialogue(ADA)
    with pytest.raises(TroupeError) as refused:
        Run()(talk.receive(events.SessionUpdate(session=events.SessionFields(
            voice="Nobody", temperature=0.1))))
    assert refused.value.code == "character_not_found"
    assert refused.value.param == "session.voice"
    assert talk.settings.temperature == 0.8


def test_without_characters_nothing_answers() -> None:
    talk = Dialogue(SessionSettings("sess_1", None))
    for event in (events.ResponseCreate(), events.CharactersList()):
        with pytest.raises(TroupeError) as refused:
            Run()(talk.receive(event))
        assert refused.value.code == "no_valid_characters"


def test_turning_detection_off_closes_the_stream() -> None:
    talk = dialogue(ADA)
    commands = Run()(talk.receive(events.SessionUpdate(session=events.SessionFields(
        turn_detection=None))))
    assert kinds(commands) == ["StopListening", "session.updated"]


# ── replies ──────────────────────────────────────────────────────────────────


def test_a_reply_is_of_the_first_good_character_with_its_prompt_and_history() -> None:
    talk = dialogue(HIDDEN, BEA, ADA)
    run = Run()
    run(talk.receive(say("hi")))

    commands = run(talk.receive(events.ResponseCreate()))

    assert kinds(commands) == ["Prompt", "StartReply"]
    [reply] = replies(commands)
    assert (reply.character, reply.system_prompt, reply.turn) == ("Bea", "Bea's prompt", False)
    assert reply.voice_source == BEA.voice_source and reply.spoken
    assert reply.history.messages == [{"role": "user", "content": "hi"}]
    # The prompt is built once per character.
    talk.reply_ended(reply.number)
    assert kinds(run(talk.receive(events.ResponseCreate()))) == ["StartReply"]


def test_one_reply_at_a_time_and_a_cancel_needs_one() -> None:
    talk = dialogue(ADA)
    run = Run()
    [reply] = replies(run(talk.receive(events.ResponseCreate())))
    with pytest.raises(TroupeError, match="already in progress"):
        run(talk.receive(events.ResponseCreate()))

    assert run(talk.receive(events.ResponseCancel())) == [do.CancelReply()]
    talk.reply_ended(reply.number)  # its task ends after the cancel: changes nothing
    assert replies(run(talk.receive(events.ResponseCreate())))

    with pytest.raises(TroupeError, match="no response is in progress"):
        Run(cancelled=False)(talk.receive(events.ResponseCancel()))


def test_a_reply_that_ends_with_goodbye_parts() -> None:
    talk = dialogue(ADA)
    assert Run()(talk.finished(f"It was a pleasure. {GOODBYE}  ")) == [do.Part()]
    assert Run()(talk.finished("Goodbye is a word.")) == []
    assert Run()(talk.finished(None)) == []


def test_a_user_message_must_carry_text() -> None:
    talk = dialogue(ADA)
    with pytest.raises(TroupeError) as refused:
        Run()(talk.receive(events.ItemCreate(item=events.Item(role="assistant"))))
    assert (refused.value.code, refused.value.param) == ("invalid_event", "item")
    assert talk.history.messages == []


# ── turn-taking ──────────────────────────────────────────────────────────────


def test_an_end_of_turn_with_words_cancels_commits_and_replies() -> None:
    talk = dialogue(ADA)
    run = Run()
    [old] = replies(run(talk.receive(events.ResponseCreate())))

    commands = run(talk.end_of_turn(Utterance("item_1", "how are you", 1.5), at=2.25))

    assert kinds(commands) == [
        "input_audio_buffer.speech_stopped", "CancelReply", "input_audio_buffer.committed",
        "conversation.item.created", "conversation.item.input_audio_transcription.completed",
        "StartReply",
    ]
    stopped = commands[0]
    assert isinstance(stopped, do.Send) and isinstance(stopped.event, events.SpeechStopped)
    assert (stopped.event.item_id, stopped.event.audio_end_ms) == ("item_1", 2250)
    [reply] = replies(commands)
    assert reply.turn and reply.number != old.number
    assert talk.history.messages[-1] == {"role": "user", "content": "how are you"}


def test_a_noise_without_words_is_not_answered() -> None:
    talk = dialogue(ADA)
    commands = Run()(talk.end_of_turn(Utterance("item_1", "", 0.4), at=1.0))
    assert kinds(commands) == ["input_audio_buffer.speech_stopped", "Listen"]
    assert talk.history.messages == []


def test_a_reply_the_turn_no_longer_wants_is_not_in_progress() -> None:
    talk = dialogue(ADA)
    run = Run(started=False)  # the person went on speaking while the prompt was built
    run(talk.end_of_turn(Utterance("item_1", "wait", 0.5), at=1.0))
    assert not talk.replying


def test_a_barge_in_stops_the_reply_before_anything_else_is_said() -> None:
    talk = dialogue(ADA)
    run = Run()
    run(talk.receive(events.ResponseCreate()))

    commands = run(talk.heard(Action.INTERRUPT, 3.0, "item_2"))

    assert kinds(commands) == ["StopReply", "input_audio_buffer.speech_started",
                               "unmute.interrupted_by_vad", "AwaitReply"]
    assert commands[-1] == do.AwaitReply("the stopped reply")
    assert not talk.replying
    # The start of speech alone is only told.
    assert kinds(run(talk.heard(Action.SPEECH_STARTED, 0.5, "item_3"))) == [
        "input_audio_buffer.speech_started"]


def test_a_long_silence_nudges_the_character_unless_it_speaks() -> None:
    talk = dialogue(ADA)
    run = Run()

    [reply] = replies(run(talk.nudge()))

    assert reply.turn
    assert talk.history.messages == [{"role": "user", "content": SILENCE_MARKER}]
    assert run(talk.nudge()) == []  # the nudge's reply is still speaking
    assert talk.history.messages == [{"role": "user", "content": SILENCE_MARKER}]


# ── greeting ─────────────────────────────────────────────────────────────────


def test_a_greeting_dialect_speaks_first_after_the_first_update_only() -> None:
    talk = dialogue(ADA, BEA, greets=True)
    run = Run()
    update = events.SessionUpdate(session=events.SessionFields(voice="Bea"))

    first = run(talk.receive(update))

    assert kinds(first) == ["CancelReply", "Prompt", "Warm", "session.updated", "StartReply"]
    [greeting] = replies(first)
    assert (greeting.character, greeting.turn, greeting.history.messages) == ("Bea", False, [])
    talk.reply_ended(greeting.number)
    assert kinds(run(talk.receive(update))) == ["session.updated"]


def test_other_dialects_wait_to_be_asked() -> None:
    talk = dialogue(ADA)
    commands = Run()(talk.receive(events.SessionUpdate()))
    assert kinds(commands) == ["session.updated"]


# ── audio ────────────────────────────────────────────────────────────────────


def test_audio_goes_to_the_hearing_and_a_commit_is_a_user_turn() -> None:
    talk = dialogue(ADA)
    run = Run(utterance=Utterance("item_9", "push to talk", 2.0))

    assert run(talk.receive(events.AudioAppend(audio="AAAA"))) == [do.Hear("AAAA")]
    committed = run(talk.receive(events.AudioCommit()))
    cleared = run(talk.receive(events.AudioClear()))

    assert kinds(committed) == ["Commit", "input_audio_buffer.committed",
                                "conversation.item.created",
                                "conversation.item.input_audio_transcription.completed"]
    assert talk.history.messages == [{"role": "user", "content": "push to talk"}]
    assert kinds(cleared) == ["ClearAudio", "input_audio_buffer.cleared"]


# ── the history ──────────────────────────────────────────────────────────────


def test_the_history_puts_the_prompt_first_and_keeps_a_replys_rounds_in_order() -> None:
    history = Conversation()
    history.add_user_text("What time is it?")
    messages = history.messages_for("You are Ada.")
    messages.append({"role": "assistant", "tool_calls": [{"id": "c1"}]})
    messages.append({"role": "tool", "tool_call_id": "c1", "content": "noon"})
    history.add_user_text("And the date?")  # said while the reply ran
    history.record(messages[2:])

    assert [m["role"] for m in history.messages] == ["user", "user", "assistant", "tool"]
    assert history.messages_for("p")[0] == {"role": "system", "content": "p"}
    assert history.messages_for("p") is not history.messages_for("p")


def test_the_history_drops_the_oldest_and_never_starts_with_a_tool_result() -> None:
    history = Conversation(max_messages=4)
    history.add_user_text("one")
    history.record([{"role": "assistant", "tool_calls": [{"id": "c1"}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "x"},
                    {"role": "assistant", "content": "done"}])
    history.add_user_text("two")

    # "one" goes, and with it what answered it: a tool result without its call (or
    # an answer without its question) would be refused by the model's API.
    assert history.messages == [{"role": "user", "content": "two"}]
    history.clear()
    assert history.messages == []


# ── the session's reload rate (realtime/limits.py, as pure as the dialogue) ──


def test_reloads_are_limited_per_minute_on_the_clock_given() -> None:
    limit = ReloadLimit(per_minute=2)
    assert limit.take(0.0) is None and limit.take(10.0) is None
    assert limit.take(30.0) == pytest.approx(30.0)  # refused: counts nothing
    assert limit.take(59.9) == pytest.approx(0.1)
    assert limit.take(60.0) is None  # the first has left the window
    assert limit.take(61.0) == pytest.approx(9.0)
