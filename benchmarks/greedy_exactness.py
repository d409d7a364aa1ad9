"""Greedy exactness of speculative decoding in half precision: does drafted greedy output equal
plain greedy output token for token, and where would a difference come from?

A verify pass computes k + 1 rows in one forward pass where plain decoding computes one. If an
operation's arithmetic for a row depends on how many rows are computed with it (a BLAS kernel
chosen by row count, a tiled matmul, attention over a padded key block), a verify row's logits
differ from the plain step's in the last bits, and at a near-tie the argmax flips. Two parts:

1. Sequences. Per target and dtype, prompts x tokens of plain greedy decoding (the production
   loop, `generate_tokens`) against speculative greedy decoding with
   - MTP-style drafts: plain greedy's own continuation (a well-trained drafter at its best),
     k = 6, with one draft replaced in a third of the rounds, so windows of 7 rows are accepted
     whole, in part or not at all and the caches trimmed by every amount;
   - prompt lookup, k = 4.
   Reported: sequences that diverge, the first divergence step and plain decoding's top-2 logit
   margin there, and the steps whose log-probabilities are not bitwise plain decoding's.
2. Operations, at the target's own shapes: each computed for k + 1 rows at once against one row
   at a time (dense matmul, 4-bit affine matmul as a QAT checkpoint has on a Mac, attention with a
   causal block of queries against one query) and the whole forward pass (a verify window against
   single steps on the same cache). Bitwise, so "0" means identical arithmetic.

Targets: tiny random Gemma 4 (the structure of a released size at hidden 64, the real 262,144-token
vocabulary, MLX's default initialization: flat rows, top probability ~2e-4, many near-ties: the
hard case) and the built-in Gemma 3 270M (bfloat16 on the CPU is slow: a smaller sample).

    python -m benchmarks.greedy_exactness                     # the default grid (hours on 2 cores)
    python -m benchmarks.greedy_exactness --runs 31b:bfloat16:2x32,builtin:float32:1x16
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchLinear

from benchmarks.configs import tiny_config
from benchmarks.machine import describe
from benchmarks.speculative import OracleDrafter
from benchmarks.train_drafter import EVAL_PROMPTS, PROMPTS
from gemma_mlx.decode import generate_tokens
from gemma_mlx.drafters import PromptLookupDrafter
from gemma_mlx.models import get_model_classes
from gemma_mlx.sample import greedy
from gemma_mlx.speculative import DraftContext, Proposal, SpeculationStats, speculative_tokens

VOCAB = 262_144
BUILTIN = "builtin"
# target:dtype[:prompts x tokens]; without a size, --prompts x --tokens.
DEFAULT_RUNS = (
    "31b:bfloat16,e2b:bfloat16:10x256,26b-a4b:bfloat16:10x256,31b:float32,builtin:bfloat16:6x128,"
    "31b:float16:10x128"
)
DTYPES = ("bfloat16", "float16", "float32")
MTP_DRAFTS, LOOKUP_DRAFTS = 6, 4
CORRUPTED_ROUNDS = 1 / 3


# --- targets --------------------------------------------------------------------------------


def tiny_target(size: str, dtype: str, seed: int = 0) -> nn.Module:
    """A random Gemma 4 with the structure of `size` at hidden 64 and the real vocabulary, in
    `dtype`. MoE experts are 4-bit, as a QAT checkpoint keeps them (MLX's CPU `gather_mm` has no
    half-precision kernel; `gather_qmm` has)."""
    config = tiny_config(size) | {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128}
    if config["hidden_size_per_layer_input"]:
        config["vocab_size_per_layer_input"] = VOCAB
    if config["enable_moe_block"]:
        config["moe_intermediate_size"] = 32
    model_class, args_class = get_model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    wanted = getattr(mx, dtype)
    model.update(tree_map(lambda w: w.astype(wanted), model.parameters()))
    nn.quantize(model, 32, 4, class_predicate=lambda _, m: isinstance(m, SwitchLinear))
    mx.eval(model.parameters())
    return model


def load_target(name: str, dtype: str, prompts: int) -> tuple[nn.Module, list[list[int]]]:
    """(model, prompt token ids): random token prompts for a tiny target, text for the 270M."""
    if name == BUILTIN:
        from gemma_mlx.hub import load

        model, tokenizer = load(None, dtype=dtype)
        texts = [*EVAL_PROMPTS, *PROMPTS][:prompts]
        return model, [tokenizer.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    return tiny_target(name, dtype), [rng.integers(1, VOCAB, 32).tolist() for _ in range(prompts)]


# --- part 1: sequences ------------------------------------------------------------------------


class CorruptedOracle(OracleDrafter):
    """MTP-style drafts: plain greedy's continuation, one draft replaced in some rounds."""

    def __init__(self, prompt_length: int, continuation: list[int], seed: int):
        super().__init__(prompt_length, continuation)
        self.rng = np.random.default_rng(seed)

    def propose(self, context: DraftContext, k: int) -> Proposal:
        drafts = super().propose(context, k).tokens.tolist()
        if drafts and self.rng.random() < CORRUPTED_ROUNDS:
            i = int(self.rng.integers(len(drafts)))
            drafts[i] = (drafts[i] + 1) % VOCAB
        return Proposal(mx.array(drafts, mx.int32))


