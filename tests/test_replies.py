"""Replies through the real server: a user message and response.create give a
streamed reply from the language model, with tools run in the session's sandbox,
spoken through the TTS when one is configured."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from conftest import (
    Connect,
    ConnectTo,
    MakeServer,
    Realtime,
    character_source,
    error_code,
    write_directory,
)

from tests.fakes.kyutai_stt import FakeKyutaiSTT
from tests.fakes.kyutai_tts import FakeKyutaiTTS
from tests.fakes.openai_chat import (
    FakeOpenAI,
    call,
    failure,
    stall,
    text,
    tool_calls,
)


def say(words: str) -> dict[str, Any]:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": words}]}}


async def turn(session: Realtime, words: str) -> list[dict[str, Any]]:
    """Send a user message and response.create; the events up to response.done."""
    await session.send(say(words))
    await session.send({"type": "response.create"})
    events = [await session.receive()]
    while events[-1]["type"] != "response.done":
        events.append(await session.receive())
    return events


def reply_text(events: list[dict[str, Any]]) -> str:
    """The reply's text: written, or the transcript of a spoken reply."""
    return "".join(e["delta"] for e in events if e["type"] in (
        "response.output_text.delta", "response.output_audio_transcript.delta"))


def counter_character() -> str:
    """A character whose tool reports a number only its sandbox knows."""
    return character_source("Counter", prompt="You count things.") + """
TOOLS = [{"type": "function", "function": {
    "name": "count", "description": "Count.",
    "parameters": {"type": "object", "properties": {"step": {"type": "integer"}}}}}]

def _handle(self, name, arguments):
    self.total = getattr(self, "total", 40) + arguments["step"]
    return f"the total is now {self.total}"

PromptGenerator.handle_tool_call = _handle
"""


async def test_builtin_responder_says_what_it_is(connect: Connect) -> None:
    session = await connect()

    events = await turn(session, "hello there")

    assert [e["type"] for e in events][:3] == [
        "conversation.item.added", "response.created", "response.output_text.delta"]
    assert events[-2]["type"] == "response.output_text.done"
    assert events[-1]["response"]["status"] == "completed"
    said = reply_text(events)
    assert said == events[-2]["text"]
    assert "hello there" in said and "not a language model" in said


