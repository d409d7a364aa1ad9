"""Speculative decoding on the real Gemma 3 270M: acceptance and end-to-end decode speed-up.

Same run, same held-out prompts, greedy, for each configuration:
- plain decoding (`gemma_mlx.generate.generate_tokens`, the production loop) — the baseline;
- the trained MTP drafter (`benchmarks.train_drafter`) with fixed draft lengths and "auto";
- prompt lookup ("auto");
- a perfect free drafter (an oracle that proposes plain decoding's own tokens): the upper bound,
  which shows what the loop itself costs and what a verify step buys on this machine;
- the target drafting for itself (perfect but as expensive as the target): drafting cost.

Decode speed excludes the prompt (time from the first token to the last). Each speculative run is
timed right after a plain run of the same prompt, so that a shared machine's changing load hits
both alike; the speed-up is the ratio of their summed times. Every speculative run is checked
token for token against plain decoding.

    python -m benchmarks.speculative [--drafter benchmarks/out/drafter-270m] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX is imported)

# isort: split
import mlx.core as mx

from benchmarks.train_drafter import EVAL_PROMPTS, PROMPTS, load_target
from gemma_mlx.decode import generate_tokens
from gemma_mlx.drafters import AssistantDrafter, ModelDrafter, PromptLookupDrafter
from gemma_mlx.loading import load_model
from gemma_mlx.sample import greedy
from gemma_mlx.speculative import (
    DraftContext,
    Proposal,
    SpeculationStats,
    speculative_tokens,
)


class OracleDrafter:
    """Proposes the tokens plain decoding produced: always right, free to run."""

    def __init__(self, prompt_length: int, continuation: list[int]):
        self.prompt_length = prompt_length
        self.continuation = continuation

    def prefill(self, context: DraftContext) -> None:
        pass

    def propose(self, context: DraftContext, k: int) -> Proposal:
        done = len(context.tokens) - self.prompt_length
        return Proposal(mx.array(self.continuation[done : done + k], mx.int32))

    def commit(self, context: DraftContext, k: int, accepted: int) -> None:
        pass


def timed(steps) -> tuple[list[int], float]:
    """Tokens of a `TokenStep` generator and the seconds from its first token to its last."""
    tokens, start = [], None
    for step in steps:
        tokens.append(step.token)
        if start is None:
            start = time.perf_counter()
    return tokens, time.perf_counter() - start


def long_context_check(target, tokenizer, assistant, tokens: int) -> None:
    """A prompt past the 512-token sliding window: drafted greedy output equals plain greedy."""
    text = "\n".join(PROMPTS)
    prompt = tokenizer.encode((text + "\n") * 3 + EVAL_PROMPTS[0])
    window = target.args.sliding_window
    print(f"\nlong prompt: {len(prompt)} tokens (window {window}), {tokens} generated")
    for name, drafter in (
        ("prompt lookup, auto", PromptLookupDrafter()),
        ("MTP drafter, auto", AssistantDrafter(assistant, target)),
    ):
        plain, plain_seconds = plain_run(target, prompt, tokens)
        stats = SpeculationStats()
        got, seconds = timed(
            speculative_tokens(
                target, prompt, target.make_cache(), drafter, max_tokens=tokens, stats=stats
            )
        )
        print(
            f"{name}: acceptance {stats.acceptance_rate:.1%}, {stats.accepted_per_verify:.2f} per "
            f"verify, plain {(len(plain) - 1) / plain_seconds:.2f} tok/s, drafted "
            f"{(len(got) - 1) / seconds:.2f} tok/s ({plain_seconds / seconds:.2f}x), "
            f"equal to plain: {'yes' if got == plain else 'NO'}"
        )


def plain_run(target, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    return timed(generate_tokens(target, prompt, target.make_cache(), greedy, max_tokens=tokens))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", type=Path, default=Path("benchmarks/out/drafter-270m"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3)
    args = parser.parse_args(argv)

    target, tokenizer = load_target()
    assistant = load_model(args.drafter)
    prompts = [tokenizer.encode(p) for p in EVAL_PROMPTS[: args.prompts]]
    plain = [plain_run(target, prompt, args.tokens)[0] for prompt in prompts]
    decoded = sum(len(t) - 1 for t in plain)

    configs = [(f"MTP drafter, k={k}", "mtp", k) for k in (1, 2, 3)]
    configs += [
        ("MTP drafter, auto", "mtp", "auto"),
        ("prompt lookup, auto", "lookup", "auto"),
        ("perfect free drafter (oracle), k=3", "oracle", 3),
        ("perfect free drafter (oracle), k=6", "oracle", 6),
        ("perfect free drafter (oracle), auto", "oracle", "auto"),
        ("target drafting for itself, k=3", "self", 3),
    ]
    print(f"{len(prompts)} prompts, {args.tokens} tokens each; each speculative run is timed right "
          "after a plain run of the same prompt (the speed-up is their ratio)")  # fmt: skip
    print(
        "| drafter | acceptance | accepted per verify | plain tok/s | drafted tok/s | speed-up "
        "| equal to plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, kind, k in configs:
        stats, seconds, plain_seconds, equal = SpeculationStats(), 0.0, 0.0, True
        for prompt, expected in zip(prompts, plain, strict=True):
            drafter = {
                "mtp": lambda: AssistantDrafter(assistant, target),
                "lookup": PromptLookupDrafter,
                "oracle": lambda p=prompt, e=expected: OracleDrafter(len(p), e),
                "self": lambda: ModelDrafter(target),
            }[kind]()
            plain_seconds += plain_run(target, prompt, args.tokens)[1]
            steps = speculative_tokens(
                target, prompt, target.make_cache(), drafter, num_draft=k,
                max_tokens=args.tokens, stats=stats,
            )  # fmt: skip
            tokens, took = timed(steps)
            seconds += took
            equal &= tokens == expected
        print(
            f"| {name} | {stats.acceptance_rate:.1%} | {stats.accepted_per_verify:.2f} "
            f"| {decoded / plain_seconds:.2f} | {decoded / seconds:.2f} "
            f"| {plain_seconds / seconds:.2f}x | {'yes' if equal else 'NO'} |",
            flush=True,
        )
    long_context_check(target, tokenizer, assistant, 128)


if __name__ == "__main__":
    main()
