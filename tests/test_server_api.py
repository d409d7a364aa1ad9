"""The server on a free loopback port, driven by the official openai and anthropic clients:
replies equal `gemma_mlx.generate` at temperature 0, tool calls and thinking arrive parsed and
separate, the prefix cache serves an agent loop, and bad requests get their API's error."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import numpy as np
import openai
import pytest
from server_helpers import TOOLS_TEMPLATE, ScriptedModel, serving
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.cache import shared_prefix
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load

NAME = "tiny"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "weather now",
        "input_schema": TOOLS[0]["function"]["parameters"],
    }
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("server-api") / "m"
    model, tokenizer = load(
        write_model(directory, chat_template=TOOLS_TEMPLATE, max_position_embeddings=1024)
    )
    return ScriptedModel(model), tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    with serving(model, tokenizer, "--served-model-name", NAME, "--max-tokens", "64") as running:
        yield running


@pytest.fixture
def scripted(tiny):
    """The served model, following a script inside the test only."""
    model, tokenizer = tiny
    yield model, tokenizer
    model.script = {}


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def an(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def reference(tiny, prompt, **options) -> str:
    model, tokenizer = tiny
    text = gemma_mlx.generate(model.inner, tokenizer, prompt, temp=0.0, **options)
    thinking_too = gemma_mlx.generate(
        model.inner, tokenizer, prompt, include_thinking=True, **options
    )
    assert text == thinking_too, "precondition: the reference reply stays in the answer channel"
    return text


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the quick brown fox"},
]
# A random tiny model repeats itself at temperature 0; a repetition penalty (one of the server's
# extra parameters) makes its greedy replies varied text.
PENALTY = {"repetition_penalty": 3.0}


# --- equal to gemma_mlx.generate ----------------------------------------------------------------


def test_chat_equals_generate(tiny, oa):
    expected = reference(tiny, MESSAGES, max_tokens=16, **PENALTY)
    assert len(set(expected)) > 8
    reply = oa.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, extra_body=PENALTY
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    _, tokenizer = tiny
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(MESSAGES, tokenize=True))
    streamed = oa.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=PENALTY,
    )  # fmt: skip
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_completions_equal_generate_with_logprobs(tiny, oa):
    model, tokenizer = tiny
    prompt = "hello world, this is"
    expected = reference(tiny, prompt, max_tokens=12)
    reply = oa.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3
    )
    assert reply.choices[0].text == expected
    steps = list(stream_generate(model.inner, tokenizer, prompt, 12))
    content = [s for s in steps if s.token not in tokenizer.special_ids]
    got = reply.choices[0].logprobs
    assert got.token_logprobs == pytest.approx(
        [s.logprobs[s.token].item() for s in content], abs=1e-5
    )
    for step, top in zip(content, got.top_logprobs, strict=True):
        best = np.argsort(-np.array(step.logprobs))[:3]
        assert sorted(top.values(), reverse=True) == pytest.approx(
            np.array(step.logprobs)[best].tolist(), abs=1e-5
        )
    streamed = oa.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_stop_strings(tiny, oa, an):
    full = reference(tiny, MESSAGES, max_tokens=16, **PENALTY)
    stop = full[5:8]
    expected = reference(tiny, MESSAGES, max_tokens=16, stop=[stop], **PENALTY)
    assert expected == full[: full.index(stop)]
    reply = oa.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, stop=stop, extra_body=PENALTY
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    full = reference(tiny, MESSAGES, max_tokens=16)
    stop = full[-3:]
    expected = reference(tiny, MESSAGES, max_tokens=16, stop=[stop])
    assert expected == full[: full.index(stop)]
    message = an.messages.create(
        model=NAME, system="be brief", messages=MESSAGES[1:], max_tokens=16,
        stop_sequences=["zzz", stop],
    )  # fmt: skip
    assert "".join(b.text for b in message.content) == expected
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)


def test_anthropic_messages_equal_generate_in_event_order(tiny, server, an):
    expected = reference(tiny, MESSAGES, max_tokens=16)
    message = an.messages.create(
        model=NAME, system="be brief", messages=MESSAGES[1:], max_tokens=16
    )
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == expected
    assert message.stop_reason in ("end_turn", "max_tokens")
    with an.messages.stream(
        model=NAME, system="be brief", messages=MESSAGES[1:], max_tokens=16
    ) as s:
        final = s.get_final_message()
    assert (
        final.content[0].text == expected
        and final.usage.output_tokens == message.usage.output_tokens
    )
    assert (
        final.usage.cache_read_input_tokens + final.usage.input_tokens
        == message.usage.input_tokens + (message.usage.cache_read_input_tokens)
    )
    body = {
        "model": NAME,
        "system": "be brief",
        "messages": MESSAGES[1:],
        "max_tokens": 16,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body) as response:
        names = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    n = len(names) - 6
    assert names == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * n,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip


# --- tools and thinking -------------------------------------------------------------------------


def prompt_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **kwargs
    )


def reply_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><turn|>'


def test_openai_tool_call_round_trip(scripted, server, oa):
    model, tokenizer = scripted
    user = [{"role": "user", "content": "weather in paris"}]
    model.follow(prompt_ids(tokenizer, user, tools=TOOLS), reply_ids(tokenizer, CALL))
    reply = oa.chat.completions.create(model=NAME, messages=user, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    streamed = list(oa.chat.completions.create(model=NAME, messages=user, tools=TOOLS, stream=True))
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    # The result goes back; the next prompt renders the call and the result through the template.
    history = [*user, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
    rendered = [*user, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "sunny"}]  # fmt: skip
    ids = prompt_ids(tokenizer, rendered, tools=TOOLS)
    model.follow(ids, reply_ids(tokenizer, "sunny in paris<turn|>"))
    second = oa.chat.completions.create(model=NAME, messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "sunny in paris"
    assert second.usage.prompt_tokens == len(ids)
    assert tuple(ids[:-1]) in server.engine.prefix_cache._entries


def test_anthropic_tool_use_round_trip(scripted, server, an):
    model, tokenizer = scripted
    user = [{"role": "user", "content": "weather in paris"}]
    model.follow(prompt_ids(tokenizer, user, tools=TOOLS), reply_ids(tokenizer, CALL))
    message = an.messages.create(model=NAME, messages=user, tools=ANTHROPIC_TOOLS, max_tokens=40)
    assert message.stop_reason == "tool_use"
    (use,) = message.content
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    with an.messages.stream(model=NAME, messages=user, tools=ANTHROPIC_TOOLS, max_tokens=40) as s:
        streamed = s.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [
        ("tool_use", "get_weather", {"city": "Paris"})
    ]

    history = [*user, {"role": "assistant", "content": [use.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]  # fmt: skip
    rendered = [*user, {"role": "assistant", "content": "", "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": use.id, "name": "get_weather", "content": "sunny"}]  # fmt: skip
    ids = prompt_ids(tokenizer, rendered, tools=TOOLS)
    model.follow(ids, reply_ids(tokenizer, "sunny in paris<turn|>"))
    second = an.messages.create(model=NAME, messages=history, tools=ANTHROPIC_TOOLS, max_tokens=40)
    assert [(b.type, b.text) for b in second.content] == [("text", "sunny in paris")]
    assert second.stop_reason == "end_turn"
    assert tuple(ids[:-1]) in server.engine.prefix_cache._entries


def test_forced_tool_choice_starts_the_call(scripted, oa):
    model, tokenizer = scripted
    user = [{"role": "user", "content": "weather in paris"}]
    ids = prompt_ids(tokenizer, user, tools=TOOLS) + reply_ids(
        tokenizer, "<|tool_call>call:get_weather{"
    )
    model.follow(ids, reply_ids(tokenizer, 'city:<|"|>Rome<|"|>}<tool_call|><turn|>'))
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = oa.chat.completions.create(model=NAME, messages=user, tools=TOOLS, tool_choice=choice)
    (call,) = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome"}


THOUGHT = "<|channel>thought\nthe fox is quick<channel|>it is quick<turn|>"


def test_thinking_arrives_separately(scripted, oa, an):
    model, tokenizer = scripted
    user = [{"role": "user", "content": "is the fox quick"}]
    model.follow(prompt_ids(tokenizer, user, enable_thinking=True), reply_ids(tokenizer, THOUGHT))
    for options in (
        {"reasoning_effort": "high"},
        {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
    ):
        message = (
            oa.chat.completions.create(model=NAME, messages=user, **options).choices[0].message
        )
        assert (message.content, message.reasoning_content) == ("it is quick", "the fox is quick")
    chunks = list(
        oa.chat.completions.create(model=NAME, messages=user, reasoning_effort="high", stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert (
        "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "the fox is quick"
    )
    assert "".join(d.content or "" for d in deltas) == "it is quick"
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = an.messages.create(model=NAME, messages=user, max_tokens=40, thinking=thinking)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "the fox is quick"), ("text", "it is quick")
    ]  # fmt: skip
    with an.messages.stream(model=NAME, messages=user, max_tokens=40, thinking=thinking) as s:
        assert [b.type for b in s.get_final_message().content] == ["thinking", "text"]
    off = oa.chat.completions.create(
        model=NAME, messages=user, reasoning_effort="none", max_tokens=8
    )
    assert off.usage.prompt_tokens == len(prompt_ids(tokenizer, user))  # no thinking: other prompt


def test_thinking_budget_closes_the_thought(scripted, an):
    model, tokenizer = scripted
    user = [{"role": "user", "content": "is the fox quick"}]
    long_thought = "<|channel>thought\n" + "the fox is quick " * 10 + "<channel|>it is<turn|>"
    model.follow(
        prompt_ids(tokenizer, user, enable_thinking=True), reply_ids(tokenizer, long_thought)
    )
    budget = {"type": "enabled", "budget_tokens": 4}
    message = an.messages.create(model=NAME, messages=user, max_tokens=40, thinking=budget)
    assert message.content[0].type == "thinking"
    assert len(tokenizer.encode(message.content[0].thinking, add_special_tokens=False)) <= 4 + 1


# --- the prefix cache in an agent loop ----------------------------------------------------------


def test_agent_loop_prefills_each_token_about_once(tiny, oa):
    """8 turns, each request re-sending the whole conversation: every turn finds the previous
    prompt in the cache (but the few tokens where the template renders the reply differently
    from the generation prompt), and the prompt tokens processed (prompt - cached) add up to at
    most 1.2x the conversation's length."""
    words = ["the quick fox", "a lazy dog", "hello world", "this is a test", "paris is", "it keeps",
             "the capital", "rare characters"]  # fmt: skip
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "be brief"}]
    prompts, cached, shared, previous = [], [], [], []
    for turn, text in enumerate(words):
        messages.append({"role": "user", "content": f"{text} {turn}"})
        ids = prompt_ids(tokenizer, messages)
        reply = oa.chat.completions.create(model=NAME, messages=messages, max_tokens=10)
        if previous:  # what this prompt shares with the previous one
            shared.append(shared_prefix(previous, ids))
        previous = ids
        prompts.append(reply.usage.prompt_tokens)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    processed = [p - c for p, c in zip(prompts, cached, strict=True)]
    conversation = prompts[-1] + reply.usage.completion_tokens
    print("prompt tokens processed per turn:", processed, "conversation:", conversation)
    assert all(c >= s for c, s in zip(cached[1:], shared, strict=True))
    assert sum(processed) <= 1.2 * conversation


