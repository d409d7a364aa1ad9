"""Incremental decoding and cache trimming give the logits of one full forward pass.

Window 8; sequences run 4-5x past it, so rotating caches wrap several times, and trims happen both
before and after the first wrap (the case every peer gets wrong).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hf_reference import VARIANTS, VOCAB, WINDOW

from gemma_mlx.cache import KVCache, RotatingKVCache, attention_mask
from gemma_mlx.loading import load_model

LENGTH = 5 * WINDOW + 3
TOL = 1e-4
MAX_TRIM = 6


@pytest.fixture(autouse=True)
def small_cache_steps(monkeypatch):
    """Tiny growth steps, so short sequences exercise buffer growth and compaction."""
    monkeypatch.setattr(KVCache, "step", 4)
    monkeypatch.setattr(RotatingKVCache, "step", 4)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(1, VOCAB, LENGTH).tolist()


def full_logits(model, tokens):
    return np.array(model(mx.array([tokens]))[0])


def feed(model, cache, tokens):
    return np.array(model(mx.array([tokens]), cache=cache)[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_by_token_equals_full_forward(reference_checkpoints, variant, tokens):
    model = load_model(reference_checkpoints(variant)[0])
    expected = full_logits(model, tokens)
    cache = model.make_cache(max_trim=MAX_TRIM)
    prompt = 5
    got = [feed(model, cache, tokens[:prompt])]
    got += [feed(model, cache, [t]) for t in tokens[prompt:]]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=TOL)


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b", "gemma3"])
@pytest.mark.parametrize("chunk", [3, WINDOW - 1, WINDOW + 5])
def test_chunked_prefill_equals_full_forward(reference_checkpoints, variant, tokens, chunk):
    model = load_model(reference_checkpoints(variant)[0])
    expected = full_logits(model, tokens)
    cache = model.make_cache(max_trim=MAX_TRIM)
    got = [feed(model, cache, tokens[i : i + chunk]) for i in range(0, LENGTH, chunk)]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=TOL)


@pytest.mark.parametrize("variant", ["e2b", "31b", "gemma3"])
@pytest.mark.parametrize("at", [6, 2 * WINDOW + 3, 4 * WINDOW + 1])
@pytest.mark.parametrize("k", [1, 3, MAX_TRIM])
@pytest.mark.parametrize("one_by_one", [False, True])
def test_trim_and_refeed(reference_checkpoints, variant, tokens, at, k, one_by_one):
    """Rollback: feed k wrong tokens (as one verify chunk, or one by one like a draft model),
    trim them, feed the right ones."""
    model = load_model(reference_checkpoints(variant)[0])
    expected = full_logits(model, tokens)
    cache = model.make_cache(max_trim=MAX_TRIM)
    feed(model, cache, tokens[:at])
    wrong = [(t * 7 + 1) % VOCAB for t in tokens[at : at + k]]
    for chunk in [[t] for t in wrong] if one_by_one else [wrong]:
        feed(model, cache, chunk)
    assert all(c.trim(k) == k for c in cache)
    np.testing.assert_allclose(
        feed(model, cache, tokens[at : at + k]), expected[at : at + k], atol=TOL
    )
    # and decoding continues correctly afterwards
    nxt = at + k
    np.testing.assert_allclose(feed(model, cache, [tokens[nxt]])[0], expected[nxt], atol=TOL)


def test_rotating_cache_trim_limit():
    """After wrapping, up to max_trim positions can be trimmed, never more."""
    cache = RotatingKVCache(max_size=4, max_trim=2)
    for pos in range(50):  # past several compactions of the buffer
        k = mx.full((1, 1, 1, 2), float(pos))
        keys, _ = cache.update_and_fetch(k, k)
    limit = cache.max_trim
    assert 2 <= limit < cache.offset
    assert cache.trim(100) == limit
    # The next query sees exactly its window: positions offset-3 .. offset.
    k = mx.full((1, 1, 1, 2), -1.0)
    keys, _ = cache.update_and_fetch(k, k)
    seen = np.array(keys[0, 0, :, 0]).tolist()
    start = cache.offset - 4
    assert seen == [*range(start, cache.offset - 1), -1.0]


def test_full_cache_grows_and_trims():
    cache = KVCache()
    for pos in range(30):  # past several growth steps
        k = mx.full((1, 2, 1, 3), float(pos))
        cache.update_and_fetch(k, k)
    assert cache.trim(5) == 5 and cache.offset == 25
    keys, _ = cache.update_and_fetch(mx.zeros((1, 2, 1, 3)), mx.zeros((1, 2, 1, 3)))
    assert keys.shape[2] == 26
    assert np.array(keys[0, 0, -2, 0]) == 24


def test_attention_mask_matches_definition():
    """Every mask variant against the brute-force rule 0 <= q - k < window."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        window = int(rng.integers(1, 10))
        q0 = int(rng.integers(0, 30))
        n = int(rng.integers(1, 12))
        full = bool(rng.integers(0, 2))
        k0 = 0 if full else max(0, q0 - window + 1)
        mask = attention_mask(q0, q0 + n, k0, None if full else window)
        q = np.arange(q0, q0 + n)[:, None]
        k = np.arange(k0, q0 + n)[None, :]
        want = (k <= q) & ((q - k < window) | full)
        if mask is None:
            got = np.ones_like(want)
        elif isinstance(mask, str):
            got = k - k0 <= q - q0 + (k.shape[1] - n)
        else:
            got = np.array(mask)
        np.testing.assert_array_equal(got, want)
