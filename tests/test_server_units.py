"""Server parts without HTTP: Gemma 4 tool-call parsing, reply splitting, the prefix cache (exact
past the sliding window, LRU within its budget), penalties, the thinking budget, the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2.sandbox
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tool_parsers import gemma4 as mlx_lm_gemma4
from tiny_chat_model import GEMMA4_CHAT_TEMPLATE, WINDOW, write_model

from gemma_mlx.cache import shared_prefix
from gemma_mlx.decode import prefill
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.server.__main__ import parse_size
from gemma_mlx.server.engine import TokenEvent
from gemma_mlx.server.generation import make_penalties, make_thinking_budget, matched_stop
from gemma_mlx.server.prefix_cache import PrefixCache
from gemma_mlx.server.tools import (
    TEXT,
    THINKING,
    TOOL_USE,
    ReplyParser,
    ToolCall,
    ToolCallSyntaxError,
    parse_tool_calls,
)
from gemma_mlx.tokenizer import TokenizerError, _compile_template, render_chat_template

Q = '<|"|>'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(
        write_model(tmp_path_factory.mktemp("server") / "m", chat_template=GEMMA4_CHAT_TEMPLATE)
    )


# --- tool calls ---------------------------------------------------------------------------------

AGREED = [  # call texts mlx-lm's Gemma 4 parser reads too: it is the reference
    f"call:get_weather{{city:{Q}Paris{Q}}}",
    "call:add{a:1,b:-2.5,exact:true,note:null}",
    f'call:search{{query:{Q}a, b: {{c}} "d"{Q},filters:{{year:2024,tags:[{Q}x{Q},{Q}y{Q}]}}}}',
    "call:noargs{}",
]


@pytest.mark.parametrize("text", AGREED)
def test_tool_call_parsing_agrees_with_mlx_lm(text):
    expected = mlx_lm_gemma4.parse_tool_call(text)
    assert parse_tool_calls(text) == [ToolCall(expected["name"], expected["arguments"])]


def test_several_calls_in_one_span_and_spacing():
    text = f" call:a{{x:1}} call:b{{ y : {Q}two{Q} , z : [ 1 , 2 ] }}"
    assert parse_tool_calls(text) == [
        ToolCall("a", {"x": 1}),
        ToolCall("b", {"y": "two", "z": [1, 2]}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "get_weather{city:1}",
        f"call:f{{city:{Q}Paris}}",
        "call:f{a:1",
        "call:{a:1}",
        "",
        "call:f{:1}",
    ],
)
def test_malformed_tool_calls_are_errors(text):
    with pytest.raises(ToolCallSyntaxError):
        parse_tool_calls(text)


def events(tokenizer, text: str, prompt=()) -> list[TokenEvent]:
    """TokenEvents for `text` as stream_generate would produce them (same detokenizer)."""
    detokenizer = tokenizer.detokenizer(tokenizer.channel_after(list(prompt)))
    out = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        channel, piece = detokenizer.add_token(token)
        out.append(TokenEvent(token, piece, channel))
    return out


def split(tokenizer, text: str, prompt=()) -> list:
    parser = ReplyParser(tokenizer, list(prompt))
    parts = [p for e in events(tokenizer, text, prompt) for p in parser.feed(e)] + parser.finish()
    merged = []
    for p in parts:  # join consecutive text pieces of one kind, as a reader would
        if merged and p.kind == merged[-1][0] and p.kind != TOOL_USE:
            merged[-1] = (p.kind, merged[-1][1] + p.text)
        else:
            merged.append((p.kind, p.call if p.kind == TOOL_USE else p.text))
    return merged


def test_reply_splits_thinking_answer_and_tool_calls(tiny):
    _, tokenizer = tiny
    reply = (
        "<|channel>thought\nthe user wants paris<channel|>Let me check."
        f'<|tool_call>call:get_weather{{city:{Q}Paris "FR"{Q}}}<tool_call|>'
        f"<|tool_call>call:noargs{{}}<tool_call|>done"
    )
    assert split(tokenizer, reply) == [
        (THINKING, "the user wants paris"),
        (TEXT, "Let me check."),
        (TOOL_USE, ToolCall("get_weather", {"city": 'Paris "FR"'})),
        (TOOL_USE, ToolCall("noargs", {})),
        (TEXT, "done"),
    ]


def test_unparsable_or_unfinished_calls_stay_text(tiny):
    _, tokenizer = tiny
    assert split(tokenizer, "a<|tool_call>oops{<tool_call|>b") == [
        (TEXT, "a<|tool_call>oops{<tool_call|>b")
    ]
    assert split(tokenizer, "<|tool_call>call:f{x:1}") == [(TOOL_USE, ToolCall("f", {"x": 1}))]


def test_a_call_the_prompt_started_is_completed_by_the_reply(tiny):
    _, tokenizer = tiny
    prompt = tokenizer.encode("<|turn>model\n<|tool_call>call:f{", add_special_tokens=False)
    assert split(tokenizer, "x:2}<tool_call|>", prompt) == [(TOOL_USE, ToolCall("f", {"x": 2}))]


# --- prefix cache -------------------------------------------------------------------------------


def greedy(model, tokenizer, ids, cache=None, n=12) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, ids, n, prompt_cache=cache)]


def snapshot(store: PrefixCache, model, tokens: list[int]) -> list:
    """Store the cache of `tokens`, prefilled in chunks of 256: at 257 tokens the last one makes
    the sliding caches wrap, so they keep only window - 1 + 32 positions (a cut of at most 33)."""
    cache = model.make_cache()
    prefill(model, cache, tokens, 256)
    store.store(tokens, cache)
    return cache


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    directory = tmp_path_factory.mktemp("server-long") / "m"
    return load(write_model(directory, max_position_embeddings=2048))


def test_prefix_hits_equal_fresh_runs_past_the_window(long_context):
    """A snapshot of 257 tokens (window 8, wrapped) is used as is, cut back by up to 33 tokens,
    or skipped for a shorter one when its sliding caches cannot be cut back that far; every
    continuation equals a fresh run."""
    model, tokenizer = long_context
    rng = np.random.default_rng(0)
    base = rng.integers(300, 500, 240).tolist()
    a, b, d = (rng.integers(300, 500, n).tolist() for n in (17, 20, 57))
    store = PrefixCache(model.make_cache, 1 << 30)
    wrapped = snapshot(store, model, base + a)
    assert min(c.max_trim for c in wrapped) == 33 and WINDOW == 8

    def check(cache_store, prompt, expected_cached):
        cache, cached = cache_store.fetch(prompt)
        assert cached == expected_cached
        assert greedy(model, tokenizer, prompt, cache) == greedy(model, tokenizer, prompt)

    check(store, base + a + b, 257)  # extends the snapshot: nothing to cut back
    check(store, base + b, 240)  # cut back by 17 <= 33
    check(store, base + a + b, 257)  # the snapshot was not changed by the runs it started
    other = PrefixCache(model.make_cache, 1 << 30)
    snapshot(other, model, base[:200] + d)  # shares 200 tokens: a cut of 57 > 33
    check(other, base + b, 0)
    snapshot(other, model, base[:150])  # a shorter snapshot that needs no cut is used instead
    check(other, base + b, 150)


@pytest.mark.parametrize(
    ("cached", "tokens", "expected"),
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1, 2], 2),
     ([1, 2, 3], [1, 5, 3], 1), ([4], [1], 0)],
)  # fmt: skip
def test_shared_prefix_counts_the_leading_tokens_in_common(cached, tokens, expected):
    assert shared_prefix(cached, tokens) == expected
    assert shared_prefix(tuple(tokens), np.array(cached, dtype=np.int64)) == expected


def test_lru_within_the_byte_budget(tiny):
    model, _ = tiny
    probe = PrefixCache(model.make_cache, 1 << 30)
    snapshot(probe, model, list(range(300, 340)))
    size = probe.nbytes
    store = PrefixCache(model.make_cache, 2 * size + size // 2)
    first, second, third = ([300 + i, *range(301, 340)] for i in range(3))
    snapshot(store, model, first)
    snapshot(store, model, second)
    assert store.fetch([*first, 1])[1] == 40  # first is now the most recently used
    snapshot(store, model, third)  # over budget: second (least recently used) goes
    assert len(store) == 2 and store.nbytes == 2 * size
    assert store.fetch([*second, 1])[1] == 0
    assert store.fetch([*first, 1])[1] == 40 and store.fetch([*third, 1])[1] == 40
    off = PrefixCache(model.make_cache, 0)
    snapshot(off, model, first)
    assert len(off) == 0 and off.fetch([*first, 1])[1] == 0


# --- logits processors --------------------------------------------------------------------------


def test_presence_and_frequency_penalties_follow_openai():
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting generated tokens
    only (OpenAI's formula), against numpy."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 50)).astype(np.float32)
    prompt, generated = [3, 3, 7], [5, 5, 5, 9, 3]
    got = make_penalties(0.5, 0.25, len(prompt))(mx.array(prompt + generated), mx.array(logits))
    counts = np.bincount(generated, minlength=50)
    expected = logits - 0.25 * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-6)
    untouched = make_penalties(0.5, 0.25, 8)(mx.array(prompt + generated), mx.array(logits))
    np.testing.assert_array_equal(np.array(untouched), logits)


def test_thinking_budget_closes_the_channel():
    limit = make_thinking_budget(3, channel_open=6, channel_close=7, newlines=frozenset({40}))
    logits = mx.zeros((1, 10))

    def allowed(history):
        out = np.array(limit(mx.array(history), logits))[0]
        return np.flatnonzero(out == 0).tolist()

    everything = list(range(10))
    assert allowed([1, 6, 20, 21, 22, 23]) == everything  # header not finished: not thinking yet
    assert allowed([1, 6, 20, 40, 21, 22]) == everything  # two thought tokens
    assert allowed([1, 6, 20, 40, 21, 22, 23]) == [7]  # three: the channel must close
    assert allowed([1, 6, 20, 40, 21, 22, 23, 7, 30, 31, 32, 33]) == everything  # closed


def test_matched_stop_names_the_string_that_cut(tiny):
    _, tokenizer = tiny
    tokens = tokenizer.encode("hello world, this is", add_special_tokens=False)
    assert matched_stop(tokenizer, tokens, "hello", ["is", "o w", "zz"]) == "o w"
    assert matched_stop(tokenizer, tokens, "hello world, th", ["zz", "is"]) == "is"


# --- odds and ends ------------------------------------------------------------------------------


def test_sizes():
    assert parse_size("0") == 0
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5g") == 1_500_000_000


def test_templates_render_in_an_immutable_sandbox():
    assert isinstance(
        _compile_template("{{ 1 }}").environment, jinja2.sandbox.ImmutableSandboxedEnvironment
    )
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError):
        render_chat_template(escape, [])
    mutate = "{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}"
    with pytest.raises(TokenizerError):
        render_chat_template(mutate, [{"role": "user", "content": "hi"}])


def test_command_line_bad_input_is_one_line_and_status_2(capsys):
    from gemma_mlx.server.__main__ import run

    assert run(["--host", "0.0.0.0", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gemma-mlx-server: warning: listening on 0.0.0.0 without --api-key")
    assert len(err) == 2 and err[1].startswith("gemma-mlx-server: error: /nonexistent/model")
    assert run(["--temp", "-1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "gemma-mlx-server: error: temperature must be >= 0, got -1.0"
    )
    with pytest.raises(SystemExit) as exit_info:
        run(["--port", "many"])
    assert exit_info.value.code == 2


def test_serving_benchmark_table():
    from benchmarks.serve import markdown, prompts

    texts = prompts(64)
    assert len({tuple(t.split()[:3]) for t in texts}) == 64  # no two share a start
    machine = {"label": "m"}
    record = {
        "machine": machine, "model": {"label": "270m"}, "time": "2026-12-02T00:00:00+00:00",
        "engine": {"name": "gemma_mlx", "runs": "ours"}, "scenario": "agent 8 turns", "clients": 1,
        "requests": 8, "ttft_s": {"median": 0.5, "min": 0.25, "max": 1.0}, "tokens_per_s": 12.5,
        "prompt_tokens": [100, 150], "cached_tokens": [0, 120],
    }  # fmt: skip
    older = record | {"time": "2026-12-01T00:00:00+00:00", "tokens_per_s": 1.0}
    lines = markdown([older, record])
    assert (
        "| m | 270m | gemma_mlx | agent 8 turns | 8 | 0.50 (0.25-1.00) | 12.50 | 130 / 250 |"
        in lines
    )
    by_clients = [record | {"scenario": f"{n} clients", "clients": n} for n in (16, 4)]
    rows = [line for line in markdown([record, *by_clients]) if line.startswith("| m ")]
    assert [row.split(" | ")[3] for row in rows] == ["4 clients", "16 clients", "agent 8 turns"]
    assert markdown([]) == []


def test_the_benchmark_gives_mlx_lm_only_directories_it_loads(tmp_path):
    from benchmarks.serve import ServeBenchmarkError, mlx_lm_loads, served_directory

    def directory(name: str, quantization: dict | None) -> Path:
        (tmp_path / name).mkdir()
        config = {"model_type": "gemma3_text"} | (
            {"quantization": quantization} if quantization else {}
        )
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    dense = directory("dense", None)
    affine = directory("affine", {"group_size": 32, "bits": 4, "lm_head": {"bits": 8}})
    q6k = directory("q6k", {"bits": 4, "mode": "affine", "mlp": {"bits": 6, "mode": "gguf_q6_k"}})
    assert mlx_lm_loads(dense) and mlx_lm_loads(affine) and not mlx_lm_loads(q6k)
    assert served_directory(str(q6k), [], tmp_path) == q6k  # no peer: the model's own directory
    with pytest.raises(ServeBenchmarkError, match="--requant-bits 8"):
        served_directory(str(q6k), ["mlx-lm"], tmp_path)
