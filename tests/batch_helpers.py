"""Shared pieces of the batching tests: a byte-level tokenizer for the tiny random targets, and
the solo reference every batched output is compared with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.tiny_model import write_byte_tokenizer
from gemma_mlx.generate import stream_generate
from gemma_mlx.tokenizer import load_tokenizer


def byte_tokenizer(directory: Path, vocab_size: int):
    """`gemma_mlx`'s tokenizer over bytes (id 1 is the end of turn: random models emit it now and
    then, which ends sequences at different steps)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_byte_tokenizer(directory / "tokenizer.json", vocab_size)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(directory)


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of random ids (no specials) with lengths drawn from [lo, hi]."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(5, vocab, int(k)).tolist() for k in rng.integers(*lengths, n, endpoint=True)
    ]


def solo_tokens(model, tokenizer, prompt, max_tokens: int, **options) -> list[int]:
    """The reference: the request alone through `stream_generate`."""
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens, **options)]


def first_difference(got: list[int], expected: list[int]) -> int | None:
    """Index of the first differing token (or of the first missing or extra one), None if equal."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return i
    return None if len(got) == len(expected) else min(len(got), len(expected))
