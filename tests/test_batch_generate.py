"""`gemma_mlx.batch_generate`: texts in prompt order, each what `gemma_mlx.generate` gives alone.

A tiny Gemma 3 chat model in each compute dtype (float32, and the half precisions a Mac uses:
the CPU's half-precision products compute each row on its own, so there the batch is bit for
bit each request alone), text and chat prompts of different lengths, per-prompt `max_tokens`,
stop strings, prompt lookup; then the argument checks.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.errors import GemmaMLXError, OptionError, OptionTypeError
from gemma_mlx.generate import generate
from gemma_mlx.loading import load

PROMPTS = [
    "hello world, the quick brown fox jumps over the lazy dog. the capital of france is",
    "a",
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}],
    "this is a test; this is a test; this is a test; this is a test; this is",
    "the lazy dog",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, dtype):
    model, tokenizer = load(write_model(tmp_path_factory.mktemp("tiny") / "model"), dtype=dtype)
    return model, tokenizer


def alone(model, tokenizer, limits, **options):
    return [
        generate(model, tokenizer, p, max_tokens=m, **options)
        for p, m in zip(PROMPTS, limits, strict=True)
    ]


def test_texts_in_prompt_order_equal_each_alone(tiny):
    model, tokenizer = tiny
    limits = [16, 5, 20, 12, 9]
    result = gemma_mlx.batch_generate(model, tokenizer, PROMPTS, max_tokens=limits)
    assert result.texts == alone(model, tokenizer, limits)
    assert result.token_ids == [
        [r.token for r in gemma_mlx.stream_generate(model, tokenizer, p, m)]
        for p, m in zip(PROMPTS, limits, strict=True)
    ]
    assert set(result.finish_reasons) <= {"stop", "length"}
    stats = result.stats
    assert stats.generation_tokens == sum(map(len, result.token_ids))
    assert stats.generation_tps > 0 and stats.peak_memory > 0


def test_stop_strings_and_prompt_lookup(tiny):
    model, tokenizer = tiny
    limits = [20] * len(PROMPTS)
    result = gemma_mlx.batch_generate(
        model, tokenizer, PROMPTS, max_tokens=20, stop=["the", "."], draft="prompt-lookup",
        num_draft=3,
    )  # fmt: skip
    assert result.texts == alone(model, tokenizer, limits, stop=["the", "."])
    assert result.stats.speculation is not None and result.stats.speculation.proposed > 0


def test_verbose_prints_the_statistics(tiny, capsys):
    model, tokenizer = tiny
    gemma_mlx.batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=4, verbose=True)
    err = capsys.readouterr().err
    assert "[batch_generate] Generation:" in err and "tokens-per-sec" in err


@pytest.mark.parametrize("dtype", ["float32"], indirect=True, scope="module")
@pytest.mark.parametrize(
    "prompts, options, error, match",
    [
        ("one prompt", {}, OptionTypeError, "list of prompts"),
        (["a", "b"], {"max_tokens": [3]}, OptionError, "1 entries for 2 prompts"),
        (["a"], {"max_tokens": [0]}, OptionError, "max_tokens"),
        (["a"], {"temperature": 0.5}, OptionTypeError, "temperature"),
        (["a", ""], {}, GemmaMLXError, "empty"),
        (["a"], {"kv_budget": "lots"}, OptionTypeError, "kv_budget"),
        (["a"], {"num_draft": -1, "draft": "prompt-lookup"}, OptionError, "num_draft"),
    ],
)
def test_bad_arguments(tiny, prompts, options, error, match):
    model, tokenizer = tiny
    with pytest.raises(error, match=match):
        gemma_mlx.batch_generate(model, tokenizer, prompts, **options)
    mx.clear_cache()
