"""Continuous batching: aggregate decode tokens/s at batch 1-16, gemma_mlx against mlx-lm, same run.

    python -m benchmarks.batch [--models builtin,tiny:e2b,...] [--batches 1,2,4,8,16]
                               [--tokens 32] [--repeats 1] [--no-mlx-lm] [--no-speculative]
                               [--out FILE]

For each model and batch size B: B different prompts of the same length, greedy, end of turn
ignored, `--tokens` tokens per sequence. The aggregate speed counts the tokens of the steps after
every sequence has its first token, over those steps' time (prompt processing excluded):
- gemma_mlx: `gemma_mlx.batching.BatchScheduler` (ragged batch, one pass per step).
- mlx-lm: its `BatchGenerator` (what `mlx_lm.batch_generate` runs) on mlx-lm's model class for
  the same config holding exactly our loaded weights (float32 on the CPU), its products as sgemm
  as in mlx-lm's own process.
The two alternate at each batch size, so a shared machine's load hits both alike; with
`--repeats N` they alternate N times and each keeps its fastest run (other processes only ever
slow a run down); the table also gives the median and range of the ratio within each pair of
runs, which a burst of load on a shared machine moves less than the fastest runs. On Linux a
product of 1 row runs as sgemv, of 2-8 rows through our few-row kernel, of more as sgemm
(`gemma_mlx/_blas_route.c`): batch 16 crosses into sgemm.

Speculative (the built-in model, batch 4): prompts that repeat a passage (~600 tokens), plain
batching against prompt lookup with planned draft lengths; the outputs are compared too. The
file ends with the cost model's batch table (`benchmarks.batch_cost`) for the released sizes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from benchmarks.batch_cost import batch_lines
from benchmarks.configs import GEMMA4
from benchmarks.cost_model import batch_weights
from benchmarks.engines import Ours, package_version
from benchmarks.machine import describe
from benchmarks.run import BenchmarkError, model_source, parse_lengths
from gemma_mlx import _platform
from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.outputs import write_file_atomically

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = ("builtin", "tiny:e2b", "tiny:26b-a4b", "tiny:31b")
PROMPT_TOKENS = 32
PASSAGE = (
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total / len(values)\n\nThe function above adds every value of the list, one "
    "after another, and divides the sum by the number of values.\n"
)


@dataclass
class Run:
    tokens: int  # generated after every sequence had its first token
    seconds: float
    peak_gb: float
    outputs: list[list[int]]
    acceptance: float | None = None  # drafts kept / proposed, when drafting

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def prompts_for(vocab: int, batch: int, length: int) -> list[list[int]]:
    """`batch` different random prompts of `length` ids (as mlx_lm.benchmark draws them)."""
    mx.random.seed(batch)
    return mx.random.randint(0, vocab, (batch, length)).tolist()


def timed_steps(
    step: Callable[[], list[tuple[int, int]]], uids: Sequence[int], done: Callable[[], bool]
) -> Run:
    """Run `step` (-> (uid, token) pairs) until `done`; time the steps after all have a token."""
    mx.reset_peak_memory()
    outputs: dict[int, list[int]] = {u: [] for u in uids}
    start, tokens = None, 0
    while not done():
        pairs = step()
        for uid, token in pairs:
            outputs[uid].append(token)
        if start is not None:
            tokens += len(pairs)
        elif all(outputs.values()):
            start = time.perf_counter()
    seconds = time.perf_counter() - start if start is not None else 0.0
    return Run(tokens, seconds, mx.get_peak_memory() / 1e9, [outputs[u] for u in uids])


def run_ours(engine: Ours, prompts: list[list[int]], tokens: int, **options) -> Run:
    scheduler = BatchScheduler(
        engine.model, engine.tokenizer, max_batch=len(prompts), kv_budget=2**36, **options
    )
    uids = [scheduler.submit(p, tokens) for p in prompts]
    drafts = [s.draft.stats for s in scheduler.waiting if s.draft is not None]

    def step() -> list[tuple[int, int]]:
        return [(uid, r.token) for uid, r in scheduler.step()]

    with _platform.few_row_routing_set(engine.few_row_routing):
        run = timed_steps(step, uids, lambda: not scheduler.has_work)
    if drafts:
        run.acceptance = sum(d.accepted for d in drafts) / max(1, sum(d.proposed for d in drafts))
    return run


@dataclass
class MlxLmTwin:
    """mlx-lm's model class for the directory's config, holding exactly our loaded weights (our
    float32 dequantization on the CPU, quantized where our loader keeps them quantized), so the
    two differ only in their implementation whatever format the directory is in; its products
    as sgemm, as in mlx-lm's own process."""

    model: Any
    prefill_step_size: int = 512
    few_row_routing: bool = False

    @classmethod
    def of(cls, ours: Ours, directory: Path) -> MlxLmTwin:
        from mlx_lm.utils import _get_classes, load_config

        config = {
            k: v
            for k, v in load_config(directory).items()
            if k not in ("quantization", "quantization_config")
        }
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        kept = {  # what our loader kept quantized (E2B/E4B's per-layer-embedding table)
            path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
            for path, m in ours.model.named_modules()
            if hasattr(m, "bits") and hasattr(m, "group_size")
        }
        if kept:
            nn.quantize(model, class_predicate=lambda path, _: kept.get(path, False))
        model.update(tree_unflatten(tree_flatten(ours.model.parameters())))
        mx.eval(model.parameters())
        return cls(model)


