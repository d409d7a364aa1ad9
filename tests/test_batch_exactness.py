"""Greedy continuous batching gives every request exactly its tokens alone (float32, CPU).

Tiny random targets with a 16-token sliding window: dense (31B-like), E-style (E2B-like: PLE and
KV sharing) and MoE (26B-A4B-like), Gemma 3. Prompts of 1-60 tokens (most past the window),
prefilled in 16-token chunks interleaved with the others' decoding; requests join at different
steps, leave at different steps (their own max_tokens, the end-of-turn token, a cancel), and run
with and without speculative decoding (prompt lookup; an assistant whose drafts are partly right,
so rounds keep every number of drafts; a perturbed copy of the target as draft model). The
reference is each request alone through `stream_generate`.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from batch_helpers import byte_tokenizer, first_difference, random_prompts, solo_tokens
from speculative_helpers import PartlyRightDrafter, noisy_copy, random_assistant, random_target

from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.drafters import AssistantDrafter
from gemma_mlx.errors import GemmaMLXError, OptionError, OptionTypeError

WINDOW = 16
CHUNK = 16
VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return byte_tokenizer(tmp_path_factory.mktemp("bytes"), VOCAB)


@pytest.fixture(scope="module", params=["31b", "e2b", "26b-a4b", "gemma3"])
def case(request, tokenizer):
    """(model, prompts, max_tokens, solo references) for one variant."""
    model = random_target(request.param, window=WINDOW)
    prompts = random_prompts(10, (1, 60), VOCAB, seed=1)
    prompts[3] = prompts[3][:12] * 4  # repetitive: prompt lookup finds its drafts
    limits = [6 + 2 * i for i in range(len(prompts))]
    references = [solo_tokens(model, tokenizer, p, m) for p, m in zip(prompts, limits, strict=True)]
    return model, prompts, limits, references


def run_staggered(scheduler, prompts, limits, cancel_at=None):
    """Submit the first two thirds, the rest two and five steps later; cancel request
    `cancel_at` after 20 steps. Returns each request's tokens, and how many came from drafts."""
    n = len(prompts)
    waves = {0: range(0, 2 * n // 3), 2: range(2 * n // 3, n - 2), 5: range(n - 2, n)}
    uids: dict[int, int] = {}
    tokens: dict[int, list[int]] = {}
    drafted = step = 0
    while step <= max(waves) or scheduler.has_work:
        for i in waves.get(step, ()):
            uids[i] = scheduler.submit(prompts[i], limits[i])
            tokens[uids[i]] = []
        if step == 20 and cancel_at is not None:
            scheduler.cancel(uids[cancel_at])
        for uid, response in scheduler.step():
            tokens[uid].append(response.token)
            drafted += response.from_draft
        step += 1
    return [tokens[uids[i]] for i in range(n)], drafted


def assert_each_equals_solo(got, references, cancelled=None):
    for i, (tokens, expected) in enumerate(zip(got, references, strict=True)):
        if i == cancelled:
            assert tokens == expected[: len(tokens)] and 0 < len(tokens) < len(expected)
            continue
        first = first_difference(tokens, expected)
        assert first is None, f"request {i} diverged at token {first}: {tokens} != {expected}"


def test_plain_batch_equals_each_alone(case, tokenizer):
    model, prompts, limits, references = case
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30)
    got, drafted = run_staggered(scheduler, prompts, limits, cancel_at=5)
    assert drafted == 0
    assert_each_equals_solo(got, references, cancelled=5)
    assert not scheduler.active and not scheduler.waiting


def test_prompt_lookup_batch_equals_each_alone(case, tokenizer):
    model, prompts, limits, references = case
    scheduler = BatchScheduler(
        model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30, draft="prompt-lookup"
    )
    got, drafted = run_staggered(scheduler, prompts, limits)
    assert_each_equals_solo(got, references)
    assert drafted > 0


@pytest.mark.parametrize("case", ["e2b", "26b-a4b"], indirect=True)
def test_partly_right_assistant_batch_equals_each_alone(case, tokenizer):
    """Every round keeps a different number of drafts per sequence (0..k), so each sequence's
    caches are trimmed by its own amount after the shared verify."""
    model, prompts, limits, references = case
    assistant = random_assistant(model)
    drafters = []

    def drafter_for(ids):
        reference = references[prompts.index(ids)]
        drafters.append(PartlyRightDrafter(AssistantDrafter(assistant, model), len(ids), reference))
        return drafters[-1]

    scheduler = BatchScheduler(
        model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30, draft=drafter_for,
        num_draft=4,
    )  # fmt: skip
    got, drafted = run_staggered(scheduler, prompts, limits)
    assert_each_equals_solo(got, references)
    assert drafted > 0
    assert sum(d.right for d in drafters) > 0


@pytest.mark.parametrize("case", ["31b"], indirect=True)
def test_draft_model_batch_equals_each_alone(case, tokenizer):
    model, prompts, limits, references = case
    scheduler = BatchScheduler(
        model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30,
        draft=noisy_copy(model, 0.05), num_draft="auto",
    )  # fmt: skip
    got, drafted = run_staggered(scheduler, prompts, limits)
    assert_each_equals_solo(got, references)
    assert drafted > 0


@pytest.mark.parametrize(
    "case, size",
    [("31b", 1), ("31b", 2), ("31b", 5), ("31b", 16), ("e2b", 16), ("26b-a4b", 16)],
    indirect=["case"],
)
def test_batch_sizes(case, tokenizer, size):
    """Batches of 1 to 16 requests (16: the 10 prompts and 6 of them again), all at once; 16
    rows cross from the few-row kernel into sgemm."""
    model, prompts, limits, references = case
    order = [i % len(prompts) for i in range(size)]
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30)
    uids = [scheduler.submit(prompts[i], limits[i]) for i in order]
    tokens = {uid: [] for uid in uids}
    for uid, response in scheduler.run():
        tokens[uid].append(response.token)
    assert_each_equals_solo([tokens[u] for u in uids], [references[i] for i in order])


