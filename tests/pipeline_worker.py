"""One rank of a pipeline test (`test_distributed.py` starts several with the ring backend).

    python tests/pipeline_worker.py JOB.json

JOB: {"runs": [{"model": dir or null (the built-in 270M), "prompt": [ids], "tokens": n,
"draft": null | "prompt-lookup" | a drafter model's dir}], "die": {"rank": r, "after": n, "signal": "KILL" | "STOP"}}.
Prints one JSON line per run: this rank's tokens, layers, planned and held bytes (weights) and
MLX's peak memory while loading and while generating.
With "die", rank r sends itself the signal after n tokens of the first run. A package error ends
the rank as the CLI does: one line on stderr, status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import gemma_mlx
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.loading import load_model

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    rank = mx.distributed.init().rank()
    die = job.get("die")
    for run in job["runs"]:
        mx.clear_cache()
        mx.reset_peak_memory()
        model, tokenizer = gemma_mlx.load(run["model"])
        load_peak = mx.get_peak_memory()
        mx.reset_peak_memory()
        draft = run.get("draft")
        if draft is not None and draft != "prompt-lookup":  # a drafter model, whole on each rank
            draft = load_model(draft)
        tokens = []
        steps = gemma_mlx.stream_generate(
            model, tokenizer, run["prompt"], max_tokens=run["tokens"], draft=draft
        )
        for response in steps:
            tokens.append(response.token)
            if die and die["rank"] == rank and len(tokens) == die["after"]:
                os.kill(os.getpid(), getattr(signal, "SIG" + die["signal"]))
        report = {
            "rank": rank,
            "model": run["model"],
            "draft": run.get("draft"),
            "tokens": tokens,
            "layers": model.split.layers[rank],
            "planned": model.split.planned_bytes[rank],
            "held": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
            "peak": mx.get_peak_memory(),  # generation: weights, caches, activations
            "load_peak": load_peak,
        }
        print(json.dumps(report), flush=True)
        del model
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GemmaMLXError as e:  # as the CLI reports it: one line, status 2
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
