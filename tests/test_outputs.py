"""The staging/commit routine every output goes through: nothing a user had is lost, nothing
half-written is left, and a killed writer's staging is removed by the next run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest

from gemma_mlx import outputs
from gemma_mlx.outputs import (
    OUTPUT_MARKER,
    DiskSpaceError,
    OutputError,
    OutputExistsError,
    Terminated,
    check_free_space,
    staged_directory,
    staging_path,
    write_file_atomically,
)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def write_text(text: str):
    return lambda path: path.write_text(text)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# files -------------------------------------------------------------------------------------------


def test_file_is_written_and_never_silently_replaced(tmp_path):
    target = tmp_path / "report.json"
    write_file_atomically(target, write_text("first"))
    with pytest.raises(OutputExistsError, match="--force"):
        write_file_atomically(target, write_text("second"))
    assert target.read_text() == "first"
    write_file_atomically(target, write_text("second"), force=True)
    assert target.read_text() == "second"
    assert leftovers(tmp_path) == []


def test_file_that_appears_while_writing_survives(tmp_path):
    target = tmp_path / "session.safetensors"

    def write(partial):
        partial.write_text("ours")
        target.write_text("someone else's")  # another process got there first

    with pytest.raises(OutputExistsError, match="appeared"):
        write_file_atomically(target, write)
    assert target.read_text() == "someone else's"
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path):
    def write(partial):
        partial.write_text("half")
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        write_file_atomically(tmp_path / "out.json", write)
    assert list(tmp_path.iterdir()) == []


def test_file_targets_of_another_kind_are_refused_even_with_force(tmp_path):
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(OutputError, match="not a regular file"):
        write_file_atomically(tmp_path / "a-directory", write_text("x"), force=True)
    with pytest.raises(OutputError, match="no such directory"):
        write_file_atomically(tmp_path / "missing" / "report.json", write_text("x"))
    assert not (tmp_path / "missing").exists()


# directories -----------------------------------------------------------------------------------


def write_model_like(directory, content: str = "v1") -> None:
    (directory / "config.json").write_text(json.dumps({"content": content}))
    (directory / "model.safetensors").write_text(content)


def test_directory_is_committed_with_a_marker_and_replaced_only_with_force(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.partial-")
        write_model_like(staging)
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    assert sorted(marker["files"]) == ["config.json", "model.safetensors"]
    with pytest.raises(OutputExistsError), staged_directory(target) as staging:
        pytest.fail("the block must not run")
    with staged_directory(target, force=True) as staging:
        write_model_like(staging, "v2")
    assert (target / "model.safetensors").read_text() == "v2"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "fallback"])
def test_force_never_replaces_what_gemma_mlx_did_not_write(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without renameat2/renamex_np: rename aside, then into place
        monkeypatch.setattr(outputs, "_RENAME", None)
    target = tmp_path / "out"
    with staged_directory(target) as staging:
        write_model_like(staging)
    (target / "notes.txt").write_text("mine")  # the user added a file to our output
    with pytest.raises(OutputError, match=r"notes\.txt"), staged_directory(target, force=True):
        pass
    assert (target / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_model_like(foreign)  # looks like a model directory, but has no marker
    with (
        pytest.raises(OutputError, match="not written by gemma_mlx"),
        staged_directory(foreign, force=True),
    ):
        pass
    assert (foreign / "config.json").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_directory(empty, force=True) as staging:
        write_model_like(staging)
    assert (empty / "config.json").is_file()

    (target / "notes.txt").unlink()
    with staged_directory(target, force=True) as staging:
        write_model_like(staging, "v2")
    assert (target / "model.safetensors").read_text() == "v2"
    assert leftovers(tmp_path) == []


def test_a_file_is_not_replaced_by_a_directory(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF")
    with pytest.raises(OutputError, match="not a directory"), staged_directory(target, force=True):
        pass
    assert target.read_bytes() == b"GGUF"


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "fallback"])
def test_directory_that_appears_during_the_work_survives(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(outputs, "_RENAME", None)
    target = tmp_path / "out"
    for force in (False, True):
        with pytest.raises(OutputError), staged_directory(target, force=force) as staging:
            write_model_like(staging)
            target.mkdir(exist_ok=True)
            (target / "precious.txt").write_text("do not delete")
        assert (target / "precious.txt").read_text() == "do not delete"
        assert leftovers(tmp_path) == []


def test_two_writers_of_one_target_exactly_one_wins(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared"), staged_directory(target) as first:
        write_model_like(first, "first")
        with staged_directory(target) as second:
            write_model_like(second, "second")
    assert (target / "model.safetensors").read_text() == "second"
    assert leftovers(tmp_path) == []


def test_outputs_overlapping_a_source_are_refused(tmp_path):
    source_dir = tmp_path / "hf"
    source_dir.mkdir()
    write_model_like(source_dir)
    gguf = tmp_path / "models" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    (gguf.parent / "unrelated.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(source_dir)
    cases = [
        (gguf, gguf, "is the source"),
        (gguf.parent, gguf, "contains the source"),
        (tmp_path, gguf, "contains the source"),
        (source_dir / "mlx", source_dir, "lies inside the source"),
        (link, source_dir, "is the source"),  # symlinks are resolved
        (link / "mlx", source_dir, "lies inside the source"),
    ]
    for target, source, relation in cases:
        with (
            pytest.raises(OutputError, match=relation),
            staged_directory(target, force=True, sources=[source]),
        ):
            pytest.fail("the block must not run")
        with pytest.raises(OutputError, match=relation):
            write_file_atomically(target, write_text("x"), force=True, sources=[source])
    assert gguf.read_bytes() == b"GGUF" and (gguf.parent / "unrelated.txt").is_file()
    assert sorted(p.name for p in source_dir.iterdir()) == ["config.json", "model.safetensors"]


# leftovers -------------------------------------------------------------------------------------


def test_stale_staging_of_a_dead_process_is_removed_by_the_next_run(tmp_path, monkeypatch, caplog):
    target = tmp_path / "out"
    monkeypatch.setattr(os, "getpid", dead_pid)
    stale_dir, stale_file = staging_path(target), staging_path(tmp_path / "report.json")
    monkeypatch.undo()
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("257 MB of nothing")
    stale_file.write_text("{")
    alive = staging_path(target)  # this process: still running, so kept
    alive.mkdir()
    other_host = tmp_path / ".out.partial-elsewhere.1.0.abcd1234"
    other_host.mkdir()

    with caplog.at_level(logging.WARNING, logger="gemma_mlx.outputs"):
        with staged_directory(target) as staging:
            write_model_like(staging)
        write_file_atomically(tmp_path / "report.json", write_text("{}"))
    assert not stale_dir.exists() and not stale_file.exists()
    assert alive.is_dir() and other_host.is_dir()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"removed {stale_dir}" in messages and "host elsewhere" in messages


def test_reused_pid_is_recognised_by_its_start_time(tmp_path):
    if outputs._process_start(os.getpid()) == 0:
        pytest.skip("no /proc: process start times are unknown here")
    target = tmp_path / "out"
    path = staging_path(target)
    start = path.name.split(".")[-2]
    reused = path.with_name(path.name.replace(f".{start}.", f".{int(start) + 1}."))
    reused.mkdir()
    with staged_directory(target) as staging:
        write_model_like(staging)
    assert not reused.exists()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_termination_cleans_up_like_ctrl_c(tmp_path, signum):
    if signal.getsignal(signum) is not signal.SIG_DFL:  # e.g. SIGHUP under nohup: kept as is
        pytest.skip(f"{signum.name} has an inherited handler, which staging leaves alone")
    target = tmp_path / "out"
    with pytest.raises(Terminated) as stopped, staged_directory(target) as staging:
        write_model_like(staging)
        signal.pthread_kill(threading.main_thread().ident, signum)  # not MLX's threads
    assert stopped.value.signum == signum
    with pytest.raises(Terminated):
        write_file_atomically(
            tmp_path / "f", lambda p: signal.pthread_kill(threading.main_thread().ident, signum)
        )
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signum) is signal.SIG_DFL  # restored


def test_writers_that_go_by_the_suffix_keep_working(tmp_path):
    """`mx.save_safetensors` appends `.safetensors` to a path without it: staging paths keep the
    target's suffix, so the partial file is where it is looked for."""
    import mlx.core as mx

    target = tmp_path / "session.safetensors"
    write_file_atomically(target, lambda p: outputs.save_safetensors(p, {"a": mx.arange(3)}))
    assert mx.load(str(target))["a"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["session.safetensors"]


def test_free_space_is_checked_with_a_clear_message(tmp_path):
    with pytest.raises(
        DiskSpaceError, match=r"the model needs .* GiB \(\d+ bytes\), only .* are free"
    ):
        check_free_space(tmp_path / "not-yet" / "out", 1 << 62, "the model")
