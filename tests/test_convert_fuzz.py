"""Fuzzing the converter with damaged copies of a tiny GGUF and a tiny safetensors directory
(truncation, flipped bytes, wrong types in JSON): it never prints a traceback, exits 2 for bad
input (or converts what is still a valid checkpoint), never modifies the source and never leaves
staging behind."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from convert_sources import digest, run_converter, staging_leftovers, tiny_gguf, tiny_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_mlx.loading import build_and_check

# Bounded: about 20 s per source kind on two cores.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf"))


@pytest.fixture(scope="module")
def directory_source(tmp_path_factory):
    directory = tiny_safetensors(tmp_path_factory.mktemp("fuzz-st") / "model")
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "numpy") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@st.composite
def byte_damage(draw, size: int):
    """A function that damages bytes: truncation, or 1-8 flipped bytes."""
    if draw(st.booleans()):
        end = draw(st.integers(0, size - 1))
        return lambda raw: raw[:end]
    flips = draw(
        st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=8)
    )

    def flip(raw: bytes) -> bytes:
        data = bytearray(raw)
        for offset, mask in flips:
            data[offset] ^= mask
        return bytes(data)

    return flip


@st.composite
def json_damage(draw):
    """A function that damages a JSON object: a value replaced by one of another type, a key
    removed, or the whole object replaced."""
    kind = draw(st.sampled_from(["replace", "remove", "whole"]))
    choice, value = draw(st.integers(0, 10**6)), draw(JSON_VALUES)

    def damage(obj):
        if kind == "whole" or not isinstance(obj, dict) or not obj:
            return value
        key = sorted(obj)[choice % len(obj)]
        return {k: v for k, v in obj.items() if k != key} | (
            {} if kind == "remove" else {key: value}
        )

    return damage


def check_run(source: Path, work: Path) -> None:
    """Convert `source`: exit 2 with one line, or 0 with a complete output; source untouched."""
    before = digest(source)
    out = work / "out"
    status, err = run_converter(source, "-o", out, "--no-progress")
    assert "Traceback" not in err, err
    if status == 0:  # still a valid checkpoint (e.g. flipped weight bytes): a complete output
        build_and_check(out)
    else:
        assert status == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert digest(source) == before
    assert staging_leftovers(work) == []


@FUZZ
@given(data=st.data())
def test_damaged_gguf(gguf_source, data):
    raw = gguf_source.read_bytes()
    damage = data.draw(byte_damage(len(raw)))
    with tempfile.TemporaryDirectory() as work:
        damaged = Path(work) / "damaged.gguf"
        damaged.write_bytes(damage(raw))
        check_run(damaged, Path(work))


DAMAGEABLE = ["model.safetensors", "config.json", "model.safetensors.index.json", "tokenizer.json"]


@FUZZ
@given(data=st.data())
def test_damaged_safetensors_directory(directory_source, data):
    name = data.draw(st.sampled_from(DAMAGEABLE))
    with tempfile.TemporaryDirectory() as work:
        damaged = Path(work) / "model"
        shutil.copytree(directory_source, damaged)
        path = damaged / name
        if name.endswith(".json") and data.draw(st.booleans()):
            path.write_text(json.dumps(data.draw(json_damage())(json.loads(path.read_text()))))
        else:
            raw = path.read_bytes()
            path.write_bytes(data.draw(byte_damage(len(raw)))(raw))
        check_run(damaged, Path(work))
