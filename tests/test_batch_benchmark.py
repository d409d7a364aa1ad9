"""`python -m benchmarks.batch` on a tiny model: both engines run, produce the same greedy tokens
from the same weights, and the table has a row per batch size; bad options exit 2."""

from __future__ import annotations

import re

import pytest

from benchmarks import batch


def test_table_for_a_tiny_model(tmp_path):
    out = tmp_path / "batch.md"
    argv = ["--models", "tiny:e2b", "--batches", "1,3", "--tokens", "3", "--no-speculative"]
    argv += ["--repeats", "2"]
    assert batch.main([*argv, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny:e2b")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "3"]
    assert all(row.rstrip(" |").endswith("yes") for row in rows)  # same tokens as mlx-lm
    paired = r"\| (\d+\.\d\d)x \((\d+\.\d\d)-(\d+\.\d\d)\) \|"  # median (range) of 2 pairs
    for median, low, high in (re.search(paired, row).groups() for row in rows):
        assert float(low) <= float(median) <= float(high)
    assert "| 26B-A4B |" in out.read_text()  # the cost model's batch table
    command = " ".join(["python -m benchmarks.batch", *argv, "--out", str(out)])
    assert f"Command: `{command}`" in out.read_text()  # the whole command, to rerun it


@pytest.mark.parametrize(
    "argv", [["--batches", "0"], ["--batches", "x"], ["--tokens", "1"], ["--repeats", "0"]]
)
def test_bad_options(argv, tmp_path, capsys):
    assert batch.main([*argv, "--out", str(tmp_path / "x.md")]) == 2
    assert "error:" in capsys.readouterr().err
