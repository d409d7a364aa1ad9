"""Render every results file into one markdown table and two PNG charts.

    python -m benchmarks.report [--results-dir benchmarks/results] [--out DIR] [--force]

Reads the `benchmarks.run` records of all `*.jsonl` files (one per machine, so results from many Macs merge into one picture) and
keeps the newest record of each (machine, model, engine, prompt, tokens generated). Writes
`report.md`, `decode_by_model.png` (decode tok/s by model, one bar per machine and engine, the
bandwidth roofline marked above each bar) and `tok_s_vs_context.png` (prefill and decode tok/s
against prompt length); `benchmarks.serve` records add a Serving section. Existing outputs are
replaced only with `--force`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import serve, store
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.outputs import write_file_atomically

OUTPUTS = ("report.md", "decode_by_model.png", "tok_s_vs_context.png")
EXIT_BAD_INPUT = 2


class ReportError(GemmaMLXError, ValueError):
    pass


def _key(r: dict[str, Any]) -> tuple:
    return (
        r["machine"]["label"],
        r["model"]["label"],
        r["engine"]["name"],
        r["prompt"]["kind"],
        r["prompt"]["tokens"],
        r["generation_tokens"],
    )


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each (machine, model, engine, prompt, generated tokens)."""
    newest: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if _key(r) not in newest or r["time"] >= newest[_key(r)]["time"]:
            newest[_key(r)] = r
    return sorted(newest.values(), key=_key)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["# Benchmark results", ""]
    machines = {r["machine"]["label"]: r["machine"] for r in records}
    lines += [
        "## Machines",
        "",
        "| label | chip | backend | memory GB | MLX | BLAS | bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, m in sorted(machines.items()):
        bw = m["bandwidth"]
        bandwidth = "–" if bw is None else f"{bw['gbs']} GB/s ({bw['kind']}: {bw['source']})"
        chip = m["chip"] + (f", {m['gpu_cores']}-core GPU" if m.get("gpu_cores") else "")
        lines.append(
            f"| {label} | {chip}, {m['cpu_cores']} cores | {m['backend']} | {m['memory_gb']} "
            f"| {m['mlx_version']} | {m['blas']} | {bandwidth} |"
        )
    if any(m["backend"] == "cpu" for m in machines.values()):
        lines += [
            "",
            "On the CPU backend MLX computes in float32 on one thread per op: these "
            "speeds are not what a Mac shows. What transfers is the same-run ratio to a "
            "peer and the bytes per token (see `benchmarks/cost_model.md`).",
        ]
    lines += [
        "",
        "## Results",
        "",
        "Median over trials (min–max in the results files). `ours/peer`: trial-by-trial ratio of "
        "gemma_mlx's speed to the peer's in the same run (> 1: gemma_mlx faster). Roofline: weight "
        "and KV bytes read per decoded token at the mean decode context, against the machine's "
        "bandwidth.",
        "",
        "| machine | model | engine | prompt | prefill tok/s | decode tok/s | TTFT s | peak GB "
        "| MB/token | ceiling tok/s | of bandwidth | ours/peer prefill | ours/peer decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        roof = r["roofline"]
        ratio = r.get("ours_over_peer") or {}
        peak = r["peak_memory_gb"]
        mb = (roof["weight_bytes_per_token"] + roof["kv_bytes_per_token"]) / 1e6
        lines.append(
            f"| {r['machine']['label']} | {r['model']['label']} | {r['engine']['name']} "
            f"| {r['prompt']['kind']} {r['prompt']['tokens']}+{r['generation_tokens']} "
            f"| {r['prefill_tps']['median']:.1f} | {r['decode_tps']['median']:.2f} "
            f"| {r['ttft_s']['median']:.3f} | {_fmt(peak and peak['median'], '.3f')} "
            f"| {mb:.1f} | {_fmt(roof['ceiling_tps'], '.0f')} "
            f"| {_fmt(roof['bandwidth_fraction'], '.1%')} "
            f"| {_fmt(ratio.get('prefill', {}).get('median'), '.2f')} "
            f"| {_fmt(ratio.get('decode', {}).get('median'), '.2f')} |"
        )
    lines += ["", "## What each engine ran", ""]
    runs = sorted(
        {
            (r["machine"]["label"], r["model"]["label"], r["engine"]["name"], r["engine"]["runs"])
            for r in records
        }
    )
    lines += [
        f"- {machine} / {model} / **{engine}**: {text}" for machine, model, engine, text in runs
    ]
    lines += [
        "",
        "![decode tok/s by model](decode_by_model.png)",
        "",
        "![tok/s against context](tok_s_vs_context.png)",
        "",
    ]
    return "\n".join(lines)


def _series_name(r: dict[str, Any]) -> str:
    return f"{r['machine']['label']} · {r['engine']['name']}"


def decode_chart(records: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: decode tok/s at each model's shortest random prompt, roofline as a marker."""
    import matplotlib.pyplot as plt

    shortest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["prompt"]["kind"] != "random":
            continue
        key = (r["model"]["label"], _series_name(r))
        if key not in shortest or r["prompt"]["tokens"] < shortest[key]["prompt"]["tokens"]:
            shortest[key] = r
    models = sorted({m for m, _ in shortest})
    names = sorted({s for _, s in shortest})
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(names)) ** 0.5), 4.5))
    for i, name in enumerate(names):
        xs, tps, ceilings = [], [], []
        for j, model in enumerate(models):
            r = shortest.get((model, name))
            if r is None:
                continue
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            tps.append(r["decode_tps"]["median"])
            ceilings.append(r["roofline"]["ceiling_tps"])
        bars = ax.bar(xs, tps, width, label=name)
        marked = [(x, c) for x, c in zip(xs, ceilings, strict=True) if c]
        if marked:
            ax.scatter(
                *zip(*marked, strict=True), marker="_", s=400, color=bars.patches[0].get_facecolor()
            )
    ax.scatter([], [], marker="_", color="gray", label="roofline (bandwidth / bytes per token)")
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title("Decode speed by model and machine, shortest random prompt")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def context_chart(records: list[dict[str, Any]], path: Path) -> None:
    """Prefill and decode tok/s against prompt length (random prompts), one line per run."""
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["prompt"]["kind"] == "random":
            lines.setdefault(f"{r['model']['label']} · {_series_name(r)}", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, rs in sorted(lines.items()):
        rs.sort(key=lambda r: r["prompt"]["tokens"])
        contexts = [r["prompt"]["tokens"] for r in rs]
        axes[0].plot(contexts, [r["prefill_tps"]["median"] for r in rs], marker="o", label=name)
        axes[1].plot(contexts, [r["decode_tps"]["median"] for r in rs], marker="o", label=name)
    for ax, what in zip(axes, ("prefill", "decode"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(f"{what} tokens/s (log)")
        ax.set_title(f"{what.capitalize()} speed against context")
    axes[1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results_dir: Path, out: Path, force: bool = False) -> list[Path]:
    everything = store.read_all(results_dir)
    records = latest([r for r in everything if r.get("benchmark") == store.RUN])
    serving = [r for r in everything if r.get("benchmark") == serve.SERVE]
    if not records:
        raise ReportError(f"{results_dir}: no results (*.jsonl); run python -m benchmarks.run")
    targets = [out / name for name in OUTPUTS]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise ReportError(f"{existing[0]} exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    writers = (
        lambda path: path.write_text(markdown(records) + "\n".join(serve.markdown(serving))),
        lambda path: decode_chart(records, path),
        lambda path: context_chart(records, path),
    )
    for target, write in zip(targets, writers, strict=True):
        write_file_atomically(target, write, force=force)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.splitlines()[0]
    )
    p.add_argument("--results-dir", type=Path, default=store.RESULTS_DIR)
    p.add_argument("--out", type=Path, help="output directory (default: the results directory)")
    p.add_argument("--force", action="store_true", help="replace existing report files")
    args = p.parse_args(argv)
    try:
        written = render(args.results_dir, args.out or args.results_dir, args.force)
    except GemmaMLXError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