def run_mlx_lm(engine: MlxLmTwin, prompts: list[list[int]], tokens: int) -> Run:
    from mlx_lm.generate import BatchGenerator

    batch = len(prompts)
    generator = BatchGenerator(
        engine.model, max_tokens=tokens, completion_batch_size=batch, prefill_batch_size=batch,
        prefill_step_size=engine.prefill_step_size,
    )  # fmt: skip
    uids = generator.insert(prompts, [tokens] * batch)
    finished: set[int] = set()

    def step() -> list[tuple[int, int]]:
        responses = generator.next_generated()
        finished.update(r.uid for r in responses if r.finish_reason is not None)
        return [(r.uid, r.token) for r in responses]

    try:
        with _platform.few_row_routing_set(engine.few_row_routing):
            return timed_steps(step, uids, lambda: len(finished) == batch)
    finally:
        generator.close()


@dataclass
class Row:
    """One batch size: each engine's fastest run, and the ratio of every alternating pair."""

    batch: int
    mine: Run
    theirs: Run | None
    pair_ratios: list[float]

    @property
    def ratio(self) -> float | None:
        return self.mine.tps / self.theirs.tps if self.theirs and self.theirs.tps else None


def throughput(
    source_dir: Path, batches: Sequence[int], tokens: int, with_mlx_lm: bool, repeats: int = 1
) -> Iterator[Row]:
    ours = Ours(source_dir, prefill_step_size=512)
    ours.tokenizer = replace(ours.tokenizer, eos_token_ids=frozenset())  # never stop early
    peer = MlxLmTwin.of(ours, source_dir) if with_mlx_lm else None
    vocab = ours.model.args.vocab_size
    warm = prompts_for(vocab, 1, PROMPT_TOKENS)
    run_ours(ours, warm, 4)
    if peer is not None:
        run_mlx_lm(peer, warm, 4)
    for batch in batches:
        prompts = prompts_for(vocab, batch, PROMPT_TOKENS)
        mine: list[Run] = []
        theirs: list[Run] = []
        for _ in range(repeats):
            mine.append(run_ours(ours, prompts, tokens))
            if peer is not None:
                theirs.append(run_mlx_lm(peer, prompts, tokens))
        ratios = (
            [a.tps / b.tps for a, b in zip(mine, theirs, strict=True) if b.tps] if theirs else []
        )
        yield Row(batch, fastest(mine), fastest(theirs) if theirs else None, ratios)


def fastest(runs: list[Run]) -> Run:
    return max(runs, key=lambda run: run.tps)


def speculative(source_dir: Path, tokens: int, batch: int = 4) -> tuple[Run, Run]:
    """(plain, prompt lookup) on prompts repeating a passage, at `batch`."""
    ours = Ours(source_dir, prefill_step_size=512)
    ours.tokenizer = replace(ours.tokenizer, eos_token_ids=frozenset())
    encode = ours.tokenizer.encode
    prompts = [
        encode("".join(f"# Example {i}\n{PASSAGE}\n" for i in range(1, 8 + b)) + "# Example")
        for b in range(batch)
    ]
    run_ours(ours, prompts[:1], 4)
    plain = run_ours(ours, prompts, tokens)
    drafted = run_ours(ours, prompts, tokens, draft="prompt-lookup", num_draft="auto")
    return plain, drafted


