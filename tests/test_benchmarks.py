"""The benchmark runner and report, on a tiny model for one short trial (CI proves they work; speed
targets are not asserted anywhere in the tests)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks import report, run
from benchmarks.bandwidth import M_SERIES, apple_bandwidth
from benchmarks.machine import gpu_core_count, linux_cpu_model
from benchmarks.trials import Series, Trial

PROMPTS = (16, 40)
GENERATED = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One run of `python -m benchmarks.run` on tiny:26b-a4b against both mlx-lm peers:
    (directory, records)."""
    directory = tmp_path_factory.mktemp("results")
    text = directory / "prompt.txt"
    text.write_text("The lighthouse keeper wrote the weather in the log.")
    argv = [
        "--model",
        "tiny:26b-a4b",
        "-p",
        ",".join(map(str, PROMPTS)),
        "-g",
        str(GENERATED),
        "-n",
        "1",
        "--vs",
        "mlx-lm",
        "--vs",
        "mlx-lm-default",
        "--text",
        str(text),
        "--results-dir",
        str(directory),
    ]
    assert run.main(argv) == 0
    files = list(directory.glob("*.jsonl"))
    assert len(files) == 1
    return directory, [json.loads(line) for line in files[0].read_text().splitlines()]


def test_run_writes_one_record_per_engine_and_prompt(results):
    _, records = results
    cases = {(r["engine"]["name"], r["prompt"]["kind"], r["prompt"]["tokens"]) for r in records}
    text_tokens = next(r["prompt"]["tokens"] for r in records if r["prompt"]["kind"] == "text")
    engines = ("gemma_mlx", "mlx-lm", "mlx-lm-default")
    expected = {(e, "random", p) for e in engines for p in PROMPTS}
    expected |= {(e, "text", text_tokens) for e in engines}
    assert cases == expected and len(records) == len(expected)
    # The byte tokenizer of a tiny model: <bos> plus one token per byte, a space being one "▁".
    assert text_tokens == 1 + len("The lighthouse keeper wrote the weather in the log.")


def test_run_records_are_sane(results):
    _, records = results
    for r in records:
        assert r["model"]["label"] == "tiny:26b-a4b" and r["generation_tokens"] == GENERATED
        assert r["machine"]["backend"] in ("cpu", "metal", "cuda") and r["machine"]["label"]
        for metric in ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb"):
            s = r[metric]
            assert 0 < s["min"] <= s["median"] <= s["max"] and math.isfinite(s["max"]), metric
        # TTFT and prefill speed are two views of the same clock reading.
        assert r["prompt"]["tokens"] / r["ttft_s"]["median"] == pytest.approx(
            r["prefill_tps"]["median"]
        )
        # Peak memory covers at least the weights the engine holds.
        assert r["peak_memory_gb"]["min"] >= r["engine"]["weight_gb"] * 0.99
        roof = r["roofline"]
        assert roof["context"] == r["prompt"]["tokens"] + GENERATED // 2
        assert roof["weight_bytes_per_token"] > 0 and roof["kv_bytes_per_token"] > 0
        if r["machine"]["bandwidth"] is not None:
            assert 0 < roof["bandwidth_fraction"] < 1 and roof["ceiling_tps"] > 0


def test_peer_ratios_are_paired_and_the_peer_ran_the_same_model(results):
    _, records = results
    ours = {
        (r["prompt"]["kind"], r["prompt"]["tokens"]): r
        for r in records
        if r["engine"]["name"] == "gemma_mlx"
    }
    for r in records:
        if r["engine"]["name"] == "gemma_mlx":
            assert "ours_over_peer" not in r
            continue
        mine = ours[r["prompt"]["kind"], r["prompt"]["tokens"]]
        for metric, key in (("prefill", "prefill_tps"), ("decode", "decode_tps")):
            ratio = r["ours_over_peer"][metric]["median"]
            # one trial: the paired ratio is the ratio of the two single measurements
            assert ratio == pytest.approx(mine[key]["median"] / r[key]["median"])
            assert 0.02 < ratio < 50
        if r["engine"]["name"] == "mlx-lm-default":
            continue  # other weights: checked below
        # Same weights, same greedy decoding: the first token cannot differ.
        assert r["first_divergence_from_ours"] != 0
        # Both engines read the same bytes per token (same weights, same treatment).
        assert r["roofline"] == mine["roofline"] | {
            "bandwidth_fraction": r["roofline"]["bandwidth_fraction"]
        }


