"""The `gemma-mlx` command line: streamed text on stdout, mlx-lm's statistics on stderr, and one
line plus exit status 2 for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from tiny_chat_model import write_model

from gemma_mlx.chat import ChatSession
from gemma_mlx.cli import TextOutput, run
from gemma_mlx.generate import generate
from gemma_mlx.loading import load
from gemma_mlx.tokenizer import ANSWER, THOUGHT

PROMPT = "the capital of france is"
STATS = [
    r"Prompt: \d+ tokens, [\d.]+ tokens-per-sec",
    r"Generation: \d+ tokens, [\d.]+ tokens-per-sec",
    r"Peak memory: [\d.]+ GB",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load(model_dir)


def test_completion_streams_to_stdout_and_stats_to_stderr(model_dir, tiny, capsys):
    assert run(["--model", str(model_dir), "-p", PROMPT, "-m", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == generate(*tiny, PROMPT, max_tokens=12) + "\n"
    for pattern in STATS:
        assert re.search(pattern, err), pattern


def test_prompt_from_stdin_and_sampling_options(model_dir, tiny, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    args = ["--model", str(model_dir), "-p", "-", "-m", "9", "--temp", "0.8", "--top-k", "40"]
    assert run([*args, "--top-p", "0.9", "--min-p", "0.05", "--seed", "3"]) == 0
    want = generate(*tiny, PROMPT, max_tokens=9, temp=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=3)
    assert capsys.readouterr().out == want + "\n"


def test_interactive_chat_keeps_the_conversation(model_dir, tiny, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand then?\n/quit\n"))
    assert run(["--model", str(model_dir), "--chat", "-m", "6"]) == 0
    session = ChatSession(*tiny, max_tokens=6)
    want = session.send("hello there") + "\n" + session.send("and then?") + "\n"
    assert capsys.readouterr().out.replace(">> ", "") == want


def test_thinking_can_be_hidden():
    def show(show_thinking):
        stream = io.StringIO()
        out = TextOutput(stream, show_thinking)
        for channel, text in [(ANSWER, "a"), (THOUGHT, "hmm"), (ANSWER, "b")]:
            out.write(channel, text)
        out.end()
        return stream.getvalue()

    assert show(False) == "ab\n"
    assert show(True) == "a\nhmm\nb\n"


@pytest.fixture
def corrupt_model(model_dir, tmp_path):
    target = tmp_path / "corrupt"
    shutil.copytree(model_dir, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


BAD_INPUTS = {
    "empty prompt": (["-p", ""], "prompt is empty"),
    "no prompt": ([], "no prompt"),
    "prompt too long": (["-p", "the " * 300], "context holds 256"),
    "negative temperature": (["-p", "x", "--temp", "-1"], "temperature"),
    "top-p above 1": (["-p", "x", "--top-p", "1.5"], "top-p"),
    "min-p of 2": (["-p", "x", "--min-p", "2"], "min-p"),
    "zero max tokens": (["-p", "x", "-m", "0"], "max-tokens"),
    "non-numeric top-k": (["-p", "x", "--top-k", "abc"], "--top-k"),
    "zero repetition penalty": (["-p", "x", "--repetition-penalty", "0"], "repetition-penalty"),
    "chat without template": (["--chat", "--no-chat-template"], "--chat"),
    "negative seed": (["-p", "x", "--seed", "-1"], "--seed must be >= 0"),
    "seed of 2**64": (["-p", "x", "--seed", str(2**64), "--temp", "1"], "--seed must be below"),
    "undecodable prompt argument": (["-p", "a\udcffb"], "--prompt is not valid text"),
    "undecodable stop string": (["-p", "x", "--stop", "\udcff"], "--stop is not valid text"),
    "infinite repetition penalty": (["-p", "x", "--repetition-penalty", "inf"], "finite"),
    "missing draft model": (["-p", "x", "--draft-model", "/no/such/dir"], "--draft-model"),
}


def exit_status(argv) -> int:
    """`run`'s status; argparse's own errors leave through SystemExit."""
    try:
        return run(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(model_dir, capsys, name):
    args, message = BAD_INPUTS[name]
    assert exit_status(["--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_bad_model_arguments(corrupt_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEMMA_MLX_CACHE", str(tmp_path / "cache"))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hi")
    cases = [
        (str(tmp_path / "missing" / "model"), "no such model directory"),
        (str(corrupt_model), "truncated"),
        (str(not_a_model), "not a model directory or .gguf file"),
        ("nobody-here/no-such-model", "offline"),
    ]
    for model, message in cases:
        assert exit_status(["--model", model, "-p", "x"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


def _run_module(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gemma_mlx.generate", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_module_entry_point(model_dir, tiny, corrupt_model):
    """`python -m gemma_mlx.generate` end to end: no warnings or tracebacks on stderr."""
    done = _run_module("--model", str(model_dir), "-p", PROMPT, "-m", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout == generate(*tiny, PROMPT, max_tokens=5) + "\n"
    assert [line.split(":")[0] for line in done.stderr.splitlines()] == [
        "Prompt",
        "Generation",
        "Peak memory",
    ]
    without_openblas = _run_module(
        "--model", str(model_dir), "-p", PROMPT, "-m", "5", "--verbose",
        env={"GEMMA_MLX_BLAS": "off"},
    )  # fmt: skip
    assert without_openblas.returncode == 0, without_openblas.stderr
    assert without_openblas.stdout == done.stdout
    assert "BLAS: MLX's bundled reference BLAS" in without_openblas.stderr
    bad = _run_module("--model", str(corrupt_model), "-p", PROMPT)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_library_api_is_importable_from_the_package():
    """`gemma_mlx.generate` is the function even though a module of that name exists."""
    import gemma_mlx
    from gemma_mlx.hub import load as hub_load

    assert gemma_mlx.generate is generate and gemma_mlx.ChatSession is ChatSession
    assert gemma_mlx.load is hub_load and callable(gemma_mlx.stream_generate)


def test_undecodable_stdin_is_one_line(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    assert run(["--model", str(model_dir), "-p", "-"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "gemma-mlx: error: the prompt on stdin is not valid UTF-8 (byte 0xe9 at offset 3)\n"
    )


def _damage_index(directory):
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _damage_config(directory):
    (directory / "config.json").write_text("[]")


def _damage_sizes(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"intermediate_size": -96}))


def _damage_header(directory):
    path = directory / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    for name, entry in header.items():
        if name != "__metadata__":
            del entry["data_offsets"]
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


@pytest.mark.parametrize("role", ["--model", "--draft-model"])
@pytest.mark.parametrize(
    "damage, message",
    [(_damage_index, "index.json: no valid 'weight_map'"),
     (_damage_config, "config.json: expected a JSON object"),
     (_damage_sizes, "'intermediate_size' = -96"),
     (_damage_header, "model.safetensors: corrupt safetensors header entry")],
)  # fmt: skip
def test_damaged_model_directory_is_one_line(model_dir, tmp_path, capsys, role, damage, message):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    damage(damaged)
    target = ["--model", str(model_dir)] if role == "--draft-model" else []
    assert exit_status([*target, role, str(damaged), "-p", PROMPT, "-m", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and str(damaged) in err, err


def test_unexpected_error_is_one_line_with_a_hint(model_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr("gemma_mlx.cli.load", broken)
    assert run(["--model", str(model_dir), "-p", PROMPT]) == 1
    assert capsys.readouterr().err == (
        "gemma-mlx: internal error: RuntimeError: something unforeseen "
        "(rerun with --verbose for the traceback)\n"
    )
    assert run(["--model", str(model_dir), "-p", PROMPT, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "in broken" in err
    assert err.splitlines()[-1] == "gemma-mlx: internal error: RuntimeError: something unforeseen"


def test_chat_save_failure_keeps_the_conversation(model_dir, tiny, tmp_path, capsys, monkeypatch):
    """/save into a missing directory is an error line; the conversation goes on, and a later
    /save of it resumes exactly."""
    saved = tmp_path / "chat.safetensors"
    lines = ["hello there", f"/save {tmp_path / 'missing' / 'chat.safetensors'}", "/save",
             f"/save {saved}", "and then?", "/quit"]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert run(["--model", str(model_dir), "--chat", "-m", "6"]) == 0
    out, err = capsys.readouterr()
    session = ChatSession(*tiny, max_tokens=6)
    first = session.send("hello there")
    restored = ChatSession.load(saved, *tiny, max_tokens=6)
    want = first + "\n" + session.send("and then?") + "\n"
    assert out.replace(">> ", "") == want
    assert restored.send("and then?") == session.messages[-1]["content"]
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [
        f"gemma-mlx: error: {tmp_path / 'missing'}: no such directory (create it first)",
        "gemma-mlx: error: /save needs a file name: /save PATH",
    ]