def markdown(
    machine,
    table: dict[str, list[Row]],
    spec,
    tokens: int,
    loads: tuple[float, float],
    repeats: int = 1,
    arguments: Sequence[str] = (),
) -> str:
    command = shlex.join(["python", "-m", "benchmarks.batch", *arguments])
    best = (
        f"; the fastest of {repeats} alternating runs of each engine, and the median and range "
        "of the ratio within each pair of runs (a slow moment of the machine hits one pair, not "
        "the median)"
        if repeats > 1
        else ""
    )
    lines = [
        "# Continuous batching: aggregate decode tokens/s, gemma_mlx against mlx-lm",
        "",
        f"Machine: {machine.label} ({machine.chip}, {machine.cpu_cores} cores, MLX "
        f"{mx.__version__} {machine.backend}, BLAS: {machine.blas}); mlx-lm "
        f"{package_version('mlx-lm')}. {time.strftime('%Y-%m-%d')}.",
        f"Command: `{command}`. Greedy, {PROMPT_TOKENS}-token prompts, "
        f"{tokens} tokens per sequence; aggregate = tokens of all sequences per second once "
        f"every sequence decodes (prompt processing excluded){best}. Same weights for both (mlx-lm's "
        "model class holding our loaded float32 weights); mlx-lm's products as sgemm, as in its "
        "own process, ours routed (1 row sgemv, 2-8 rows the few-row kernel, more sgemm). "
        f"Load average (1 min) at the start and end: {loads[0]:.1f}, {loads[1]:.1f} (other "
        "processes on the machine slow both engines; compare the columns of one row).",
        "",
        "| model | batch | gemma_mlx tok/s | x batch 1 | mlx-lm tok/s | gemma_mlx / mlx-lm "
        "| paired runs: median (range) | peak GB ours / mlx-lm | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in table.items():
        base = rows[0].mine.tps
        for row in rows:
            mine, theirs = row.mine, row.theirs
            peer = f"{theirs.tps:.1f}" if theirs else "-"
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
            pairs = sorted(row.pair_ratios)
            paired = (
                f"{statistics.median(pairs):.2f}x ({pairs[0]:.2f}-{pairs[-1]:.2f})"
                if len(pairs) > 1
                else "-"
            )
            peaks = (
                f"{mine.peak_gb:.2f} / {theirs.peak_gb:.2f}" if theirs else f"{mine.peak_gb:.2f}"
            )
            same = ("yes" if mine.outputs == theirs.outputs else "no") if theirs else "-"
            lines.append(
                f"| {model} | {row.batch} | {mine.tps:.1f} | {mine.tps / base:.2f}x | {peer} "
                f"| {ratio} | {paired} | {peaks} | {same} |"
            )
    if spec is not None:
        plain, drafted = spec
        lines += [
            "",
            "Speculative decoding in the batch (built-in model, batch 4, prompts repeating a "
            f"passage, {tokens} tokens each): plain {plain.tps:.1f} tok/s, prompt lookup with "
            f"planned draft lengths {drafted.tps:.1f} tok/s ({drafted.tps / plain.tps:.2f}x), "
            f"{drafted.acceptance:.0%} of drafts kept; "
            f"same tokens: {'yes' if plain.outputs == drafted.outputs else 'no'}.",
        ]
    lines += ["", *batch_lines({size: batch_weights(size) for size in GEMMA4})]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.batch", description=__doc__.split("\n")[0]
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="builtin, tiny:<size>, dirs")
    p.add_argument("--batches", default="1,2,4,8,16", help="batch sizes")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=1, help="runs per engine, the fastest kept")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm")
    p.add_argument("--no-speculative", action="store_true", help="skip the speculative run")
    p.add_argument("--out", type=Path, help="markdown file (default: results/batch-<machine>.md)")
    args = p.parse_args(argv)
    try:
        try:
            batches = parse_lengths(args.batches)
        except BenchmarkError as e:
            raise BenchmarkError(f"--batches {args.batches!r}: sizes >= 1, comma-separated") from e
        if args.tokens < 2:
            raise BenchmarkError(f"--tokens must be >= 2, got {args.tokens}")
        if args.repeats < 1:
            raise BenchmarkError(f"--repeats must be >= 1, got {args.repeats}")
        machine = describe(measure_bandwidth=False)
        load_at_start = os.getloadavg()[0]
        table = {}
        for name in [m for m in args.models.split(",") if m]:
            model = None if name == "builtin" else name
            with model_source(model, None, name) as source:
                print(f"{source.label}: {source.directory}", file=sys.stderr)
                table[source.label] = []
                rows = throughput(
                    source.directory, batches, args.tokens, not args.no_mlx_lm, args.repeats
                )
                for row in rows:
                    peer = f", mlx-lm {row.theirs.tps:.1f}" if row.theirs else ""
                    print(f"  batch {row.batch}: {row.mine.tps:.1f} tok/s{peer}", file=sys.stderr)
                    table[source.label].append(row)
        spec = None
        if not args.no_speculative:
            with model_source(None, None, "builtin") as source:
                spec = speculative(source.directory, args.tokens)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loads = (load_at_start, os.getloadavg()[0])
    arguments = sys.argv[1:] if argv is None else argv
    text = markdown(machine, table, spec, args.tokens, loads, args.repeats, arguments)
    out = args.out or RESULTS / f"batch-{machine.label}.md"
    write_file_atomically(out, lambda path: path.write_text(text), force=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