def test_default_conversion_peer_runs_mlx_lm_convert_weights(results):
    """`mlx-lm-default`: 4-bit group-64 matrices (mlx_lm.convert -q), so far fewer bytes per token
    than the dense float32 matrices gemma_mlx computes with on the CPU."""
    _, records = results
    by_engine = {r["engine"]["name"]: r for r in records if r["prompt"]["tokens"] == PROMPTS[0]}
    default, ours = by_engine["mlx-lm-default"], by_engine["gemma_mlx"]
    assert "4-bit g64 quantized" in default["engine"]["runs"]
    weight_bytes = [r["roofline"]["weight_bytes_per_token"] for r in (default, ours)]
    assert weight_bytes[0] < weight_bytes[1] / 2


def test_report_renders_table_and_charts(results, tmp_path):
    directory, records = results
    shared = tmp_path / "results"  # results files other benchmarks write too
    shutil.copytree(directory, shared)
    (shared / "convert-x.jsonl").write_text('{"benchmark": "convert_memory", "machine": "x"}\n')
    written = report.render(shared, tmp_path)
    assert [p.name for p in written] == list(report.OUTPUTS)
    text = (tmp_path / "report.md").read_text()
    rows = [
        line for line in text.splitlines() if line.startswith("| " + records[0]["machine"]["label"])
    ]
    assert len(rows) == len(records) + 1  # one per result, one in the machines table
    for name in report.OUTPUTS[1:]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(report.ReportError, match="--force"):
        report.render(shared, tmp_path)
    report.render(shared, tmp_path, force=True)


def test_report_keeps_the_newest_record_of_each_case(results):
    _, records = results
    older = [
        r | {"time": "2000-01-01T00:00:00+00:00", "decode_tps": {"median": -1}} for r in records
    ]
    assert report.latest(older + records) == report.latest(records)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny:40b"], "sizes are"),
        (["--model", "tiny:e2b", "-p", "12,x"], "-p"),
        (["--model", "tiny:e2b", "-g", "1"], "-g"),
        (
            [
                "--model",
                "tiny:e2b",
                "-p",
                "8",
                "-g",
                "2",
                "-n",
                "1",
                "--no-text",
                "--vs",
                "llama.cpp",
            ],
            "source GGUF",
        ),
    ],
)
def test_run_rejects_bad_options_by_name(argv, message, tmp_path, capsys):
    assert run.main([*argv, "--results-dir", str(tmp_path)]) == run.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


def test_random_prompt_is_mlx_lm_benchmarks():
    """mlx_lm.benchmark seeds 0 and draws randint(0, vocab, (batch, p)); we draw the same ids."""
    import mlx.core as mx

    mx.random.seed(0)
    expected = mx.random.randint(0, 4096, (1, 64)).tolist()[0]
    mx.random.seed(123)  # whatever ran before
    assert run.random_prompt(4096, 64) == expected


def test_paired_ratio_is_trial_by_trial():
    def series(*speeds):
        return Series([Trial(10, 1.0, (4 - 1) / s, [0] * 4, 0, None) for s in speeds])

    ratio = series(10.0, 40.0, 90.0).ratio(series(5.0, 40.0, 30.0), "decode_tps")
    assert (ratio.min, ratio.median, ratio.max) == pytest.approx((1.0, 2.0, 3.0))


def test_bandwidth_table_lookup():
    assert apple_bandwidth("Apple M4 Max", gpu_cores=32).gbs == 410
    assert apple_bandwidth("Apple M4 Max", gpu_cores=40).gbs == 546
    assumed = apple_bandwidth("Apple M3 Max")
    assert assumed.gbs == 400 and "full chip assumed" in assumed.source
    assert apple_bandwidth("Apple M2 Ultra").gbs == 800
    assert apple_bandwidth("Apple A18 Pro") is None
    assert all(row.source and row.gbs > 0 for row in M_SERIES)


def test_machine_text_parsers():
    assert linux_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: fpu\n") == (
        "AMD EPYC 9R14"
    )
    assert gpu_core_count("Chipset Model: Apple M4 Max\n      Total Number of Cores: 40\n") == 40
    assert gpu_core_count("no GPU here") is None
