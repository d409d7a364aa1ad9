"""Choosing between a kernel and its reference: the fallback on a build error or a failed
self-check, `GEMMA_MLX_KERNELS`, and the kernels inside the model and the speculative loop."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import pytest
from speculative_helpers import noisy_copy, random_target

from gemma_mlx.drafters import ModelDrafter
from gemma_mlx.kernels import moe, verify
from gemma_mlx.kernels.backend import ENV, KernelFallbackWarning, kernel_mode, use_kernel_factory
from gemma_mlx.speculative import speculative_tokens


def route_inputs(seed: int = 0):
    key = mx.random.key(seed)
    return mx.random.normal((3, 16), key=key), mx.random.uniform(0.5, 2.0, (16,), key=key), 4


def broken_source(emulator):
    """A factory whose kernels do not compile (a builtin the emulator, like Metal, lacks)."""

    def factory(**kwargs):
        kwargs["source"] += "\nundefined_metal_builtin();\n"
        return emulator.metal_kernel(**kwargs)

    return factory


def wrong_results(emulator):
    """A factory whose kernels build and run but return other expert ids."""

    def factory(**kwargs):
        kernel = emulator.metal_kernel(**kwargs)
        return lambda **call: [out[..., ::-1] for out in kernel(**call)]

    return factory


@pytest.mark.parametrize("make_factory", [broken_source, wrong_results], ids=["build", "check"])
def test_failed_kernel_warns_once_and_matches_reference(emulator, make_factory):
    args = route_inputs()
    want = moe.route_reference(*args)
    with (
        use_kernel_factory(make_factory(emulator), mode="auto"),
        pytest.warns(KernelFallbackWarning, match="moe.route") as caught,
    ):
        got = [moe.route(*args), moe.route(*route_inputs(1)), moe.route(*args)]
    assert len(caught) == 1
    for weights, ids in (got[0], got[2]):
        assert mx.array_equal(weights, want[0]).item() and mx.array_equal(ids, want[1]).item()


def test_self_check_passes_silently_and_runs_once(emulator):
    args = route_inputs()
    with use_kernel_factory(emulator.metal_kernel, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        before = emulator.launches
        moe.route(*args)
        moe.route(*args)
    assert emulator.launches - before == 3  # one self-check, then one launch per call


def test_modes(emulator, monkeypatch):
    args = route_inputs()
    want = moe.route_reference(*args)
    monkeypatch.setenv(ENV, "off")
    with use_kernel_factory(broken_source(emulator)), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        _, ids = moe.route(*args)  # off: the kernel is never built
    assert mx.array_equal(ids, want[1]).item()
    monkeypatch.setenv(ENV, "check")
    with use_kernel_factory(wrong_results(emulator)), pytest.warns(KernelFallbackWarning):
        _, ids = moe.route(*args)  # check: compared, the reference returned
    assert mx.array_equal(ids, want[1]).item()
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match=f"{ENV}='sometimes'"):
        kernel_mode()


def test_no_metal_runs_the_reference():
    """This machine has no Metal: the entry points are the references, with no kernel built."""
    assert not mx.metal.is_available()
    args = route_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ids = moe.route(*args)
    assert mx.array_equal(ids, moe.route_reference(*args)[1]).item()


def as_on_a_mac(emulator, call: Callable):
    """`call()` on the emulated kernels in `auto` mode (self-checked first) with a fallback an
    error; returns its evaluated result and the kernel launches, by name."""
    launched: Counter[str] = Counter()

    def counting(**kwargs):
        kernel = emulator.metal_kernel(**kwargs)

        def launch(**call_args):
            launched[kwargs["name"]] += 1
            return kernel(**call_args)

        return launch

    with use_kernel_factory(counting, mode="auto"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        result = call()
        mx.eval(result)
    return result, launched


def on_kernels(emulator, run: Callable[[], list[int]]) -> Counter[str]:
    """Run `run` on the reference path, then on the emulated kernels as on a Mac; assert both
    give the same tokens; the kernel launches, by name."""
    want = run()
    got, launched = as_on_a_mac(emulator, run)
    assert got == want
    return launched


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_loop_on_kernels(emulator, temperature):
    """A MoE target drafting with a noisy copy of itself: the loop and the model launch the route,
    dispatch and verify kernels (self-checked, as on a Mac) and emit the reference path's tokens."""
    target = random_target("26b-a4b")
    drafter_model = noisy_copy(target, 0.1)
    prompt = np.random.default_rng(0).integers(1, target.args.vocab_size, 12).tolist()

    def run() -> list[int]:
        mx.random.seed(7)
        cache = target.make_cache(max_trim=8)
        steps = speculative_tokens(
            target,
            prompt,
            cache,
            ModelDrafter(drafter_model),
            num_draft=3,
            temperature=temperature,
            max_tokens=24,
        )
        return [s.token for s in steps]

    launched = on_kernels(emulator, run)
    verify_kernel = "verify_greedy" if temperature == 0 else "verify_sampling"
    verify_kernels = {verify_kernel + "_chunks", verify_kernel}
    # the drafter's single-token steps run the fused layer kernels
    layer_kernels = {"projection", "projection_geglu", "residual_norm", "head_norm_rope"}
    layer_kernels |= {"moe_residual", "attention_chunks", "attention_combine"}
    assert set(launched) == {"moe_route", "moe_dispatch"} | verify_kernels | layer_kernels


