"""Tokens/s of gemma_mlx against its peers, on the same weights, in the same process run.

    python -m benchmarks.run [--model M] [-p 512,2048] [-g 128] [-n 5]
                             [--vs mlx-lm] [--vs mlx-lm-default] [--vs llama.cpp] [--draft D]

mlx-lm's `benchmark` contract: random-token prompts (`mx.random.seed(0)`, then
`mx.random.randint(0, vocab_size, (1, p))`), greedy decoding that never stops early, one warm-up
run, then `n` timed trials; plus one real text prompt (`benchmarks/prompt.txt`). Engines run
interleaved, trial by trial, so load from other processes hits them alike; each peer gets the
trial-by-trial ratio of our speed to its own (> 1: we are faster).

Peers: `mlx-lm` runs `mlx_lm.stream_generate` on the same directory with the same weight treatment
as ours (on the CPU: dense float32 with OpenBLAS, mlx-lm's fastest setting there);
`mlx-lm+route` the same with our routing of few-row products past OpenBLAS's sgemm (Linux; see
`gemma_mlx/_platform.py`), which separates that routing from the rest of the stack;
`mlx-lm-default` on what `mlx_lm.convert -q` would have made of the weights (4-bit, group 64, in
the checkpoint's dtype: very slow on the CPU backend, use short prompts); `llama.cpp` runs
llama-cpp-python on the source GGUF.

Every result is placed against the machine's memory bandwidth (`benchmarks.roofline`) and
appended to `benchmarks/results/<machine>.jsonl`; `python -m benchmarks.report` draws them.

`--model`: a converted model directory, a .gguf file (converted once, and the source for
`--vs llama.cpp`), `tiny:<size>` (random weights with the structure of e2b, e4b, 12b, 26b-a4b or
31b; seconds per trial, for CI), or nothing for the built-in Gemma 3 270M.

On the CPU backend (Linux) both MLX engines compute in float32 and the speeds say little about a
Mac; the same-run ratios, bytes per token and the cost model (`benchmarks.cost_model`) transfer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import store
from benchmarks.configs import GEMMA4
from benchmarks.engines import LlamaCpp, MlxLm, Ours
from benchmarks.machine import describe
from benchmarks.roofline import Roofline
from benchmarks.tiny_model import TINY_PREFIX, write_tiny_model
from benchmarks.trials import Series, Spread, run_trial
from gemma_mlx.decode import default_prefill_step_size
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.loading import read_config

EXIT_BAD_INPUT = 2
PEERS = ("mlx-lm", "mlx-lm+route", "mlx-lm-default", "llama.cpp")
TEXT_PROMPT = Path(__file__).parent / "prompt.txt"
SCHEMA = 1
TABLE_COLUMNS = (
    "engine",
    "prompt",
    "prefill tok/s",
    "decode tok/s",
    "TTFT s",
    "peak GB",
    "of bandwidth",
    "ours/peer prefill",
    "ours/peer decode",
)


class BenchmarkError(GemmaMLXError, ValueError):
    """A bad option or a model the benchmark cannot find."""


@dataclass
class ModelSource:
    directory: Path
    label: str
    gguf: Path | None


@dataclass
class Case:
    """One prompt every engine is timed on."""

    kind: str  # "random" or "text"
    tokens: list[int]

    @property
    def key(self) -> str:
        return f"{self.kind}-{len(self.tokens)}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--model",
        help="model directory, .gguf file or tiny:<size> (default: the built-in Gemma 3 270M)",
    )
    p.add_argument("-p", "--prompt-tokens", default="512,2048", help="random-prompt lengths")
    p.add_argument("-g", "--generation-tokens", type=int, default=128, help="tokens to decode")
    p.add_argument("-n", "--num-trials", type=int, default=5, help="timed trials per prompt")
    p.add_argument("--vs", action="append", default=[], choices=PEERS, help="peer to compare")
    p.add_argument("--draft", help="speculative decoding draft for gemma_mlx (passed through)")
    p.add_argument("--gguf", type=Path, help="source GGUF of a model directory (--vs llama.cpp)")
    p.add_argument("--llama-threads", type=int, help="llama.cpp threads (default: every core)")
    p.add_argument("--text", type=Path, default=TEXT_PROMPT, help="the real text prompt")
    p.add_argument("--no-text", action="store_true", help="skip the real text prompt")
    p.add_argument("--prefill-step-size", type=int, help="prompt chunk length, for every engine")
    p.add_argument("--label", help="model name in results (default: from --model)")
    p.add_argument("--results-dir", type=Path, default=store.RESULTS_DIR)
    return p


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise BenchmarkError(f"-p: expected comma-separated token counts, got {text!r}") from e
    if not lengths or any(n < 1 for n in lengths):
        raise BenchmarkError(f"-p: token counts must be >= 1, got {text!r}")
    return lengths


@contextmanager
def model_source(model: str | None, gguf: Path | None, label: str | None) -> Iterator[ModelSource]:
    """The MLX directory to load, its label and source GGUF; a tiny model lives for the run."""
    from gemma_mlx.hub import converted_gguf

    if model is not None and model.startswith(TINY_PREFIX):
        size = model.removeprefix(TINY_PREFIX)
        if size not in GEMMA4:
            raise BenchmarkError(f"--model {model}: sizes are {', '.join(GEMMA4)}")
        with tempfile.TemporaryDirectory(prefix="gemma-mlx-tiny-") as tmp:
            yield ModelSource(write_tiny_model(size, Path(tmp)), label or model, gguf)
        return
    try:
        if model is None:
            from gemma_mlx.builtin import builtin_gguf

            gguf = builtin_gguf()
            directory, name = converted_gguf(gguf), gguf.stem
        elif Path(model).suffix.lower() == ".gguf":
            gguf = Path(model)
            if not gguf.is_file():
                raise BenchmarkError(f"--model {model}: no such file")
            directory, name = converted_gguf(gguf), gguf.stem
        else:
            directory = Path(model)
            if not (directory / "config.json").is_file():
                raise BenchmarkError(f"--model {model}: not a model directory (no config.json)")
            name = directory.resolve().name
    except ImportError as e:
        raise BenchmarkError(
            f"converting a GGUF needs gemma_mlx.convert, which this checkout lacks ({e}); "
            "pass --model DIR with a converted directory"
        ) from e
    yield ModelSource(directory, label or name, gguf)


def random_prompt(vocab_size: int, length: int) -> list[int]:
    """mlx_lm.benchmark's prompt: the same ids it would draw for `-p length`."""
    mx.random.seed(0)
    return mx.random.randint(0, vocab_size, (1, length)).tolist()[0]