@dataclass
class Plain:
    tokens: list[int]
    logprobs: list[mx.array]
    margins: np.ndarray  # top-2 log-probability (= logit) gap per step


def plain_run(model: nn.Module, prompt: list[int], tokens: int) -> Plain:
    steps = list(generate_tokens(model, prompt, model.make_cache(), greedy, max_tokens=tokens))
    logprobs = [s.logprobs for s in steps]
    top2 = mx.topk(mx.stack(logprobs).astype(mx.float32), 2, axis=-1)
    margins = np.array(mx.abs(top2[:, 1] - top2[:, 0]))
    return Plain([s.token for s in steps], logprobs, margins)


@dataclass
class Tally:
    """One drafter's results over all prompts of a target and dtype."""

    sequences: int = 0
    divergences: list[tuple[int, int, float]] = field(default_factory=list)  # prompt, step, margin
    compared: int = 0  # steps compared (up to the first divergence)
    inexact: int = 0  # of those, steps whose log-probabilities differ from plain's
    max_diff: float = 0.0
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    seconds: float = 0.0


def drafted_run(
    model: nn.Module, prompt: list[int], plain: Plain, drafter, k: int, index: int, tally: Tally
) -> None:
    """Speculative greedy decoding of `prompt`, compared step by step with `plain`."""
    start = time.perf_counter()
    steps = speculative_tokens(
        model, prompt, model.make_cache(max_trim=8), drafter, num_draft=k,
        max_tokens=len(plain.tokens), stats=tally.stats,
    )  # fmt: skip
    tally.sequences += 1
    for i, step in enumerate(steps):
        tally.compared += 1
        if not mx.array_equal(step.logprobs, plain.logprobs[i]).item():
            tally.inexact += 1
            diff = mx.abs(step.logprobs.astype(mx.float32) - plain.logprobs[i].astype(mx.float32))
            tally.max_diff = max(tally.max_diff, mx.max(diff).item())
        if step.token != plain.tokens[i]:
            tally.divergences.append((index, i, float(plain.margins[i])))
            steps.close()
            break
    tally.seconds += time.perf_counter() - start


# --- part 2: operations -----------------------------------------------------------------------


@dataclass
class RowCheck:
    """Elements of k + 1 rows computed together that differ from the same rows computed alone."""

    differing: int = 0
    total: int = 0
    max_diff: float = 0.0

    def add(self, together: mx.array, alone: mx.array) -> None:
        diff = mx.abs(together.astype(mx.float32) - alone.astype(mx.float32))
        self.differing += int((diff > 0).sum().item())
        self.total += diff.size
        self.max_diff = max(self.max_diff, mx.max(diff).item())

    def __str__(self) -> str:
        if not self.differing:
            return "identical"
        return f"{self.differing / self.total:.1%} differ, max {self.max_diff:.1e}"


def weight_matrices(model: nn.Module) -> list[mx.array]:
    """One dense weight per distinct [out, in] shape: linears and the (tied) output head."""
    by_shape = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or path.endswith("embed_tokens"):
            by_shape.setdefault(tuple(module.weight.shape), module.weight)
    return list(by_shape.values())


