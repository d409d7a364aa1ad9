"""Per-request options in a batch: seeds, samplers, logits processors, stop strings.

- A seeded request samples exactly the tokens it samples alone, whatever runs beside it (its own
  random key), plain and with speculative decoding at a fixed draft length; plain, it equals
  `stream_generate` with the same options.
- Rejection sampling in the shared verify keeps the target's distribution: 300 requests in one
  batch, each forced to the same first token, then verifying one fixed draft: the second token
  follows the target's tempered distribution (chi-square), and the draft is kept as often as
  the target gives it.
- Logit bias, repetition penalty and stop strings act per request, as `gemma_mlx.generate`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from batch_helpers import byte_tokenizer, random_prompts, solo_tokens
from speculative_helpers import random_target
from test_speculative_sampling import chi_square_p_value

from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.drafters import PromptLookupDrafter
from gemma_mlx.generate import generate
from gemma_mlx.speculative import Proposal

VOCAB = 512
SAMPLING = {"temp": 0.8, "top_p": 0.95, "top_k": 40}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("bytes"), VOCAB)


@pytest.fixture(scope="module")
def model():
    return random_target("e2b", window=16)


def run(scheduler, requests):
    """Submit (prompt, max_tokens, options) requests at once; their tokens in order."""
    uids = [scheduler.submit(p, m, **o) for p, m, o in requests]
    tokens = {uid: [] for uid in uids}
    for uid, response in scheduler.run():
        tokens[uid].append(response.token)
    return [tokens[u] for u in uids]


def companions(n: int) -> list:
    prompts = random_prompts(n, (3, 40), VOCAB, seed=7)
    options = [{}, {"temp": 1.0, "seed": 99}, {"temp": 0.5}, {"temp": 1.2, "top_k": 5}]
    return [(p, 10 + 3 * i, options[i % len(options)]) for i, p in enumerate(prompts)]


def test_seeded_sampling_does_not_depend_on_the_batch(model, tokenizer):
    prompt = random_prompts(1, (30, 30), VOCAB, seed=3)[0]
    request = (prompt, 24, {**SAMPLING, "seed": 1234})
    alone = solo_tokens(model, tokenizer, prompt, 24, **SAMPLING, seed=1234)
    for n_companions in (0, 3, 9):
        scheduler = BatchScheduler(model, tokenizer, prefill_step_size=16, kv_budget=2**30)
        got = run(scheduler, [*companions(n_companions)[: n_companions // 2], request,
                              *companions(n_companions)[n_companions // 2 :]])  # fmt: skip
        assert got[n_companions // 2] == alone
    # Another seed samples other tokens: the seed is what fixes them.
    other = solo_tokens(model, tokenizer, prompt, 24, **SAMPLING, seed=4321)
    assert other != alone


def test_seeded_speculative_sampling_does_not_depend_on_the_batch(model, tokenizer):
    """At a fixed draft length a sequence's random draws depend only on its own tokens."""
    prompt = random_prompts(1, (12, 12), VOCAB, seed=4)[0] * 4
    request = (prompt, 30, {"temp": 0.3, "seed": 77})
    results = []
    for n_companions in (0, 5):
        scheduler = BatchScheduler(
            model, tokenizer, prefill_step_size=16, kv_budget=2**30, draft="prompt-lookup",
            num_draft=3,
        )  # fmt: skip
        got = run(scheduler, [request, *companions(n_companions)])
        results.append(got[0])
    assert results[0] == results[1]


class FixedDraft:
    """Always proposes `token` (a one-hot draft distribution)."""

    def __init__(self, token: int):
        self.token = token

    def prefill(self, context) -> None:
        pass

    def propose(self, context, k: int) -> Proposal:
        return Proposal(mx.array([self.token] * k, dtype=mx.int32))

    def commit(self, context, k: int, accepted: int) -> None:
        pass


def test_batched_rejection_sampling_keeps_the_target_distribution(model, tokenizer):
    prompt = random_prompts(1, (10, 10), VOCAB, seed=5)[0]
    forced, temp, runs = 300, 0.7, 300

    def force_first(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == len(prompt):  # the first generated position only
            return mx.where(mx.arange(logits.shape[-1]) == forced, 0.0, -mx.inf)[None]
        return logits

    logits = model(mx.array([[*prompt, forced]]))[0, -1]
    p = np.array(mx.softmax(logits.astype(mx.float32) / temp))
    draft = int(np.argsort(p)[-2])  # the second most likely: kept often, rejected often
    scheduler = BatchScheduler(
        model, tokenizer, kv_budget=2**30, max_batch=runs, draft=lambda _ids: FixedDraft(draft),
        num_draft=1,
    )  # fmt: skip
    requests = [(prompt, 2, {"temp": temp, "seed": s, "logits_processors": [force_first]})
                for s in range(runs)]  # fmt: skip
    got = run(scheduler, requests)
    assert all(t[0] == forced for t in got)
    second = np.array([t[1] for t in got])
    assert abs((second == draft).mean() - p[draft]) < 4 * np.sqrt(p[draft] * (1 - p[draft]) / runs)
    # Chi-square over the likely tokens (the rest pooled), so every expected count is >= 5.
    likely = np.flatnonzero(p * runs >= 5)
    counts = np.array([*(np.sum(second == t) for t in likely), np.sum(~np.isin(second, likely))])
    probs = np.array([*p[likely], 1 - p[likely].sum()])
    assert chi_square_p_value(counts, probs) > 1e-3


def test_logits_processors_and_stop_strings_per_request(model, tokenizer):
    prompts = random_prompts(4, (5, 30), VOCAB, seed=8)
    greedy_first = [solo_tokens(model, tokenizer, p, 1)[0] for p in prompts]
    options = [
        {"logit_bias": {greedy_first[0]: -1e9}},
        {"repetition_penalty": 1.5, "repetition_context_size": 8},
        {"stop": [tokenizer.decode(solo_tokens(model, tokenizer, prompts[2], 6)[3:5])]},
        {},
    ]
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=16, kv_budget=2**30)
    uids = [scheduler.submit(p, 20, **o) for p, o in zip(prompts, options, strict=True)]
    texts = {uid: "" for uid in uids}
    reasons = {}
    for uid, response in scheduler.run():
        texts[uid] += response.text
        reasons[uid] = response.finish_reason
    for uid, prompt, o in zip(uids, prompts, options, strict=True):
        assert texts[uid] == generate(model, tokenizer, prompt, max_tokens=20, **o)
    assert reasons[uids[2]] == "stop"
    assert solo_tokens(model, tokenizer, prompts[0], 1, **options[0])[0] != greedy_first[0]


def test_prompt_lookup_drafter_is_one_per_request(model, tokenizer):
    """Each request indexes its own tokens: two requests with different repeated texts both
    draft from their own history."""
    made = []

    def factory(ids):
        made.append(PromptLookupDrafter())
        return made[-1]

    a, b = (random_prompts(1, (8, 8), VOCAB, seed=s)[0] * 5 for s in (10, 11))
    scheduler = BatchScheduler(model, tokenizer, kv_budget=2**30, draft=factory, num_draft=4)
    got = run(scheduler, [(a, 12, {}), (b, 12, {})])
    assert len(made) == 2
    assert got == [solo_tokens(model, tokenizer, a, 12), solo_tokens(model, tokenizer, b, 12)]
