"""server/backends/llm.py through the real openai SDK, against a fake that speaks OpenAI's
chat-completions protocol on loopback (tests/fake_openai.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import SCALE, free_port

from server.backends.builtin.responder import BuiltinResponder
from server.backends.errors import BackendUnavailable
from server.backends.llm import LLM, TextDelta, ToolCallRequest
from server.backends.openai.chat import OpenAICompatibleLLM
from server.backends.tool_loop import TOO_MANY_TOOL_ROUNDS, respond
from tests.fakes.openai_chat import (
    FakeOpenAI,
    call,
    drop,
    failure,
    garbled,
    stall,
    text,
    tool_calls,
)

WEATHER = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]


@pytest.fixture
async def llm(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAICompatibleLLM]:
    model = OpenAICompatibleLLM(fake_openai.base_url, timeout=10 * SCALE)
    await model.start()
    yield model
    await model.close()


class Tools:
    """A ``call_tool`` that records its calls and answers from a table."""

    def __init__(self, **answers: str | Exception) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, name: str, arguments: dict[str, Any]) -> str:
        self.calls.append((name, arguments))
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def reply(llm: LLM, messages: list[dict[str, Any]], call_tool: Tools | None = None,
                tools: list[dict[str, Any]] | None = None, **options: Any) -> list[str]:
    return [delta async for delta in respond(
        llm, messages, WEATHER if tools is None else tools, call_tool or Tools(), 0.7, **options)]


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are Charles."},
            {"role": "user", "content": content}]


# ── text ─────────────────────────────────────────────────────────────────────


async def test_text_arrives_in_pieces_and_in_order(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(text("Bon", "jour, ", "mon ", "ami."))
    messages = user("Say hello in French.")

    deltas = await reply(llm, messages, tools=[])

    assert deltas == ["Bon", "jour, ", "mon ", "ami."]
    assert messages[-1] == {"role": "assistant", "content": "Bonjour, mon ami."}
    sent = fake_openai.requests[0]
    assert sent["model"] == "fake-model"
    assert sent["stream"] is True
    assert sent["temperature"] == 0.7
    assert sent["messages"] == user("Say hello in French.")
    assert "tools" not in sent  # an empty list is not sent: some servers reject it


async def test_deltas_arrive_before_the_completion_ends(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(stall("Once ", "upon"))  # the server then stays silent

    stream = llm.stream(user("A story?"), [], 0.7)
    first = [await anext(stream), await anext(stream)]
    await stream.aclose()  # a barge-in: the caller stops listening

    assert first == [TextDelta("Once "), TextDelta("upon")]


# ── choosing the model ───────────────────────────────────────────────────────


async def test_the_only_model_served_is_chosen(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["llama3.2:1b"]
    fake_openai.script(text("Hi."))
    model = OpenAICompatibleLLM(fake_openai.base_url)
    try:
        await model.start()
        await reply(model, user("Hi"))
    finally:
        await model.close()

    assert model.name == "llama3.2:1b"
    assert fake_openai.requests[0]["model"] == "llama3.2:1b"


async def test_several_models_and_none_named_is_a_clear_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["qwen2.5:7b", "llama3.2:1b"]
    model = OpenAICompatibleLLM(fake_openai.base_url)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await model.start()
    finally:
        await model.close()

    message = str(raised.value)
    assert raised.value.code == "backend_unavailable"
    assert fake_openai.base_url in message
    assert "qwen2.5:7b, llama3.2:1b" in message
    assert "--llm-model" in message


async def test_a_named_model_is_used_as_given(fake_openai: FakeOpenAI) -> None:
    fake_openai.models = ["qwen2.5:7b", "llama3.2:1b"]
    fake_openai.script(text("Hi."))
    model = OpenAICompatibleLLM(fake_openai.base_url, model="llama3.2:1b")
    try:
        await model.start()
        await reply(model, user("Hi"))
    finally:
        await model.close()

    assert fake_openai.requests[0]["model"] == "llama3.2:1b"


# ── tools ────────────────────────────────────────────────────────────────────


async def test_a_tool_call_streamed_in_pieces_is_run_and_its_result_sent_back(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(
        tool_calls(call("get_weather", '{"ci', 'ty": "Pa', 'ris"}', id="call_w1"),
                   text=["Let me look. "]),
        text("Sunny ", "in Paris."),
    )
    tools = Tools(get_weather="sunny, 21 °C")
    messages = user("Weather in Paris?")

    deltas = await reply(llm, messages, tools)

    assert tools.calls == [("get_weather", {"city": "Paris"})]
    assert deltas == ["Let me look. ", "Sunny ", "in Paris."]
    asked_for_tools = {
        "role": "assistant", "content": "Let me look. ",
        "tool_calls": [{"id": "call_w1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    }
    result = {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21 °C"}
    second = fake_openai.requests[1]
    assert second["messages"] == [*user("Weather in Paris?"), asked_for_tools, result]
    assert second["tools"] == WEATHER
    assert messages == [*user("Weather in Paris?"), asked_for_tools, result,
                        {"role": "assistant", "content": "Sunny in Paris."}]


async def test_parallel_tool_calls_are_assembled_by_index(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(
        tool_calls(call("get_weather", '{"city":', ' "Oslo"}', id="call_a"),
                   call("get_weather", '{"city": "Rome"}', id="call_b")),
        text("Cold in Oslo, warm in Rome."),
    )
    tools = Tools(get_weather="noted")

    await reply(llm, user("Oslo and Rome?"), tools)

    assert tools.calls == [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]
    sent = fake_openai.requests[1]["messages"]
    assert [c["id"] for c in sent[-3]["tool_calls"]] == ["call_a", "call_b"]
    assert [(m["role"], m["tool_call_id"]) for m in sent[-2:]] == [
        ("tool", "call_a"), ("tool", "call_b")]


async def test_the_stream_ends_a_tool_completion_with_one_request_per_call(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(tool_calls(call("get_weather", '{"city": "Lyon"}', id="call_l")))

    items = [item async for item in llm.stream(user("Lyon?"), WEATHER, 0.7)]

    assert items == [ToolCallRequest("call_l", "get_weather", '{"city": "Lyon"}')]


async def test_a_tool_that_raises_becomes_a_result_the_model_sees(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(tool_calls(call("get_weather", '{"city": "Nowhere"}', id="call_x")),
                       text("I could not find that place."))
    tools = Tools(get_weather=LookupError("no city called Nowhere"))

    deltas = await reply(llm, user("Weather in Nowhere?"), tools)

    assert "".join(deltas) == "I could not find that place."
    result = fake_openai.requests[1]["messages"][-1]
    assert result == {"role": "tool", "tool_call_id": "call_x",
                      "content": "tool get_weather failed: no city called Nowhere"}


@pytest.mark.parametrize(("arguments", "complaint"), [
    ('{"city": "Par', "its arguments are not valid JSON"),
    ('["Paris"]', "its arguments must be a JSON object, not list"),
])
async def test_malformed_tool_arguments_are_explained_to_the_model(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM, arguments: str, complaint: str
) -> None:
    fake_openai.script(tool_calls(call("get_weather", arguments)), text("Sorry."))
    tools = Tools(get_weather="unused")

    await reply(llm, user("Weather?"), tools)

    assert tools.calls == []
    result = fake_openai.requests[1]["messages"][-1]
    assert result["role"] == "tool"
    assert result["content"].startswith(f"tool get_weather was not called: {complaint}")


async def test_empty_tool_arguments_mean_no_arguments(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(tool_calls(call("get_time")), text("Noon."))
    tools = Tools(get_time="12:00")

    await reply(llm, user("Time?"), tools)

    assert tools.calls == [("get_time", {})]


async def test_tool_rounds_are_capped(fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM) -> None:
    fake_openai.script(*(tool_calls(call("get_weather", '{"city": "Paris"}', id=f"call_{n}"))
                         for n in range(3)))
    tools = Tools(get_weather="sunny")
    messages = user("Weather?")

    deltas = await reply(llm, messages, tools, max_tool_rounds=2)

    assert deltas == [TOO_MANY_TOOL_ROUNDS]
    assert len(fake_openai.requests) == 3
    assert len(tools.calls) == 2  # the third request for tools is not run
    assert messages[-1] == {"role": "assistant", "content": TOO_MANY_TOOL_ROUNDS}
    # Every call in the history has its result, so the next request is valid.
    asked = [c["id"] for m in messages for c in m.get("tool_calls", [])]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert asked == answered == ["call_0", "call_1"]


# ── failures ─────────────────────────────────────────────────────────────────


async def test_a_server_error_is_retried_then_reported(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(failure(500), failure(503), failure(500, "the GPU is on fire"))
    messages = user("Hi")

    with pytest.raises(BackendUnavailable) as raised:
        await reply(llm, messages)

    assert len(fake_openai.requests) == 3  # max_retries=2: the SDK tried three times
    assert fake_openai.base_url in str(raised.value)
    assert "the GPU is on fire" in str(raised.value)
    assert messages == user("Hi")


async def test_a_failure_before_the_stream_starts_is_retried(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(failure(500), text("Recovered."))

    assert await reply(llm, user("Hi")) == ["Recovered."]


async def test_a_stream_that_dies_midway_is_reported_and_not_retried(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(drop("I was say", "ing"), text("never asked for"))
    messages = user("Hi")
    deltas: list[str] = []

    with pytest.raises(BackendUnavailable, match="broke off mid-reply") as raised:
        async for delta in respond(llm, messages, [], Tools(), 0.7):
            deltas.append(delta)

    assert deltas == ["I was say", "ing"]
    assert fake_openai.base_url in str(raised.value)
    assert len(fake_openai.requests) == 1
    assert messages == user("Hi")  # the caller decides what to keep of a broken reply


async def test_a_stream_that_ends_early_but_cleanly_is_reported(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    # The SDK itself raises nothing here: no [DONE], no finish_reason, a clean EOF.
    fake_openai.script(drop("Half a ", "sent", abrupt=False))

    with pytest.raises(BackendUnavailable, match="ended before the model finished"):
        await reply(llm, user("Hi"))


async def test_a_chunk_that_is_not_a_completion_chunk_is_a_clear_error(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(garbled({"choices": "not a list"}))

    with pytest.raises(BackendUnavailable, match="not a chat.completion.chunk") as raised:
        await reply(llm, user("Hi"))
    assert "OpenAI-compatible" in str(raised.value)


async def test_a_refused_api_key_is_not_retried_and_says_which_option(
    fake_openai: FakeOpenAI, llm: OpenAICompatibleLLM
) -> None:
    fake_openai.script(failure(401, "Incorrect API key provided"))

    with pytest.raises(BackendUnavailable, match="TROUPE_LLM_API_KEY"):
        await reply(llm, user("Hi"))

    assert len(fake_openai.requests) == 1


async def test_a_stalled_stream_times_out(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(stall("Hmm"))
    model = OpenAICompatibleLLM(fake_openai.base_url, model="fake-model", timeout=0.5 * SCALE)
    try:
        with pytest.raises(BackendUnavailable, match="stalled mid-reply within"):
            await reply(model, user("Hi"))
    finally:
        await model.close()


async def test_an_unreachable_server_says_where_and_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    model = OpenAICompatibleLLM(url, max_retries=0)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await model.start()
    finally:
        await model.close()

    assert f"cannot reach the language model at {url}" in str(raised.value)
    assert "--llm" in str(raised.value)


async def test_a_model_that_was_down_at_start_is_chosen_on_first_use(
    fake_openai: FakeOpenAI,
) -> None:
    model = OpenAICompatibleLLM(fake_openai.base_url)
    fake_openai.script(text("Up now."))
    try:
        assert model.name == f"the model at {fake_openai.base_url}"
        assert await reply(model, user("Hi")) == ["Up now."]
    finally:
        await model.close()
    assert model.name == "fake-model"


# ── no model configured ──────────────────────────────────────────────────────


async def test_the_builtin_responder_says_what_it_heard_and_how_to_connect_a_model() -> None:
    responder = BuiltinResponder()
    messages = user("Is anybody there?")

    deltas = await reply(responder, messages)

    said = "".join(deltas)
    assert len(deltas) > 10  # word by word, like a model's stream
    assert "not a language model" in said
    assert "I heard: Is anybody there?" in said
    assert "--llm" in said and "OpenAI-compatible" in said
    assert messages[-1] == {"role": "assistant", "content": said}
    assert responder.name == "the built-in responder"


async def test_the_builtin_responder_before_anyone_spoke() -> None:
    deltas = await reply(BuiltinResponder(), [{"role": "system", "content": "Greet."}])

    said = "".join(deltas)
    assert "not a language model" in said
    assert "I heard" not in said