def git_commit() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first token where two greedy continuations differ; None if they agree."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)


def _spread(series: Series, metric: str) -> dict[str, float] | None:
    spread = series.spread(metric)
    return None if spread is None else asdict(spread)


def make_record(
    engine, case: Case, series: Series, ours: Series, roof: Roofline, common: dict[str, Any]
) -> dict[str, Any]:
    """One results line: an engine's trials on one prompt, its roofline, its ratio to ours."""
    decode: Spread = series.spread("decode_tps")
    record = common | {
        "engine": {
            "name": engine.name,
            "runs": engine.description,
            "weight_gb": getattr(engine, "weight_nbytes", 0) / 1e9 or None,  # held in memory
        },
        "prompt": {"kind": case.kind, "tokens": len(case.tokens)},
        "prefill_tps": _spread(series, "prefill_tps"),
        "decode_tps": asdict(decode),
        "ttft_s": _spread(series, "ttft"),
        "peak_memory_gb": _spread(series, "peak_memory_gb"),
        "drafted_fraction": sum(t.drafted for t in series.trials)
        / sum(len(t.tokens) for t in series.trials),
        "roofline": {
            "weight_bytes_per_token": roof.weight_bytes,
            "kv_bytes_per_token": roof.kv_bytes,
            "context": roof.context,
            "ceiling_tps": roof.ceiling_tps,
            "bandwidth_fraction": roof.fraction(decode.median),
        },
    }
    if series is not ours:
        record["ours_over_peer"] = {
            "prefill": asdict(ours.ratio(series, "prefill_tps")),
            "decode": asdict(ours.ratio(series, "decode_tps")),
        }
        record["first_divergence_from_ours"] = first_divergence(
            ours.trials[0].tokens, series.trials[0].tokens
        )
    return record


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def check_options(args: argparse.Namespace) -> list[int]:
    if args.generation_tokens < 2:
        raise BenchmarkError("-g: at least 2 tokens (decode speed needs a first and a last)")
    if args.num_trials < 1:
        raise BenchmarkError("-n: at least 1 trial")
    if not args.no_text and not args.text.is_file():
        raise BenchmarkError(f"--text {args.text}: no such file")
    return parse_lengths(args.prompt_tokens)


def peers(args: argparse.Namespace, source: ModelSource, ours: Ours, cases: list[Case]) -> list:
    engines = []
    if "mlx-lm" in args.vs:
        engines.append(MlxLm(source.directory, ours.prefill_step_size, like=ours))
    if "mlx-lm+route" in args.vs:
        engines.append(
            MlxLm(source.directory, ours.prefill_step_size, like=ours, with_routing=True)
        )
    if "mlx-lm-default" in args.vs:
        engines.append(
            MlxLm(source.directory, ours.prefill_step_size, like=ours, default_conversion=True)
        )
    if "llama.cpp" in args.vs:
        if source.gguf is None:
            raise BenchmarkError(
                "--vs llama.cpp needs the source GGUF: pass --model FILE.gguf or --gguf FILE"
            )
        longest = max(len(c.tokens) for c in cases) + args.generation_tokens + 8
        engines.append(LlamaCpp(source.gguf, longest, args.llama_threads))
    return engines