# --- cancellation -------------------------------------------------------------------------------


def never_stop(tokenizer) -> dict[str, float]:
    """A logit bias that keeps the model from ending its reply."""
    return {str(i): -100 for i in tokenizer.eos_token_ids}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_goes_away_cancels_its_generation(server, tiny, stream):
    body = {"model": NAME, "prompt": "the quick brown fox", "max_tokens": 1000, "stream": stream,
            "logit_bias": never_stop(tiny[1])}  # fmt: skip
    finished = []
    original = server.engine._finish

    def record(request, reason, *args, **kwargs):
        finished.append((reason, request.generated))
        return original(request, reason, *args, **kwargs)

    server.engine._finish = record
    try:
        if stream:  # read until the first text, then hang up
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if '"text":"' in line and '"text":""' not in line:
                        break
        else:  # give up waiting for the whole reply
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 30
        while not finished and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.engine._finish = original
    assert len(finished) == 1 and finished[0][0] == "cancelled" and finished[0][1] < 1000
    deadline = time.monotonic() + 10  # the batch lets go of it at its next step
    while server.engine.scheduler.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.engine.scheduler.has_work


def test_speculative_decoding_gives_the_plain_tokens(tiny):
    model, tokenizer = tiny
    prompt = "the quick brown fox jumps over the lazy dog. " * 4
    expected = gemma_mlx.generate(model.inner, tokenizer, prompt, max_tokens=24)
    flags = ["--served-model-name", NAME, "--draft-model", "prompt-lookup", "--num-draft", "3"]
    with serving(model.inner, tokenizer, *flags) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=24)
    assert reply.choices[0].text == expected


