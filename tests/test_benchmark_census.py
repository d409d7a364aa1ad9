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
    half = len(records) // 2
    assert records[:half] == [r | {"date": records[0]["date"]} for r in records[half:]]
    rows = [r for r in records[:half] if r["benchmark"] == "kernel_census"]
    launches = [r for r in records[:half] if r["benchmark"] == "kernel_census_launch"]
    assert len(rows) + len(launches) == half
    by_name = {r["what"]: r for r in rows}
    assert set(by_name) == {
        "MoE block, 1 token",
        "MoE block, 3 tokens",
        "MoE block, 16 tokens",  # 64 pairs over 16 experts: where the pairs are grouped
        "greedy verify, K = 2",
        "sampling verify, K = 2",
        "drafter head, 1 draft",
        "greedy round: 2 heads + verify",
    } | {what for what, _ in kernel_census.layer_operations_of()}  # at the released sizes' shapes
    for r in rows:
        assert r["shape"]["vocab"] == 4096
        assert r["composed_kernels"] == sum(r["composed"].values())
        assert r["kernel_path_kernels"] == sum(r["kernel_path"].values())
        assert 0 < r["reduction"] == round(1 - r["kernel_path_kernels"] / r["composed_kernels"], 4)
        assert set(r["launches"]) <= set(r["kernel_path"])
    assert "moe_dispatch" in by_name["MoE block, 16 tokens"]["launches"]
    assert "moe_dispatch" not in by_name["MoE block, 3 tokens"]["launches"]
    head, round_ = by_name["drafter head, 1 draft"], by_name["greedy round: 2 heads + verify"]
    verify = by_name["greedy verify, K = 2"]
    assert (
        round_["kernel_path_kernels"]
        == 2 * head["kernel_path_kernels"] + verify["kernel_path_kernels"]
    )
    assert (
        round_["launches"]
        == {name: 2 * n for name, n in head["launches"].items()} | verify["launches"]
    )
    for r in launches:
        threads = r["threads_per_threadgroup"]
        assert r["threadgroups"] * threads <= r["grid"][0] * r["grid"][1] * r["grid"][2] + threads
        assert 0 < r["bytes_per_threadgroup"] <= r["bytes_read"]
    kernels = {r["kernel"] for r in launches}
    assert {"moe_route", "moe_dispatch", "drafter_head", "drafter_head_pick"} <= kernels
    report = (tmp_path / kernel_census.REPORT_FILE).read_text()
    assert "| drafter_head_pick |" in report and "bytes read / threadgroup" in report
    out = capsys.readouterr().out
    assert "drafter head, 1 draft" in out and "reduction" in out


def test_rejects_a_vocabulary_the_centroids_do_not_divide(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kernel_census.main(["--vocab", "1000", "--centroids", "64", "--results-dir", str(tmp_path)])
    assert "--vocab must be a multiple of --centroids" in capsys.readouterr().err
    assert not (tmp_path / kernel_census.RESULTS_FILE).exists()
    assert not (tmp_path / kernel_census.REPORT_FILE).exists()
