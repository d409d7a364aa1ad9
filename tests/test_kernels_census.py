"""Kernels per decoded token, composed-MLX path vs kernel path, as each would dispatch on Metal:
a 26B-A4B-shaped MoE block (128 experts, top 8) and one speculative verify (K = 3 drafts over a
262,144-token vocabulary). Graphs are traced on the CPU (`benchmarks.graph`); the kernel path's
launches are stand-in nodes (`gemma_mlx.kernels.trace`). Views are not kernels."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # `benchmarks` lives beside the package

from benchmarks.graph import STAND_IN, VIEWS, export, metal_fast_ops, reachable, short_name
from gemma_mlx.kernels import verify
from gemma_mlx.kernels.trace import kernel_path
from gemma_mlx.models import gemma4

EXPERTS, TOP_K, VOCAB, DRAFTS = 128, 8, 262_144, 3


def kernels_of(output: mx.array) -> Counter[str]:
    graph = export({"output": output})
    names = Counter(short_name(graph.labels[p]) for p in reachable(graph, ["output"]))
    return Counter({name: n for name, n in names.items() if name not in VIEWS})


def moe_block() -> tuple[gemma4.Router, gemma4.Experts, mx.array]:
    """The 26B-A4B MoE block's structure (experts, top-k, 4-bit experts), narrow widths."""
    config = {"hidden_size": 64, "num_experts": EXPERTS, "top_k_experts": TOP_K}
    args = type("Args", (), {**config, "rms_norm_eps": 1e-6, "moe_intermediate_size": 32})
    router, experts = gemma4.Router(args), gemma4.Experts(args)
    nn.quantize(experts, group_size=32, bits=4)
    h = mx.random.normal((1, 1, 64))
    mx.eval(router.parameters(), experts.parameters(), h)
    return router, experts, h


def moe_kernels(router, experts, h) -> Counter[str]:
    with metal_fast_ops() as fused:
        weights, ids = router(h)
        counts = kernels_of(experts(h, ids, weights))
    counts[STAND_IN] -= sum(fused.values())
    return +(counts + fused)


def test_kernel_path_launches_fewer_kernels(capsys):
    router, experts, h = moe_block()
    reference = moe_kernels(router, experts, h)
    with kernel_path() as launches:
        kernels = moe_kernels(router, experts, h)
    assert launches == {"moe_route": 1, "moe_dispatch": 1}
    assert kernels[STAND_IN] == 2  # the two kernels, each one node
    assert sum(kernels.values()) < sum(reference.values())
    assert "ArgSort" in reference and "ArgSort" not in kernels

    logits = mx.random.normal((DRAFTS + 1, VOCAB))
    drafts = mx.zeros((DRAFTS,), mx.int32)
    mx.eval(logits, drafts)
    verify_reference = kernels_of(mx.stack(verify.verify_greedy_reference(logits, drafts)))
    with kernel_path():
        verify_kernels = kernels_of(mx.stack(verify.verify_greedy(logits, drafts)))
    assert sum(verify_kernels.values()) < sum(verify_reference.values())

    probs = mx.softmax(logits, axis=-1)
    draft_probs, uniforms = probs[:DRAFTS] ** 2, mx.full((DRAFTS + 1,), 0.5)
    mx.eval(probs, draft_probs, uniforms)
    sampling = (probs, draft_probs, drafts, uniforms)
    sampling_reference = kernels_of(mx.stack(verify.verify_sampling_reference(*sampling)))
    with kernel_path():
        sampling_kernels = kernels_of(mx.stack(verify.verify_sampling(*sampling)))
    assert sum(sampling_kernels.values()) < sum(sampling_reference.values())

    with capsys.disabled():
        for what, a, b in (
            ("MoE block, 1 token", reference, kernels),
            ("greedy verify, K = 3", verify_reference, verify_kernels),
            ("sampling verify, K = 3", sampling_reference, sampling_kernels),
        ):
            print(
                f"\n{what}: {sum(a.values())} -> {sum(b.values())} kernels\n  composed {dict(a)}"
                f"\n  kernel   {dict(b)}"
            )


@pytest.mark.parametrize("k", [1, 8])
def test_trace_counts_one_launch_per_call(k):
    with kernel_path() as launches:
        verify.verify_greedy(mx.zeros((k + 1, 100)), mx.zeros((k,), mx.int32))
    assert launches == {"verify_greedy": 1}