def benchmark(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Time every engine on every prompt; append the records to the machine's results file."""
    lengths = check_options(args)
    machine = describe()
    step = args.prefill_step_size or default_prefill_step_size()
    with model_source(args.model, args.gguf, args.label) as source:
        console.print(f"[bold]model[/] {source.label}: {source.directory}")
        model_type = read_config(source.directory)["model_type"]
        ours = Ours(source.directory, step, args.draft)
        cases = [Case("random", random_prompt(ours.model.args.vocab_size, n)) for n in lengths]
        if not args.no_text:
            cases.append(Case("text", ours.tokenizer.encode(args.text.read_text())))
        engines = [ours, *peers(args, source, ours, cases)]
        for engine in engines:
            console.print(f"  [cyan]{engine.name}[/]: {engine.description}")
        bw = machine.bandwidth
        console.print(
            f"[bold]machine[/] {machine.label}: {machine.chip}, {machine.backend}, "
            + (f"{bw.gbs} GB/s ({bw.kind})" if bw else "bandwidth unknown")
        )
        load_before = os.getloadavg()[0]
        series = time_all(engines, cases, args, console)

    common = {
        "benchmark": store.RUN,
        "schema": SCHEMA,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "command": " ".join(["python -m benchmarks.run", *args.argv]),
        "machine": machine.as_dict(),
        "model": {
            "label": source.label,
            "model_type": model_type,
            "weight_gb": ours.weight_nbytes / 1e9,
        },
        "generation_tokens": args.generation_tokens,
        "trials": args.num_trials,
        "prefill_step_size": step,
        # Other processes on the machine skew every engine; the 1-minute load says how busy it was.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    records = []
    for case in cases:
        context = len(case.tokens) + args.generation_tokens // 2  # mean context while decoding
        for engine in engines:
            roof = Roofline(
                weight_bytes=engine.weight_bytes_per_token(),
                kv_bytes=engine.kv_bytes(ours.model.args, context),
                context=context,
                bandwidth_gbs=bw.gbs if bw else None,
            )
            own, reference = series[engine.name, case.key], series[ours.name, case.key]
            records.append(make_record(engine, case, own, reference, roof, common))
    store.append(args.results_dir / f"{machine.label}.jsonl", records)
    return records


def time_all(engines, cases: list[Case], args, console: Console) -> dict[tuple[str, str], Series]:
    """Warm up each engine on each prompt, then time `n` interleaved rounds."""
    g = args.generation_tokens
    series = {(e.name, c.key): Series() for e in engines for c in cases}
    with progress_bar(console) as progress:
        runs = progress.add_task("runs", total=len(cases) * len(engines) * (args.num_trials + 1))
        tokens = progress.add_task("tokens", total=g)
        for case in cases:
            for trial in range(-1, args.num_trials):  # -1: the warm-up
                for engine in engines:
                    what = "warm-up" if trial < 0 else f"trial {trial + 1}/{args.num_trials}"
                    progress.update(runs, description=f"{engine.name} {case.key} {what}")
                    progress.reset(tokens, total=g)
                    result = run_trial(
                        engine, case.tokens, g, lambda n: progress.update(tokens, completed=n)
                    )
                    if trial >= 0:
                        series[engine.name, case.key].trials.append(result)
                    progress.advance(runs)
    return series


def print_table(records: list[dict[str, Any]], console: Console) -> None:
    """Medians only; min and max are in the results file."""
    table = Table(title=f"median of {records[0]['trials']} trials")
    for column in TABLE_COLUMNS:
        table.add_column(column, overflow="fold")

    def median(value: dict | None, spec: str) -> str:
        return "-" if value is None else format(value["median"], spec)

    for r in records:
        fraction = r["roofline"]["bandwidth_fraction"]
        ratio = r.get("ours_over_peer", {})
        table.add_row(
            r["engine"]["name"],
            f"{r['prompt']['kind']} {r['prompt']['tokens']}",
            median(r["prefill_tps"], ".1f"),
            median(r["decode_tps"], ".2f"),
            median(r["ttft_s"], ".3f"),
            median(r["peak_memory_gb"], ".3f"),
            "-" if fraction is None else f"{fraction:.1%}",
            median(ratio.get("prefill"), ".2f"),
            median(ratio.get("decode"), ".2f"),
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    console = Console(stderr=True)
    try:
        records = benchmark(args, console)
    except GemmaMLXError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return EXIT_BAD_INPUT
    print_table(records, console)
    console.print(f"results appended to {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