# --- errors -------------------------------------------------------------------------------------


def post(server, path, body, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        headers={"content-type": "application/json"},
        **kwargs,
    )


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MESSAGE = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({**CHAT, "temperature": "hot"}, 400, "temperature"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "frobnicate": 1}, 400, "frobnicate"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
        ({**CHAT, "n": 2}, 400, "n"),
        ({**CHAT, "model": "gpt-9"}, 404, "model"),
        ({**CHAT, "messages": [{"role": "user", "content": "fox " * 2000}]}, 400, "messages"),
    ],
)
def test_openai_errors(server, body, status, param):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_context_length_exceeded(server):
    body = {**CHAT, "messages": [{"role": "user", "content": "fox " * 2000}]}
    assert (
        post(server, "/v1/chat/completions", body).json()["error"]["code"]
        == "context_length_exceeded"
    )


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{", 400, "invalid_request_error"),
        ({**MESSAGE, "max_tokens": "many"}, 400, "invalid_request_error"),
        ({k: v for k, v in MESSAGE.items() if k != "max_tokens"}, 400, "invalid_request_error"),
        ({**MESSAGE, "model": "claude-9"}, 404, "not_found_error"),
        (
            {
                **MESSAGE,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            400,
            "invalid_request_error",
        ),
    ],
)
def test_anthropic_errors(server, body, status, kind):
    response = post(server, "/v1/messages", body)
    assert response.status_code == status
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == kind


