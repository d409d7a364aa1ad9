"""Nothing lost, nothing left: the converter never deletes what it did not write (an OUT that
appears meanwhile, a second converter's result, the source itself), and a converter killed or
terminated at any stage leaves no staging behind once the next run is done."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from convert_sources import digest, run_converter, staging_leftovers, tiny_safetensors
from gemma_mlx.convert import convert

from gemma_mlx import hub
from gemma_mlx.loading import build_and_check
from gemma_mlx.outputs import FAULT_ENV, OUTPUT_MARKER, OutputError, OutputExistsError, Terminated


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_safetensors(tmp_path_factory.mktemp("source") / "tiny")


def assert_complete(out) -> None:
    """A committed conversion: every tensor present with its shape, and our marker."""
    build_and_check(out)
    assert (out / OUTPUT_MARKER).is_file()


def during_verify(monkeypatch, action) -> None:
    """Run `action()` once, while the conversion verifies its staging directory (its last step)."""
    from gemma_mlx.convert import pipeline

    verify, pending = pipeline.verify, [action]

    def hooked(out_dir):
        if pending:
            pending.pop()()
        verify(out_dir)

    monkeypatch.setattr(pipeline, "verify", hooked)


@pytest.mark.parametrize("force", [False, True])
def test_output_created_during_a_conversion_survives(source, tmp_path, monkeypatch, force):
    out = tmp_path / "out"

    def user_creates_out():
        out.mkdir()
        (out / "thesis.tex").write_text("three years of work")

    during_verify(monkeypatch, user_creates_out)
    with pytest.raises(OutputError):
        convert(source, out, force=force, progress=False)
    assert (out / "thesis.tex").read_text() == "three years of work"
    assert sorted(os.listdir(out)) == ["thesis.tex"]
    assert staging_leftovers(tmp_path) == []


def test_two_converters_on_one_output_exactly_one_wins(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    results = []
    during_verify(monkeypatch, lambda: results.append(convert(source, out, progress=False)))
    with pytest.raises(OutputExistsError, match="appeared"):
        convert(source, out, progress=False)
    assert len(results) == 1  # the second converter finished first and won
    assert_complete(out)
    assert staging_leftovers(tmp_path) == []


def test_force_never_touches_the_source(source, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    (models / "notes.txt").write_text("unrelated")
    (tmp_path / "link.gguf").symlink_to(gguf)
    before = digest(models), digest(source)
    cases = [
        (gguf, gguf, "is the source"),
        (gguf, tmp_path / "link.gguf", "is the source"),
        (models, gguf, "contains the source"),
        (source.parent, source, "contains the source"),
        (source, source, "is the source"),
        (source / "mlx", source, "lies inside the source"),
    ]
    for out, src, relation in cases:
        status, err = run_converter(src, "-o", out, "--force", "--no-progress")
        assert status == 2 and relation in err and len(err.strip().splitlines()) == 1, err
    assert (digest(models), digest(source)) == before


@pytest.mark.parametrize("stage", ["staged", "shard", "commit"])
def test_sigterm_at_any_stage_leaves_nothing(source, tmp_path, monkeypatch, stage):
    monkeypatch.setenv(FAULT_ENV, f"{stage}=TERM")
    with pytest.raises(Terminated):
        convert(source, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []
    status, err = run_converter(source, "-o", tmp_path / "out", "--no-progress")
    assert status == 128 + 15 and len(err.strip().splitlines()) == 1 and "terminated" in err
    assert os.listdir(tmp_path) == []


def test_sigterm_while_replacing_keeps_a_complete_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(source, out, progress=False)
    monkeypatch.setenv(FAULT_ENV, "exchanged=TERM")  # after the swap, before the old is deleted
    with pytest.raises(Terminated):
        convert(source, out, force=True, progress=False)
    assert_complete(out)
    assert staging_leftovers(tmp_path) == []


CACHE_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gemma_mlx.hub import converted_gguf
    converted_gguf(Path(sys.argv[1]))
    """
)


def test_kill_9_at_any_stage_is_cleaned_up_by_the_next_run(source, tmp_path, monkeypatch):
    """Three processes killed at once (two converters, one first use of a GGUF), then the next
    run of each removes what its killed predecessor left."""
    cache = tmp_path / "cache"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in: killed before it is read")
    env = os.environ | {hub.CACHE_ENV: str(cache)}
    converter = [sys.executable, "-m", "gemma_mlx.convert", str(source), "--no-progress", "-o"]
    runs = {
        "shard": [*converter, str(tmp_path / "a")],
        "commit": [*converter, str(tmp_path / "b")],
        "staged": [sys.executable, "-c", CACHE_SCRIPT, str(gguf)],
    }
    processes = [
        subprocess.Popen(argv, env=env | {FAULT_ENV: f"{stage}=KILL"}, stderr=subprocess.PIPE)
        for stage, argv in runs.items()
    ]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == -9, err.decode()
    left = sorted(os.path.basename(p).split(".partial-")[0] for p in staging_leftovers(tmp_path))
    assert left[:2] == [".a", ".b"] and left[2].startswith(".model-") and len(left) == 3
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    convert(source, tmp_path / "a", progress=False)
    convert(source, tmp_path / "b", progress=False)

    def convert_gguf(src, out, progress=True):
        tiny_safetensors(out)

    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    monkeypatch.setattr("gemma_mlx.convert.convert_gguf", convert_gguf)
    hub.converted_gguf(gguf)
    assert staging_leftovers(tmp_path) == []
    assert_complete(tmp_path / "a")
    assert_complete(tmp_path / "b")
