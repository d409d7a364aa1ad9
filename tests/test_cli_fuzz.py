"""Fuzzing the command line (hypothesis): random options, prompts (random bytes on stdin
included) and damaged copies of a tiny model directory (truncated files, flipped bytes, wrong types
in config.json, the weights index, safetensors headers and tokenizer files).

Whatever the input, `gemma-mlx` ends with exit status 0, or 2 and one line on stderr naming the
problem; never a traceback or an internal error (exit 1). Input that is bad by a rule restated here
(independently of the code) must exit 2. The model directories it reads are never modified.
Runs in-process (`gemma_mlx.cli.run`, ~0.1 s a run) and one subprocess run; ~40-60 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_chat_model import write_model

from gemma_mlx.cli import run

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same cases on every run: CI failures reproduce
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model directory, and a check that nothing modified it by the end."""
    directory = write_model(tmp_path_factory.mktemp("fuzz") / "model")
    before = tree_digest(directory)
    yield directory
    assert tree_digest(directory) == before


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_cli(argv: list[str], stdin: bytes = b"") -> tuple[int, str]:
    """(exit status, stderr) of `gemma-mlx argv` with `stdin`, in this process."""
    err = io.StringIO()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                status = run(argv)
            except SystemExit as e:  # argparse's own errors
                status = e.code
    finally:
        sys.stdin = saved
    return status, err.getvalue()


@contextlib.contextmanager
def working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def check_outcome(status: int, err: str, bad: bool, chat: bool = False) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    assert status in (0, 2), err
    if bad:
        assert status == 2, err
    if status == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("gemma-mlx: error: "), err
        if not chat:  # the REPL prints a banner (and per-turn errors) before
            assert len(lines) == 1, err


# options and prompts ---------------------------------------------------------------------------

JUNK = st.sampled_from(["", "abc", "nan", "inf", "-inf", "1e400", "0x10", "1_0", " 3", "--", "-"])
FLOATS = st.one_of(st.floats(-5, 5), st.floats(allow_nan=True, allow_infinity=True), JUNK)
INTEGERS = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), JUNK)
# What argv holds for undecodable bytes: Python decodes them with surrogateescape.
ARGV_TEXT = st.one_of(
    st.text(max_size=20), st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
)
VALUED = {
    "--temp": FLOATS, "--top-p": FLOATS, "--min-p": FLOATS, "--repetition-penalty": FLOATS,
    "--top-k": INTEGERS, "--repetition-context-size": INTEGERS, "--prefill-step-size": INTEGERS,
    "--seed": INTEGERS, "--stop": ARGV_TEXT, "--system": ARGV_TEXT,
    "--num-draft": st.one_of(INTEGERS, st.just("auto")),
    "--draft-model": st.sampled_from(["prompt-lookup", "auto", "/no/such/model", ""]),
    "--thinking": st.sampled_from(["show", "hide", "maybe"]),
    "--max-tokens": st.one_of(st.integers(-2, 4), st.just(str(2**70)), JUNK),
}  # fmt: skip
SWITCHES = ["--no-chat-template", "--use-chat-template", "--think", "--verbose", "--bogus"]


@st.composite
def command_lines(draw):
    """(argv without --model, stdin bytes)."""
    argv = []
    for flag in draw(st.lists(st.sampled_from(sorted(VALUED)), max_size=5)):
        argv += [flag, str(draw(VALUED[flag]))]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    stdin = b""
    prompt = draw(st.sampled_from(["text", "stdin", "none"]))
    if prompt == "text":
        argv += ["-p", draw(ARGV_TEXT)]
    elif prompt == "stdin":
        argv += ["-p", "-"]
        stdin = draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode)))
    if "-m" not in argv and "--max-tokens" not in argv:
        argv += ["-m", "3"]
    return argv, stdin


def value_of(argv: list[str], flag: str) -> str | None:
    """The last value given for `flag` (argparse keeps the last)."""
    found = None
    for i, item in enumerate(argv[:-1]):
        if item == flag:
            found = argv[i + 1]
    return found


def as_number(text: str | None, kind: type) -> float | int | None:
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def known_bad(argv: list[str], stdin: bytes) -> bool:
    """Input that the rules of `gemma-mlx --help` refuse, restated without the code's help."""
    seed = as_number(value_of(argv, "--seed"), int)
    temp = as_number(value_of(argv, "--temp"), float)
    tokens = as_number(value_of(argv, "--max-tokens") or value_of(argv, "-m"), int)
    prompt = value_of(argv, "-p")
    try:
        stdin.decode("utf-8")
        stdin_ok = True
    except UnicodeDecodeError:
        stdin_ok = False
    return (
        "--bogus" in argv
        or (seed is not None and not 0 <= seed < 2**64)
        or (temp is not None and not (temp >= 0 and math.isfinite(temp)))
        or (tokens is not None and tokens < 1)
        or (prompt == "-" and not stdin_ok)
        or (prompt not in (None, "-") and any(0xD800 <= ord(c) <= 0xDFFF for c in prompt))
    )