def check_matmuls(model: nn.Module, rows: int, dtype: mx.Dtype) -> tuple[RowCheck, RowCheck]:
    """(dense, 4-bit) matmuls: `rows` activation rows at once against one at a time. The 4-bit
    check leaves out the vocabulary-wide head (MLX's CPU 4-bit half-precision kernel needs
    seconds per row at 262,144 x H)."""
    dense, quantized = RowCheck(), RowCheck()
    for weight in weight_matrices(model):
        x = mx.random.normal((rows, weight.shape[1]), key=mx.random.key(1)).astype(dtype)
        dense.add(x @ weight.T, mx.concatenate([x[i : i + 1] @ weight.T for i in range(rows)]))
        if weight.shape[0] == VOCAB or weight.shape[1] % 32:
            continue
        w, scales, biases = mx.quantize(weight.astype(mx.float32), 32, 4)
        scales, biases = scales.astype(dtype), biases.astype(dtype)

        def product(a: mx.array) -> mx.array:
            return mx.quantized_matmul(a, w, scales, biases, group_size=32, bits=4)  # noqa: B023

        quantized.add(product(x), mx.concatenate([product(x[i : i + 1]) for i in range(rows)]))
    return dense, quantized


def check_attention(model: nn.Module, rows: int, dtype: mx.Dtype, context: int) -> RowCheck:
    """Attention of a causal block of `rows` queries against each query alone over its keys."""
    check = RowCheck()
    args = model.args
    for layer in {0, len(model.layers) - 1}:
        attention = model.layers[layer].self_attn
        heads, kv_heads, dim = attention.n_heads, args.n_kv_heads(layer), attention.head_dim
        keys = mx.random.split(mx.random.key(2), 3)
        q = mx.random.normal((1, heads, rows, dim), key=keys[0]).astype(dtype)
        k = mx.random.normal((1, kv_heads, context + rows, dim), key=keys[1]).astype(dtype)
        v = mx.random.normal((1, kv_heads, context + rows, dim), key=keys[2]).astype(dtype)
        sdpa = mx.fast.scaled_dot_product_attention
        together = sdpa(q, k, v, scale=attention.scale, mask="causal")
        alone = [
            sdpa(q[:, :, i : i + 1], k[:, :, : context + i + 1], v[:, :, : context + i + 1],
                 scale=attention.scale, mask=None)
            for i in range(rows)
        ]  # fmt: skip
        check.add(together, mx.concatenate(alone, axis=2))
    return check


def check_forward(model: nn.Module, prompt: list[int], rows: int) -> RowCheck:
    """Logits of a verify window (one pass over `rows` tokens) against `rows` single steps."""
    check = RowCheck()
    cache = model.make_cache(max_trim=rows)
    model(mx.array([prompt[:-1]]), cache)
    window = [prompt[-1]] + [int(t) for t in np.random.default_rng(3).integers(1, VOCAB, rows - 1)]
    together = model(mx.array([window]), cache)[0]
    for c in cache:
        c.trim(rows)
    alone = [model(mx.array([[t]]), cache)[0] for t in window]
    check.add(together, mx.concatenate(alone))
    return check


# --- the report -------------------------------------------------------------------------------


@dataclass
class Section:
    target: str
    dtype: str
    prompts: int
    tokens: int
    tallies: dict[str, Tally]
    plain_seconds: float
    min_margin: float
    ties: int  # plain steps whose top two log-probabilities are equal
    ops: dict[str, RowCheck]

    def rows(self) -> list[str]:
        out = []
        for name, t in self.tallies.items():
            diverged = ", ".join(f"p{p} step {s} (margin {m:.2g})" for p, s, m in t.divergences)
            windows = t.stats.accepted_per_verify + 1
            out.append(
                f"| {self.target} | {self.dtype} | {name} | {len(t.divergences)} of {t.sequences} "
                f"| {diverged or '-'} | {t.inexact} of {t.compared}"
                f"{f' (max {t.max_diff:.1e})' if t.inexact else ''} "
                f"| {t.stats.verify_steps} ({t.stats.acceptance_rate:.0%}, {windows:.1f}) |"
            )
        return out


