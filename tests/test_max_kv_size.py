"""`max_kv_size`: full-attention layers keep only their last N positions. Generation then equals
a whole-sequence pass in which full layers attend to their last N positions (a reference built
from masks, no rotating cache), in the three dtypes a Mac computes in; below N nothing changes;
memory estimates stay bounded; the option is checked."""

from __future__ import annotations

import mlx.core as mx
import pytest
from speculative_helpers import random_target
from tiny_chat_model import write_model

from gemma_mlx import batch_generate, cli
from gemma_mlx.cache import RotatingKVCache, attention_mask
from gemma_mlx.chat import ChatSession
from gemma_mlx.errors import OptionError
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.memory_guard import context_bytes
from gemma_mlx.models.gemma4 import SLIDING

WINDOW, MAX_KV = 8, 16
PROMPT = [2, *range(40, 70)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("maxkv") / "model", seed=0)
    return path, load(path)


def reference_argmax(model, tokens: list[int], full_window: int | None) -> list[int]:
    """Greedy choices after every position of `tokens` in one pass without caches, full layers
    attending to their last `full_window` positions."""

    def masks(layer_type, query_start, query_end, key_start):
        window = WINDOW if layer_type == SLIDING else full_window
        return attention_mask(query_start, query_end, key_start, window)

    h = model.model(mx.array(tokens)[None], attention_masks=masks)
    return mx.argmax(model.head(h)[0].astype(mx.float32), axis=-1).tolist()


@pytest.mark.parametrize("variant", ["gemma3", "e2b"])
def test_full_layers_see_their_last_n_positions(tiny, variant, dtype):
    tokenizer = tiny[1][1]
    model = random_target(variant, window=WINDOW, dtype=dtype)
    cache = model.make_cache(max_kv_size=MAX_KV)
    assert all(isinstance(c, RotatingKVCache) for c in cache)
    out = [
        r.token
        for r in stream_generate(
            model, tokenizer, PROMPT, 24, prompt_cache=cache, prefill_step_size=7
        )
    ]
    assert cache[0].offset > MAX_KV  # the full layers' caches have wrapped
    sequence = PROMPT + out
    assert reference_argmax(model, sequence, MAX_KV)[len(PROMPT) - 1 : -1] == out
    fresh = [r.token for r in stream_generate(model, tokenizer, PROMPT, 24, max_kv_size=MAX_KV)]
    assert fresh == out


def test_below_n_nothing_changes(tiny):
    _, (model, tokenizer) = tiny
    plain = [r.token for r in stream_generate(model, tokenizer, PROMPT, 10)]
    bounded = [r.token for r in stream_generate(model, tokenizer, PROMPT, 10, max_kv_size=64)]
    assert bounded == plain
    session = ChatSession(model, tokenizer, max_tokens=5, max_kv_size=64)
    session.send("hello there")
    assert isinstance(session.cache[-1], RotatingKVCache)


def test_memory_estimate_is_bounded(tiny):
    _, (model, _) = tiny
    bounded = sum(context_bytes(model, 100_000, 512, max_kv_size=256))
    assert bounded == sum(context_bytes(model, 10_000, 512, max_kv_size=256))  # constant
    assert bounded < sum(context_bytes(model, 100_000, 512)) / 100


def test_option_is_checked(tiny, capsys):
    path, (model, tokenizer) = tiny
    with pytest.raises(OptionError, match="max_kv_size"):
        next(stream_generate(model, tokenizer, PROMPT, 3, max_kv_size=0))
    assert cli.run(["--model", str(path), "-p", "hi", "--max-kv-size", "0"]) == 2
    assert "--max-kv-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(OptionError, match="max_kv_size"):  # never silently ignored
        batch_generate(model, tokenizer, ["hello"], max_kv_size=16)
