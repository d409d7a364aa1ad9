"""Results files: one JSON object per line, one file per machine label, in `benchmarks/results/`.

Appending rewrites the file through `gemma_mlx.outputs.write_file_atomically` (a staging file
beside it, renamed into place), so an interrupted run never leaves a half-written line behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.outputs import write_file_atomically

RESULTS_DIR = Path(__file__).parent / "results"
RUN = "run"  # the "benchmark" field of `benchmarks.run` records; other benchmarks share the files


class ResultsError(GemmaMLXError, ValueError):
    """A results file that cannot be read."""


def append(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    new = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_file_atomically(path, lambda partial: partial.write_text(old + new), force=True)


def read_all(directory: Path) -> list[dict[str, Any]]:
    """Every record of every `*.jsonl` file in `directory`, in file then line order."""
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{number}: not a JSON object ({e.msg})") from e
    return records
