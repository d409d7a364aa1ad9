"""The conversion report: per tensor what it was, what it became, and the error against the source."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gemma_mlx.convert.tensors import TensorRecord
from rich.console import Console
from rich.table import Table


@dataclass
class Report:
    source: str
    source_format: str
    output: str = ""
    records: list[TensorRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def total_weights(self) -> int:
        return sum(_numel(r) for r in self.records)

    @property
    def total_bytes(self) -> int:
        return int(sum(r.bits_per_weight * _numel(r) / 8 for r in self.records))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / max(self.total_weights, 1)

    @property
    def inexact(self) -> list[TensorRecord]:
        return [r for r in self.records if not r.exact]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "output": self.output,
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
            "total_weights": self.total_weights,
            "total_bytes": self.total_bytes,
            "bits_per_weight": self.bits_per_weight,
            "exact_tensors": len(self.records) - len(self.inexact),
            "inexact_tensors": len(self.inexact),
            "tensors": [r.to_json() for r in self.records],
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def print_summary(self, console: Console) -> None:
        """Totals, one row per (source -> target) kind, and the worst inexact tensors."""
        kinds = Counter((r.source, r.target) for r in self.records)
        table = Table(title=f"{self.source} -> {self.output}", title_justify="left")
        for column in ("source", "target", "tensors", "bits/weight", "max |error|"):
            table.add_column(column)
        for (source, target), count in sorted(kinds.items()):
            records = [r for r in self.records if (r.source, r.target) == (source, target)]
            worst = max(r.max_abs_error for r in records)
            bits = sum(r.bits_per_weight * _numel(r) for r in records) / max(
                sum(_numel(r) for r in records), 1
            )
            table.add_row(
                source,
                target,
                str(count),
                f"{bits:.4g}",
                "exact" if worst == 0 else f"{worst:.3g}",
            )
        console.print(table)
        console.print(
            f"{len(self.records)} tensors, {self.total_weights / 1e6:.1f}M weights, "
            f"{self.total_bytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits/weight; "
            f"{len(self.records) - len(self.inexact)} exact, {len(self.inexact)} inexact; "
            f"{self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB"
        )
        for r in sorted(self.inexact, key=lambda r: -r.max_abs_error)[:5]:
            console.print(
                f"  inexact: {r.name} ({r.source} -> {r.target}): max |error| "
                f"{r.max_abs_error:.3g}, mean {r.mean_abs_error:.3g}"
            )


def _numel(record: TensorRecord) -> int:
    count = 1
    for size in record.shape:
        count *= size
    return count