def test_oversized_bodies_and_unknown_routes(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}
    response = post(server, "/v1/chat/completions", big)
    assert response.status_code == 413 and response.json()["error"]["message"]
    response = post(server, "/v1/messages", big)
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).models.retrieve(
            "gpt-9"
        )
    assert [
        m.id for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").models.list()
    ] == [NAME]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_api_key_on_every_endpoint_but_health(tiny):
    model, tokenizer = tiny
    with serving(model, tokenizer, "--served-model-name", NAME, "--api-key", "s3cret") as running:
        url = running.url
        assert httpx.get(f"{url}/health").status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/messages"),
        ]:
            assert httpx.request(method, f"{url}{path}", json=CHAT).status_code == 401
            bad = httpx.request(
                method, f"{url}{path}", json=CHAT, headers={"authorization": "Bearer nope"}
            )
            assert bad.status_code == 401
        assert (
            post(running, "/v1/messages", MESSAGE).json()["error"]["type"] == "authentication_error"
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert (
            openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").models.list().data[0].id == NAME
        )
        message = anthropic.Anthropic(base_url=url, api_key="s3cret").messages.create(**MESSAGE)
        assert message.usage.output_tokens == 2


def test_full_queue_answers_429_with_retry_after(tiny):
    model, tokenizer = tiny
    flags = ["--served-model-name", NAME, "--decode-concurrency", "1", "--max-queue", "0"]
    with serving(model, tokenizer, *flags) as running:
        body = {"model": NAME, "prompt": "the quick", "max_tokens": 1000, "stream": True,
                "logit_bias": never_stop(tokenizer)}  # fmt: skip
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body) as busy:
            assert busy.status_code == 200
            lines = busy.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            response = post(
                running, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1}
            )
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_template_cannot_reach_python_internals(tiny):
    model, tokenizer = tiny
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with serving(
        model, tokenizer, "--served-model-name", NAME, "--chat-template", escape
    ) as running:
        response = post(running, "/v1/chat/completions", CHAT)
    assert response.status_code == 400
    assert "<class" not in response.text and "chat template" in response.json()["error"]["message"]


class Broken(ScriptedModel):
    def __call__(self, inputs, cache=None, logits_to_keep=None):
        raise RuntimeError("secret internals")

    def batched(self, inputs, segments, return_hidden=False):
        raise RuntimeError("secret internals")


def test_a_failing_generation_is_a_500_without_internals(tiny):
    model, tokenizer = tiny
    with serving(Broken(model.inner), tokenizer, "--served-model-name", NAME) as running:
        openai_error = post(running, "/v1/completions", {"model": NAME, "prompt": "x y z"})
        anthropic_error = post(running, "/v1/messages", MESSAGE)
        assert httpx.get(f"{running.url}/health").json() == {"status": "ok"}
    assert (
        openai_error.status_code == 500 and openai_error.json()["error"]["type"] == "server_error"
    )
    assert (
        anthropic_error.status_code == 500
        and anthropic_error.json()["error"]["type"] == "api_error"
    )
    for response in (openai_error, anthropic_error):
        assert "secret" not in response.text and "Traceback" not in response.text