def render(sections: list[Section], command: str, machine: str) -> str:
    lines = [
        f"# Greedy exactness of speculative decoding: {machine}",
        "",
        f"`{command}` (MLX {mx.__version__}, {mx.default_device()}). Plain greedy decoding "
        "(`generate_tokens`) against speculative greedy decoding of the same prompts; "
        f"MTP-style = plain greedy's own continuation as drafts, k = {MTP_DRAFTS}, one draft "
        f"replaced in {CORRUPTED_ROUNDS:.0%} of the rounds; prompt lookup k = {LOOKUP_DRAFTS}. "
        "Inexact steps: steps (up to the first divergence) whose log-probabilities are not "
        "bitwise plain decoding's.",
        "",
        "| target | dtype | drafts | divergent sequences | first divergence (plain's top-2 "
        "margin there) | inexact steps | verify passes (acceptance, tokens per pass) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sections:
        lines += s.rows()
    lines += [
        "",
        "Near-ties met on the way (plain decoding's top-2 logit margin):",
        "",
        "| target | dtype | prompts x tokens | smallest margin | exact ties (lower id wins) "
        "| plain s/token |",
        "|---|---|---|---|---|---|",
    ]
    for s in sections:
        per_token = s.plain_seconds / (s.prompts * s.tokens)
        lines.append(
            f"| {s.target} | {s.dtype} | {s.prompts} x {s.tokens} | {s.min_margin:.2g} "
            f"| {s.ties} | {per_token:.3f} |"
        )
    names = list(sections[0].ops) if sections else []
    lines += [
        "",
        f"Operations, {MTP_DRAFTS + 1} rows at once against one row at a time, at each target's "
        "shapes (bitwise):",
        "",
        "| target | dtype | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for s in sections:
        lines.append(
            f"| {s.target} | {s.dtype} | " + " | ".join(str(s.ops[n]) for n in names) + " |"
        )
    return "\n".join(lines) + "\n"


def measure(target: str, dtype: str, prompts: int, tokens: int) -> Section:
    model, prompt_ids = load_target(target, dtype, prompts)
    rows, wanted = MTP_DRAFTS + 1, getattr(mx, dtype)
    dense, quantized = check_matmuls(model, rows, wanted)
    ops = {
        "dense matmul": dense,
        "4-bit matmul": quantized,
        "attention": check_attention(model, rows, wanted, context=300),
        "whole forward pass": check_forward(model, prompt_ids[0], rows),
    }
    tallies = {"MTP-style": Tally(), "prompt lookup": Tally()}
    plain_seconds, margins = 0.0, []
    for index, prompt in enumerate(prompt_ids):
        start = time.perf_counter()
        plain = plain_run(model, prompt, tokens)
        plain_seconds += time.perf_counter() - start
        margins.append(plain.margins)
        oracle = CorruptedOracle(len(prompt), plain.tokens, seed=index)
        drafted_run(model, prompt, plain, oracle, MTP_DRAFTS, index, tallies["MTP-style"])
        lookup = PromptLookupDrafter()
        drafted_run(model, prompt, plain, lookup, LOOKUP_DRAFTS, index, tallies["prompt lookup"])
        print(
            f"  {target} {dtype} prompt {index}: "
            + ", ".join(f"{n} {len(t.divergences)} diverged" for n, t in tallies.items()),
            flush=True,
        )
    every = np.concatenate(margins)
    return Section(
        target, dtype, prompts, tokens, tallies, plain_seconds, float(every.min()),
        int((every == 0).sum()), ops,
    )  # fmt: skip


def parse_run(
    text: str, prompts: int, tokens: int, parser: argparse.ArgumentParser
) -> tuple[str, str, int, int]:
    """`target:dtype[:PxT]` -> (target, dtype, prompts, tokens)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in DTYPES:
        parser.error(f"--runs: expected target:dtype[:PxT] with a float dtype, got {text!r}")
    if len(parts) == 3:
        try:
            prompts, tokens = (int(n) for n in parts[2].split("x"))
        except ValueError:
            parser.error(f"--runs: expected prompts x tokens such as 10x256, got {parts[2]!r}")
    return parts[0], parts[1], prompts, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="target:dtype[:PxT],... (target: "
                        "a tiny size such as 31b, e2b, 26b-a4b, or 'builtin' for the 270M; PxT: "
                        "prompts x tokens of that run)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/greedy-exactness-"
                        "<machine>.md")  # fmt: skip
    args = parser.parse_args(argv)
    runs = [parse_run(run, args.prompts, args.tokens, parser) for run in args.runs.split(",")]
    machine = describe(measure_bandwidth=False).label
    out = args.out or Path("benchmarks/results") / f"greedy-exactness-{machine}.md"
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.greedy_exactness", *given])
    sections = []
    for target, dtype, prompts, tokens in runs:
        print(f"{target} in {dtype}: {prompts} prompts x {tokens} tokens", flush=True)
        sections.append(measure(target, dtype, prompts, tokens))
        out.write_text(render(sections, command, machine))  # after each run: partial
    print(out.read_text())


if __name__ == "__main__":
    main()
