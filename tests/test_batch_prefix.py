"""The scheduler's cache hooks with a server's prefix cache: what a batched server would run.

`on_prefilled` and `on_retired` store snapshots into `gemma_mlx.server.prefix_cache.PrefixCache`;
a follow-up request that re-sends the conversation (prompt, reply, a new turn) starts from a
snapshot, prefills only the rest, and gives exactly its output alone, past the sliding window
too. A request cancelled mid-reply leaves a snapshot of what its caches hold.
"""

from __future__ import annotations

from batch_helpers import byte_tokenizer, random_prompts, solo_tokens
from speculative_helpers import random_target

from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.server.prefix_cache import PrefixCache

VOCAB = 512


def test_follow_up_requests_start_from_stored_snapshots(tmp_path):
    tokenizer = byte_tokenizer(tmp_path / "bytes", VOCAB)
    model = random_target("e2b", window=16)
    prefix = PrefixCache(model.make_cache, 2**28)
    stored = []

    def store(uid, tokens, cache):
        held = tokens[: cache[0].offset]
        stored.append((uid, len(held)))
        prefix.store(held, cache)

    scheduler = BatchScheduler(
        model, tokenizer, prefill_step_size=8, kv_budget=2**30, on_prefilled=store,
        on_retired=store,
    )  # fmt: skip
    first = random_prompts(3, (20, 40), VOCAB, seed=3)
    uids = [scheduler.submit(p, 12) for p in first]
    replies = {u: [] for u in uids}
    for n, (uid, response) in enumerate(scheduler.run(), start=1):
        replies[uid].append(response.token)
        if n == 10:
            scheduler.cancel(uids[2])
    # Each request stored its prompt (but the last token) and, leaving, what its caches held:
    # everything but the last token of its 12 (never fed back).
    assert [n for u, n in stored if u == uids[0]] == [len(first[0]) - 1, len(first[0]) + 11]
    assert len(replies[uids[2]]) < 12
    turns = random_prompts(2, (5, 9), VOCAB, seed=4)
    follow = [first[i] + replies[uids[i]] + turns[i] for i in range(2)]
    for prompt in follow:
        cache, cached = prefix.fetch(prompt)
        assert cached >= len(prompt) - len(turns[0]) - 5  # the snapshot of the first turn
        uid = scheduler.submit(prompt, 10, prompt_cache=cache)
        got = [r.token for u, r in scheduler.run() if u == uid]
        assert got == solo_tokens(model, tokenizer, prompt, 10)