async def test_reply_streams_from_the_model_with_the_characters_prompt(
    fake_openai: FakeOpenAI, make_server: MakeServer, connect_to: ConnectTo, allowed_root: Path
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(text("Ahoy", ", friend", "!"), text("Still", " here."))
    session = await connect_to(server)
    await session.reload(write_directory(allowed_root, "d", {
        "a.py": character_source("Ada", prompt="You are Ada, a sailor.")}))

    first = await turn(session, "Who are you?")
    second = await turn(session, "And now?")

    assert [e["delta"] for e in first if e["type"] == "response.output_text.delta"] == [
        "Ahoy", ", friend", "!"]
    assert reply_text(second) == "Still here."
    sent = fake_openai.requests[-1]["messages"]
    assert sent == [
        {"role": "system", "content": "You are Ada, a sailor."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "Ahoy, friend!"},
        {"role": "user", "content": "And now?"},
    ]


async def test_tool_calls_run_in_the_sandbox_and_feed_the_model(
    fake_openai: FakeOpenAI, make_server: MakeServer, connect_to: ConnectTo, allowed_root: Path
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(tool_calls(call("count", '{"st', 'ep": 2}', id="c1")),
                       text("Forty-two."))
    session = await connect_to(server)
    await session.reload(write_directory(allowed_root, "d", {"c.py": counter_character()}))

    events = await turn(session, "Count by two.")

    assert reply_text(events) == "Forty-two."
    assert fake_openai.requests[0]["tools"][0]["function"]["name"] == "count"
    follow_up = fake_openai.requests[1]["messages"]
    assert follow_up[-1] == {"role": "tool", "tool_call_id": "c1",
                             "content": "the total is now 42"}


async def test_backend_failure_is_reported_and_the_session_survives(
    fake_openai: FakeOpenAI, make_server: MakeServer, connect_to: ConnectTo
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(*[failure(500)] * 3, text("Back again."))
    session = await connect_to(server)

    await session.send(say("Hello?"))
    await session.send({"type": "response.create"})
    events = [await session.receive() for _ in range(4)]

    assert [e["type"] for e in events] == [
        "conversation.item.added", "response.created", "error", "response.done"]
    assert error_code(events[2]) == "backend_unavailable"
    assert events[3]["response"]["status"] == "failed"
    assert reply_text(await turn(session, "Now?")) == "Back again."


async def test_cancel_and_reload_stop_a_reply_in_progress(
    fake_openai: FakeOpenAI, make_server: MakeServer, connect_to: ConnectTo, allowed_root: Path
) -> None:
    server = await make_server(llm=fake_openai.base_url)
    fake_openai.script(stall("Once upon"), stall("Let me"), text("Fresh start."))
    session = await connect_to(server)

    await session.send(say("Tell me a story."))
    await session.send({"type": "response.create"})
    while (await session.receive())["type"] != "response.output_text.delta":
        pass
    cancelled = await session.request({"type": "response.cancel"})

    await session.send(say("Another one."))
    await session.send({"type": "response.create"})
    while (await session.receive())["type"] != "response.output_text.delta":
        pass
    directory = write_directory(allowed_root, "d", {"b.py": character_source("Bea")})
    await session.send({"type": "session.characters.reload", "directory": str(directory)})
    after_reload = [await session.receive(), await session.receive()]
    fresh = await turn(session, "Hi Bea.")

    assert cancelled["type"] == "response.done"
    assert cancelled["response"]["status"] == "cancelled"
    assert [e["type"] for e in after_reload] == ["response.done", "session.characters.reloaded"]
    assert after_reload[0]["response"]["status"] == "cancelled"
    assert reply_text(fresh) == "Fresh start."
    assert fake_openai.requests[-1]["messages"][1:] == [{"role": "user", "content": "Hi Bea."}]


async def test_unmute_clients_get_only_events_they_accept(connect: Connect) -> None:
    session = await connect(model=None)
    await session.send(say("hello"))
    await session.send({"type": "response.create"})

    events = [await session.receive()]
    while events[-1]["type"] != "response.text.done":
        events.append(await session.receive())
    listed = await session.request({"type": "session.characters.list"})

    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created"
    assert events[0]["response"]["voice"]
    assert set(kinds[1:-2]) == {"unmute.response.text.delta.ready", "response.text.delta"}
    assert kinds[-2] == "unmute.additional_outputs"
    history = events[-2]["args"]["chat_history"]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "hello"
    assert history[2]["content"] == events[-1]["text"]
    assert listed["type"] == "session.characters.listed"


async def test_replies_are_spoken_through_the_tts(
    fake_openai: FakeOpenAI, fake_kyutai_tts: FakeKyutaiTTS, make_server: MakeServer,
    connect_to: ConnectTo, allowed_root: Path,
) -> None:
    server = await make_server(llm=fake_openai.base_url, tts=fake_kyutai_tts.url)
    fake_openai.script(text("Fair ", "winds ", "ahead."))
    session = await connect_to(server)
    await session.reload(write_directory(allowed_root, "d", {
        "a.py": character_source("Ada", voice_path="voices/ada.wav")}))

    events = await turn(session, "Any news?")

    kinds = [e["type"] for e in events]
    audio = b"".join(base64.b64decode(e["delta"]) for e in events
                     if e["type"] == "response.output_audio.delta")
    assert kinds.index("response.output_audio.done") < kinds.index("response.done")
    assert len(audio) == 2 * 3 * fake_kyutai_tts.samples_per_word  # pcm16, 3 words
    assert fake_kyutai_tts.connections[-1].texts == ["Fair", "winds", "ahead."]
    assert fake_kyutai_tts.connections[-1].query["voice"] == "voices/ada.wav"
    assert reply_text(events) == "Fair winds ahead."
    exposed = await (await server.get("/metrics")).text()
    for histogram in ("llm_time_to_first_token_seconds", "tts_time_to_first_audio_seconds",
                      "reply_time_to_first_audio_seconds"):
        count = re.search(rf"^{histogram}_count (\S+)$", exposed, re.M)
        assert count is not None and float(count.group(1)) >= 1, histogram


async def test_push_to_talk_speech_becomes_the_users_message(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT, make_server: MakeServer,
    connect_to: ConnectTo,
) -> None:
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url)
    fake_kyutai_stt.script(("Hello", 0.2), ("there", 0.6), end=0.9)
    fake_openai.script(text("Hi!"))
    session = await connect_to(server)
    updated = await session.request({"type": "session.update", "session": {
        "type": "realtime", "audio": {"input": {"turn_detection": None}}}})
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    second = base64.b64encode(bytes(2 * 24_000)).decode()  # one second of pcm16 silence

    for _ in range(2):
        await session.send({"type": "input_audio_buffer.append", "audio": second})
    await session.send({"type": "input_audio_buffer.commit"})
    heard = [await session.receive()]
    while heard[-1]["type"] != "conversation.item.input_audio_transcription.completed":
        heard.append(await session.receive())
    events = await turn_without_message(session)

    deltas = [e for e in heard if e["type"].endswith("transcription.delta")]
    assert "".join(e["delta"] for e in deltas) == "Hello there"
    assert [e["start_time"] for e in deltas] == [0.2, 0.6]
    assert heard[-1]["transcript"] == "Hello there"
    assert reply_text(events) == "Hi!"
    assert fake_openai.requests[-1]["messages"][-1] == {"role": "user", "content": "Hello there"}


async def test_audio_without_an_stt_is_refused_clearly(connect: Connect) -> None:
    session = await connect()

    refused = await session.request({"type": "input_audio_buffer.append", "audio": "AAAA"})

    assert error_code(refused) == "backend_unavailable"
    assert "--stt" in refused["error"]["message"]


async def turn_without_message(session: Realtime) -> list[dict[str, Any]]:
    await session.send({"type": "response.create"})
    events = [await session.receive()]
    while events[-1]["type"] != "response.done":
        events.append(await session.receive())
    return events


async def test_a_pause_ends_the_turn_and_speech_interrupts_the_reply(
    fake_openai: FakeOpenAI, fake_kyutai_stt: FakeKyutaiSTT, make_server: MakeServer,
    connect_to: ConnectTo,
) -> None:
    server = await make_server(llm=fake_openai.base_url, stt=fake_kyutai_stt.url)
    # The pause after 0.9 s ends the turn; "more" at 2.4 s comes during the reply.
    fake_kyutai_stt.script(("Tell", 0.2), ("me", 0.5), ("more", 2.4), end=0.9)
    fake_openai.script(stall("Well,"))
    session = await connect_to(server)
    frame = base64.b64encode(bytes(2 * 1920)).decode()  # 80 ms of pcm16

    async def speak(seconds: float) -> None:
        for _ in range(round(seconds / 0.08)):
            await session.send({"type": "input_audio_buffer.append", "audio": frame})

    async def until(kind: str, heard: list[dict[str, Any]]) -> list[dict[str, Any]]:
        heard.append(await session.receive())
        while heard[-1]["type"] != kind:
            heard.append(await session.receive())
        return heard

    await speak(1.6)  # "Tell me", then a pause: the turn ends and the reply begins
    first = await until("response.output_text.delta", [])
    await speak(1.6)  # "more", while the character is answering: a barge-in
    second = await until("response.done", await until("unmute.interrupted_by_vad", []))

    kinds = [e["type"] for e in first]
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    completed = next(e for e in first
                     if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == "Tell me"
    # As OpenAI orders it: the person's speech first, then the reply's cancelled end.
    assert [e["type"] for e in second][-3:] == [
        "input_audio_buffer.speech_started", "unmute.interrupted_by_vad", "response.done"]
    assert second[-1]["response"]["status"] == "cancelled"
    assert fake_openai.requests[0]["messages"][-1] == {"role": "user", "content": "Tell me"}
