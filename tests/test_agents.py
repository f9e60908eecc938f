"""Coding agents against `step-gguf serve`, through the official clients over loopback: Claude
Code's Anthropic Messages API (`/v1/messages`, the key in `x-api-key`) and Codex's OpenAI
Responses API (`/v1/responses`), on the scripted model whose every answer is a reasoning block
and then a get_weather tool call."""

from __future__ import annotations

import json
import signal

import anthropic
import openai
import pytest

from scripted import REASONING, SCHEMA, scripted_checkpoint, start_serve

KEY = "sesame"
ASK = "What is the weather in Paris?"
REASONING_TEXT = "".join(REASONING)


@pytest.fixture(scope="module")
def served(workdir, runtime):
    """`step-gguf serve` with an API key, as a user starts it; its base URL (no /v1)."""
    from step_gguf.pipeline.convert import convert

    model = workdir / "agents-scripted.gguf"
    if not model.exists():
        convert(scripted_checkpoint(workdir / "scripted"), model, outtype="bf16")
    proc, url, _ = start_serve(model, "-c", "4096", "--api-key", KEY)
    yield url.removesuffix("/v1")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def _claude(url: str, key: str = KEY):
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=120)


WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": SCHEMA}


def test_messages_api_returns_the_tool_call_as_tool_use(served):
    msg = _claude(served).messages.create(model="step-3.5-flash", max_tokens=64, tools=[WEATHER],
                                          messages=[{"role": "user", "content": ASK}])
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"
    # the reasoning is not the answer's text
    assert not any(REASONING_TEXT in b.text for b in msg.content if b.type == "text")


def test_messages_api_streams_the_tool_call(served):
    with _claude(served).messages.stream(model="step-3.5-flash", max_tokens=64, tools=[WEATHER],
                                         messages=[{"role": "user", "content": ASK}]) as stream:
        events = [e.type for e in stream]
        msg = stream.get_final_message()
    assert "content_block_start" in events and "message_stop" in events
    [use] = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}


def test_messages_api_takes_a_tool_result_turn(served):
    client = _claude(served)
    first = client.messages.create(model="step-3.5-flash", max_tokens=64, tools=[WEATHER],
                                   messages=[{"role": "user", "content": ASK}])
    [use] = [b for b in first.content if b.type == "tool_use"]
    turn = [{"role": "user", "content": ASK},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": json.dumps({"city": "Paris", "celsius": 18})}]}]
    second = client.messages.create(model="step-3.5-flash", max_tokens=64, tools=[WEATHER], messages=turn)
    # the scripted model answers every turn with the same call: what counts is that the turn
    # with the tool's result is accepted and answered
    assert second.usage.input_tokens > first.usage.input_tokens
    assert any(b.type == "tool_use" for b in second.content)


def test_responses_api_returns_a_function_call(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=120)
    resp = client.responses.create(model="step-3.5-flash", input=ASK, max_output_tokens=64,
                                   tools=[{"type": "function", "name": "get_weather",
                                           "description": "Current weather in a city", "parameters": SCHEMA}])
    [call] = [o for o in resp.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert REASONING_TEXT not in (resp.output_text or "")


def test_the_key_is_enforced_on_both(served):
    with pytest.raises(anthropic.AuthenticationError):
        _claude(served, "wrong").messages.create(model="m", max_tokens=4,
                                                 messages=[{"role": "user", "content": ASK}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served}/v1", api_key="wrong", max_retries=0).responses.create(
            model="m", input=ASK, max_output_tokens=4)