# Mistakes planted in the sampling verify's source, each of which its self-check must catch.
PLANTED = {
    # sample from p instead of the residual max(p - q, 0) after a rejection
    "p, not the residual": (
        "const bool plain = !(residual_total > 0.0f);",
        "const bool plain = true;",
    ),
    # accept a draft while u * p < q instead of u * q < p
    "acceptance swapped": ("float(uniforms[n]) * q < p", "float(uniforms[n]) * p < q"),
    # the chunk's running sums start from 0 instead of the sum before the chunk
    "threshold not shifted": ("threshold - shared_start[0]", "threshold"),
    # launch 1 sums p where the residual is meant: launch 2 picks the wrong chunk
    "chunk sums of p": (
        "residual += residual_weight(p, q);",
        "residual += residual_weight(p, 0.0f);",
    ),
}


def planted(emulator, mistake: str, planted_in: list[str]):
    """The emulator, with `mistake` planted in the kernels whose source has the line to change
    (their names go to `planted_in`)."""
    old, new = PLANTED[mistake]

    def factory(**kwargs):
        if old in kwargs["header"] + kwargs["source"]:
            planted_in.append(kwargs["name"])
            kwargs["header"] = kwargs["header"].replace(old, new)
            kwargs["source"] = kwargs["source"].replace(old, new)
        return emulator.metal_kernel(**kwargs)

    return factory


@pytest.mark.parametrize("mistake", PLANTED)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "one-hot"])
def test_sampling_self_check_catches_planted_mistakes(emulator, mistake, sampled):
    """The self-check tests correctness, not summation order: a correct kernel passes it (see
    test_kernels_verify.py), each of these wrong ones fails it and the reference runs."""
    K, V = 3, 40_000
    target = mx.softmax(mx.random.normal((K + 1, V), key=mx.random.key(1)), axis=-1)
    draft = mx.softmax(mx.random.normal((K, V), key=mx.random.key(2)), axis=-1) if sampled else None
    args = (target, draft, mx.array([1, 2, 3], mx.int32), mx.array([0.5, 0.5, 0.5, 0.5]))
    planted_in: list[str] = []
    with (
        use_kernel_factory(planted(emulator, mistake, planted_in), mode="auto"),
        pytest.warns(KernelFallbackWarning, match="verify.sampling") as caught,
    ):
        n, token = verify.verify_sampling(*args)
    assert planted_in and len(caught) == 1
    assert "failed to build or run" not in str(caught[0].message)  # the check caught it
    want = verify.verify_sampling_reference(*args)
    assert (n.item(), token.item()) == (want[0].item(), want[1].item())