@pytest.mark.parametrize("variant", ["e2b", "gemma3"])
def test_same_length_prompts_attend_stacked_and_each_gets_its_tokens(variant, tokenizer):
    """Different prompts of one length (some past the window) decode in step: their attention
    runs stacked, one call per layer (`RaggedBatch.attention`); leaving at different steps
    changes the stacks. Each still gets its tokens alone."""
    model = random_target(variant, window=WINDOW)
    prompts = random_prompts(6, (20, 20), VOCAB, seed=7) + random_prompts(3, (9, 9), VOCAB, 8)
    limits = [5 + i % 4 for i in range(len(prompts))]
    references = [solo_tokens(model, tokenizer, p, m) for p, m in zip(prompts, limits, strict=True)]
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30)
    uids = [scheduler.submit(p, m) for p, m in zip(prompts, limits, strict=True)]
    tokens = {uid: [] for uid in uids}
    for uid, response in scheduler.run():
        tokens[uid].append(response.token)
    assert_each_equals_solo([tokens[u] for u in uids], references)


@pytest.mark.parametrize("case", ["31b"], indirect=True)
def test_long_prompt_prefills_between_decoding_steps(case, tokenizer):
    """A 200-token prompt arriving while others decode: every step still gives each decoding
    request its token, and no step prefills more than one chunk."""
    model, prompts, _, _ = case
    scheduler = BatchScheduler(model, tokenizer, prefill_step_size=CHUNK, kv_budget=2**30)
    decoding = [scheduler.submit(p, 40) for p in prompts[:3]]
    while any(s.prefilling or not s.produced for s in scheduler.active + list(scheduler.waiting)):
        scheduler.step()
    long_prompt = random_prompts(1, (200, 200), VOCAB, seed=5)[0]
    scheduler.submit(long_prompt, 4)
    prefill_steps = 0
    while any(s.prefilling for s in scheduler.active + list(scheduler.waiting)):
        before = scheduler.counters.prompt_tokens
        out = scheduler.step()
        assert scheduler.counters.prompt_tokens - before <= CHUNK
        prefill_steps += 1
        running = {s.uid for s in scheduler.active} | {uid for uid, r in out if r.finish_reason}
        assert {uid for uid, _ in out} == set(decoding) & running
    assert prefill_steps == -(-199 // CHUNK)


def test_a_model_without_a_batched_pass_is_refused(tokenizer):
    with pytest.raises(OptionTypeError, match="needs a gemma_mlx model"):
        BatchScheduler(object(), tokenizer, kv_budget=2**30)


def test_a_drafter_object_is_refused(tokenizer):
    model = random_target("31b", window=WINDOW)
    assistant = AssistantDrafter(random_assistant(model), model)
    with pytest.raises(OptionError, match="function that makes one per request"):
        BatchScheduler(model, tokenizer, kv_budget=2**30, draft=assistant)


def test_bad_request_fails_at_submit(tokenizer):
    model = random_target("31b", window=WINDOW)
    scheduler = BatchScheduler(model, tokenizer, kv_budget=2**30)
    with pytest.raises(OptionError, match="temperature"):
        scheduler.submit([5, 6, 7], 4, temp=-1.0)
    with pytest.raises(OptionError, match="draft is an option of the batch scheduler"):
        scheduler.submit([5, 6, 7], 4, draft="prompt-lookup")
    with pytest.raises(GemmaMLXError, match="not an id in the vocabulary"):
        scheduler.submit([5, VOCAB + 3], 4)
    assert not scheduler.has_work
    mx.clear_cache()
