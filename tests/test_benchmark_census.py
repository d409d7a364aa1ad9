"""`python -m benchmarks.kernel_census` end to end on a small shape: table, reduction, JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks import kernel_census

SMALL = {
    "hidden": 64,
    "experts": 16,
    "top-k": 4,
    "expert-width": 32,
    "vocab": 4096,
    "drafts": 2,
    "centroids": 64,
    "centroid-top-k": 4,
    "draft-width": 64,
}
ARGS = [part for name, value in SMALL.items() for part in (f"--{name}", str(value))]


def test_main_appends_one_record_per_row(tmp_path, capsys):
    assert kernel_census.main([*ARGS, "--results-dir", str(tmp_path)]) == 0
    assert kernel_census.main([*ARGS, "--results-dir", str(tmp_path)]) == 0  # appends
    lines = (tmp_path / kernel_census.RESULTS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12 and records[:6] == [
        r | {"date": records[0]["date"]} for r in records[6:]
    ]
    by_name = {r["what"]: r for r in records}
    assert set(by_name) == {
        "MoE block, 1 token",
        "MoE block, 3 tokens",
        "greedy verify, K = 2",
        "sampling verify, K = 2",
        "drafter head, 1 draft",
        "greedy round: 2 heads + verify",
    }
    for r in records:
        assert r["shape"]["vocab"] == 4096
        assert r["composed_kernels"] == sum(r["composed"].values())
        assert r["kernel_path_kernels"] == sum(r["kernel_path"].values())
        assert 0 < r["reduction"] == round(1 - r["kernel_path_kernels"] / r["composed_kernels"], 4)
        assert set(r["launches"]) <= set(r["kernel_path"])
    head, round_ = by_name["drafter head, 1 draft"], by_name["greedy round: 2 heads + verify"]
    verify = by_name["greedy verify, K = 2"]
    assert (
        round_["kernel_path_kernels"]
        == 2 * head["kernel_path_kernels"] + verify["kernel_path_kernels"]
    )
    assert round_["launches"] == {"drafter_head": 2, "verify_greedy": 1}
    out = capsys.readouterr().out
    assert "drafter head, 1 draft" in out and "reduction" in out


def test_rejects_a_vocabulary_the_centroids_do_not_divide(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kernel_census.main(["--vocab", "1000", "--centroids", "64", "--results-dir", str(tmp_path)])
    assert "--vocab must be a multiple of --centroids" in capsys.readouterr().err
    assert not (tmp_path / kernel_census.RESULTS_FILE).exists()
