"""The memory budget: many long requests queue instead of exhausting memory.

16 requests of 160-200-token prompts against a budget that holds three of them with caches of
their own: at least three run at once, more once decoding sequences share the batch's cache pool
(it holds a sliding-window layer's window, not the chunk-sized headroom of a cache of its own),
never all of them; every one finishes with its full output (equal to its output alone), and
MLX's peak memory stays within the budget above what was allocated before (the weights). A
request that could not fit even alone is refused when it is submitted.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from batch_helpers import byte_tokenizer, random_prompts, solo_tokens
from speculative_helpers import random_target

from gemma_mlx.batching.memory import sequence_kv_bytes
from gemma_mlx.batching.passes import Choice
from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.errors import OptionError

VOCAB, CHUNK, NEW = 512, 64, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = byte_tokenizer(tmp_path_factory.mktemp("bytes"), VOCAB)
    model = random_target("31b", window=16)
    prompts = random_prompts(16, (160, 200), VOCAB, seed=2)
    return model, tokenizer, prompts


def test_sixteen_long_requests_queue_within_the_budget(setup):
    model, tokenizer, prompts = setup
    probe = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**40)
    for p in prompts:
        probe.submit(p, NEW)
    longest = sorted(probe.waiting, key=lambda s: s.kv_bytes)[-3:]
    budget = probe.memory_needed(longest) + 1  # any three fit, never four
    mx.clear_cache()
    mx.synchronize()
    baseline = mx.get_active_memory()  # the weights and anything else alive
    mx.reset_peak_memory()
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=budget)
    uids = [scheduler.submit(p, NEW) for p in prompts]
    tokens = {uid: [] for uid in uids}
    reasons = {}
    most = 0
    while scheduler.has_work:
        for uid, response in scheduler.step():
            tokens[uid].append(response.token)
            reasons[uid] = response.finish_reason
        most = max(most, len(scheduler.active))
    peak = mx.get_peak_memory() - baseline
    assert 3 <= most < len(prompts)
    assert all(reasons[u] in ("length", "stop") for u in uids)
    assert peak <= budget, f"peak {peak / 2**20:.2f} MiB over the budget {budget / 2**20:.2f} MiB"
    for uid, prompt in list(zip(uids, prompts, strict=True))[:2]:
        assert tokens[uid] == solo_tokens(model, tokenizer, prompt, NEW)


def test_the_estimate_bounds_the_caches(setup):
    """After a run, each layer cache holds no more than `sequence_kv_bytes` says."""
    model, tokenizer, prompts = setup
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**40)
    scheduler.submit(prompts[0], NEW)
    sequence = scheduler.waiting[0]
    cache = sequence.cache
    while scheduler.has_work:
        scheduler.step()
    held = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    bound = sequence_kv_bytes(model, len(prompts[0]) + NEW, scheduler.max_trim, CHUNK)
    assert bound / 3 < held <= bound  # an upper bound, not a wild one


def test_a_request_too_large_for_the_budget_is_refused(setup):
    model, tokenizer, prompts = setup
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**20)
    with pytest.raises(OptionError, match="more than kv_budget"):
        scheduler.submit(prompts[0], 300)
    assert not scheduler.has_work


def test_a_long_decode_keeps_no_finished_pass_alive(setup):
    """Each pass's decisions (and through them its logits: [rows, vocab] a step, 16 MB at batch
    16 on a 262k vocabulary) are let go once read: the number of live `Choice`s stays bounded by
    the batch, not by the steps run. (Feeds once held their queued choice, and every choice its
    feed: a chain through every pass.)"""
    model, tokenizer, prompts = setup
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**40)
    for p in prompts[:4]:
        scheduler.submit(p[:40], 24)
    live = []
    while scheduler.has_work:
        scheduler.step()
        gc.collect()
        live.append(sum(type(o) is Choice for o in gc.get_objects()))
    assert len(live) > 20 and max(live) <= 3 * 4, live
