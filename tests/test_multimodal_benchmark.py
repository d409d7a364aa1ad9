"""`python -m benchmarks.vision` on the tiny checkpoint: both engines encode the same image to the
same soft tokens and continue the prompt with the same greedy tokens; bad options exit 2."""

from __future__ import annotations

import json

import pytest
from tiny_chat_model import write_model

from benchmarks import vision

FAST = ["--trials", "1", "--max-soft-tokens", "70", "--text-tokens", "8"]


def test_both_engines_on_the_tiny_checkpoint(tmp_path):
    pytest.importorskip("mlx_vlm", reason="mlx-vlm (the bench extra) is the benchmark's peer")
    assert vision.main([*FAST, "--results-dir", str(tmp_path)]) == 0
    (jsonl,) = tmp_path.glob("vision-*.jsonl")
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["image"]["soft_tokens"] <= 70
    assert record["prompt_tokens"] == 8 + record["image"]["soft_tokens"] + 3  # BOS, markers
    assert record["embedding_max_abs_diff"] < 1e-5
    assert record["same_first_tokens"]
    engines = record["engines"]
    assert len(engines["gemma_mlx"]["first_tokens"]) == vision.FIRST_TOKENS
    assert all(e["encode_s"] > 0 and e["prompt_tps"] > 0 for e in engines.values())
    table = jsonl.with_suffix(".md").read_text()
    assert "| gemma_mlx |" in table and "| mlx-vlm |" in table


@pytest.mark.parametrize(
    "argv", [["--trials", "0"], ["--max-soft-tokens", "100"], ["--text-tokens", "1"]]
)
def test_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vision.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_checkpoint_without_a_vision_tower(tmp_path, capsys):
    text_model = write_model(tmp_path / "text-it")
    for model in (text_model, tmp_path / "missing"):
        assert vision.main(["--model", str(model), "--results-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("benchmarks.vision: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("vision-*"))
