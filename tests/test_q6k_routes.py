"""`benchmarks.q6k_routes`, the measurement behind keeping GGUF Q6_K tables as their blocks: the
exact alternative it measures (two 6-bit group-32 halves) is exact, its bits per weight are those
of the arrays each route stores, and its kernel counts are those worked out by hand."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from test_kernels_q6k import random_blocks

from benchmarks import q6k_routes
from benchmarks.configs import GEMMA4
from gemma_mlx.kernels import q6k

BLOCKS, HALVES = "Q6_K blocks (gemma_mlx)", "two 6-bit halves, float32 scales"


def test_halves_hold_the_table_exactly():
    """Each half dequantizes by MLX's own `scale * q + bias` to the even (odd) sub-blocks and +0
    elsewhere; their sum is gguf-py's dequantization, so the route compared is truly exact."""
    rng = np.random.default_rng(0)
    raw = random_blocks(rng, 24, 768, decades=(-7, 1))  # float16 subnormal d included
    exact = quants.dequantize(raw, T.Q6_K)
    halves = q6k_routes.halves(raw)
    parts = [np.asarray(mx.dequantize(w, s, b, group_size=32, bits=6)) for w, s, b in halves]
    sub_blocks = exact.reshape(24, -1, 16)
    for parity, part in enumerate(parts):
        own = part.reshape(24, -1, 16)
        np.testing.assert_array_equal(own[:, parity::2], sub_blocks[:, parity::2])
        assert not own[:, 1 - parity :: 2].any()
    np.testing.assert_array_equal(parts[0] + parts[1], exact)

    ids = mx.array([3, 0, 23, 3])
    np.testing.assert_array_equal(
        np.asarray(q6k_routes.halves_lookup(ids, halves, mx.float32)), exact[np.asarray(ids)]
    )
    x = rng.standard_normal((4, 768)).astype(np.float32)
    product = np.asarray(q6k_routes.halves_product(mx.array(x), halves))
    tolerance = 1e-6 * (np.abs(x) @ np.abs(exact).T)
    assert (np.abs(product - x.astype(np.float64) @ exact.T.astype(np.float64)) <= tolerance).all()


def test_bits_per_weight_are_those_of_the_stored_arrays():
    raw = random_blocks(np.random.default_rng(1), 8, 512)
    weights = raw.shape[0] * q6k.columns(mx.array(raw))
    assert q6k_routes.BITS[BLOCKS] == 8 * raw.nbytes / weights
    stored = sum(a.nbytes for half in q6k_routes.halves(raw) for a in half)
    assert q6k_routes.BITS[HALVES] == 8 * stored / weights

    table = q6k_routes.head_bytes()
    for size, config in GEMMA4.items():
        vocab, width = config["vocab_size"], config["hidden_size"]
        assert table[size][BLOCKS] == vocab * (width // 256) * q6k.BLOCK_BYTES
        assert table[size][HALVES] == 2 * vocab * (width * 6 // 8 + 2 * 4 * width // 32)


def test_kernel_counts_per_decoded_token():
    """Blocks: one launch per head product and per lookup. Halves, by hand: the head is two
    quantized products, each after a cast of the bf16 row to float32 (the scales' dtype), and an
    add (5); the lookup gathers codes, scales and biases of both halves, dequantizes each, adds
    and casts (10). MLX's own kernels serve the halves, so they are the same on both paths."""
    counts = q6k_routes.kernel_counts(1536)
    assert counts["blocks: head"][1] == counts["blocks: lookup"][1] == 1
    assert counts["blocks: head"][0] > counts["blocks: lookup"][0] > 1  # the composed decode
    assert counts["halves: head"] == (5, 5)
    assert counts["halves: lookup"] == (10, 10)


def test_command_prints_every_section(capsys):
    assert q6k_routes.main(["--rows", "64", "--width", "256"]) == 0
    printed = capsys.readouterr().out
    for size in GEMMA4:
        assert f"| {size.upper()} |" in printed
    for what in ("blocks: head", "halves: lookup", "dense float32", "8-bit requantized"):
        assert what in printed