@settings(FUZZ, max_examples=120)
@given(case=command_lines())
def test_options_and_prompts(source, case):
    argv, stdin = case
    status, err = run_cli(["--model", str(source), *argv], stdin)
    check_outcome(status, err, known_bad(argv, stdin))


@settings(FUZZ, max_examples=25)
@given(lines=st.lists(st.one_of(st.binary(max_size=20), st.just(b"/save")), max_size=4))
def test_chat_repl_lines(source, lines):
    """The REPL reads random bytes line by line; bad lines are errors, the session goes on."""
    stdin = b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n"
    with tempfile.TemporaryDirectory() as tmp, working_directory(tmp):  # where a /save X writes
        status, err = run_cli(["--model", str(source), "--chat", "-m", "2"], stdin)
    check_outcome(status, err, bad=False, chat=True)
    assert status == 0, err


# damaged model directories ----------------------------------------------------------------------

JSON_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
FILES = [*JSON_FILES, "model.safetensors"]


def json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6),
    json_containers,
    max_leaves=6,
)


@st.composite
def damages(draw):
    """A description of one damage, as (kind, file, parameters)."""
    kind = draw(st.sampled_from(["truncate", "flip", "json", "header", "index"]))
    if kind == "truncate":
        return kind, draw(st.sampled_from(FILES)), draw(st.floats(0, 0.999))
    if kind == "flip":
        return (
            kind,
            draw(st.sampled_from(FILES)),
            (draw(st.floats(0, 0.999)), draw(st.integers(0, 7))),
        )
    if kind == "json":
        key = draw(st.one_of(st.none(), st.integers(0, 40)))  # None: the whole document
        return (
            kind,
            draw(st.sampled_from(JSON_FILES)),
            (key, draw(st.booleans()), draw(JSON_VALUES)),
        )
    if kind == "header":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        return kind, "model.safetensors", (draw(st.integers(0, 40)), field, draw(JSON_VALUES))
    return (
        kind,
        "model.safetensors.index.json",
        draw(st.one_of(JSON_VALUES, st.just({"weight_map": {"x": "model.safetensors"}}))),
    )


def damage(directory: Path, kind: str, name: str, parameters) -> None:
    path = directory / name
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[: int(parameters * path.stat().st_size)])
    elif kind == "flip":
        where, bit = parameters
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= 1 << bit
        path.write_bytes(bytes(data))
    elif kind == "json":
        key, delete, value = parameters
        document = json.loads(path.read_text())
        if key is None:
            document = value
        else:
            key = sorted(document)[key % len(document)]
            if delete:
                del document[key]
            else:
                document[key] = value
        path.write_text(json.dumps(document))
    elif kind == "header":
        tensor, field, value = parameters
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        names = sorted(k for k in header if k != "__metadata__")
        name = names[tensor % len(names)]
        if field is None:
            header[name] = value
        else:
            header[name][field] = value
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    else:
        path.write_text(json.dumps(parameters))


@settings(FUZZ, max_examples=150)
@given(harm=damages(), as_draft=st.booleans())
def test_damaged_model_directories(source, harm, as_draft):
    with tempfile.TemporaryDirectory() as tmp:
        damaged = Path(tmp) / "model"
        shutil.copytree(source, damaged)
        damage(damaged, *harm)
        before = tree_digest(damaged)
        model = ["--model", str(source), "--draft-model"] if as_draft else ["--model"]
        status, err = run_cli([*model, str(damaged), "-p", "the capital of", "-m", "2"])
        check_outcome(status, err, bad=False)
        if status == 2:
            assert str(damaged) in err or "chat template" in err, err  # names the file
        assert tree_digest(damaged) == before


# a run as a user starts it -----------------------------------------------------------------


def test_subprocess_run(source):
    """`python -m gemma_mlx.generate` with undecodable bytes on its real stdin (the damaged-model
    case runs as a subprocess in test_cli.py)."""
    undecodable = subprocess.run(
        [sys.executable, "-m", "gemma_mlx.generate", "--model", str(source), "-p", "-"],
        input=b"\xc3\x28 caf\xe9", capture_output=True, timeout=300,
    )  # fmt: skip
    assert undecodable.returncode == 2
    assert undecodable.stderr.decode() == (
        "gemma-mlx: error: the prompt on stdin is not valid UTF-8 (byte 0xc3 at offset 0)\n"
    )
