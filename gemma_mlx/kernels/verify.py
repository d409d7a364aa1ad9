"""Speculative verify in one kernel (`metal/verify_greedy.metal`, `metal/verify_sampling.metal`).

A round's verify reduces target rows [K+1, V] over a 262k vocabulary to two integers (drafts
accepted, next token); the kernel does it in one launch so the round's single host sync reads a
few integers. The composed-MLX references below run on other backends and are the kernels'
oracle (the self-check on first use, and the emulator tests).
"""

from __future__ import annotations

import mlx.core as mx

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch, placeholder, whole_groups

SIMD_WIDTH = 32
MAX_THREADS = 1024
ENTRIES_PER_THREAD = 16

GREEDY = KernelSpec("verify_greedy", ("logits", "drafts"), ("result",), "verify_greedy.metal")
SAMPLING = KernelSpec(
    "verify_sampling",
    ("target", "draft", "drafts", "uniforms"),
    ("result",),
    "verify_sampling.metal",
    headers=("select.h", "verify.h"),
)


def threads_for(vocab: int) -> int:
    """One threadgroup, at least ENTRIES_PER_THREAD vocabulary entries per thread: 1024 threads for
    a real vocabulary, one SIMD-group for a toy one."""
    wanted = whole_groups(-(-vocab // ENTRIES_PER_THREAD), SIMD_WIDTH)
    return min(max(wanted, SIMD_WIDTH), MAX_THREADS)


def _launch(inputs: tuple, vocab: int, template: tuple = ()) -> Launch:
    threads = threads_for(vocab)
    return Launch(
        inputs=inputs,
        grid=(threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=((2,),),
        output_dtypes=(mx.int32,),
        template=(("TG", threads), *template),
    )


def greedy_launch(logits: mx.array, drafts: mx.array) -> Launch:
    return _launch((logits, drafts), logits.shape[1])


def sampling_launch(
    target_probs: mx.array, draft_probs: mx.array | None, drafts: mx.array, uniforms: mx.array
) -> Launch:
    draft = placeholder() if draft_probs is None else draft_probs
    return _launch(
        (target_probs, draft, drafts, uniforms),
        target_probs.shape[1],
        (("HAS_DRAFT_PROBS", draft_probs is not None),),
    )


def _pair(result: mx.array) -> tuple[mx.array, mx.array]:
    """The kernel's [2] output as two scalars, by views (an integer index would be a gather)."""
    return result[:1].reshape(()), result[1:].reshape(())


# --- the composed-MLX references (other backends, and the kernels' oracle) ------------------


def verify_greedy_reference(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """(number of drafts accepted, the target's token after them) for logits [K+1, V], drafts [K]."""
    best = mx.argmax(logits, axis=-1).astype(mx.int32)
    n = mx.cumprod((best[:-1] == drafts).astype(mx.int32)).sum()
    return n, best[n]


def verify_sampling_reference(
    target_probs: mx.array, draft_probs: mx.array | None, drafts: mx.array, uniforms: mx.array
) -> tuple[mx.array, mx.array]:
    """Leviathan et al.'s rejection sampling for one round; returns (accepted, next token).

    `target_probs` [K+1, V] and `draft_probs` [K, V] (None: deterministic drafts, q = one-hot) are
    the distributions the target would sample from and the drafts were sampled from; `uniforms`
    [K+1] are U[0, 1): the first K decide acceptance (u < p/q), the last samples the next token
    by inverse CDF from the residual norm(max(p - q, 0)), or from p after K acceptances.
    """
    K = drafts.shape[0]
    rows = mx.arange(K)
    p = target_probs[rows, drafts]
    q = mx.ones_like(p) if draft_probs is None else draft_probs[rows, drafts]
    n = mx.cumprod((uniforms[:K] * q < p).astype(mx.int32)).sum()
    row = target_probs[n]
    vocab = mx.arange(row.shape[-1])
    padded = mx.concatenate([drafts, mx.array([-1], mx.int32)])
    if draft_probs is None:
        residual = mx.where(vocab == padded[n], 0.0, row)
    else:
        q_row = mx.concatenate([draft_probs, mx.zeros_like(row)[None]])[n]
        residual = mx.maximum(row - q_row, 0.0)
    total = residual.sum()
    residual, total = mx.where(total > 0, residual, row), mx.where(total > 0, total, row.sum())
    below = mx.cumsum(residual) <= uniforms[K] * total
    token = mx.minimum(below.astype(mx.int32).sum(), row.shape[-1] - 1)
    return n, token


def _greedy_check_args(logits: mx.array, drafts: mx.array) -> tuple:
    """Random logits whose drafts are all accepted, so the check reads every row."""
    check = mx.random.normal(logits.shape, key=CHECK_KEY).astype(logits.dtype)
    return check, mx.argmax(check[:-1], axis=-1).astype(drafts.dtype)


def _sampling_check_args(target_probs, draft_probs, drafts, uniforms) -> tuple:
    keys = mx.random.split(CHECK_KEY, 4)

    def probs(shape, key):
        return mx.softmax(mx.random.normal(shape, key=key), axis=-1).astype(target_probs.dtype)

    vocab = target_probs.shape[1]
    return (
        probs(target_probs.shape, keys[0]),
        None if draft_probs is None else probs(draft_probs.shape, keys[1]),
        mx.random.randint(0, vocab, drafts.shape, key=keys[2]).astype(drafts.dtype),
        mx.random.uniform(shape=uniforms.shape, key=keys[3]),
    )


_greedy = KernelOp(
    "verify.greedy",
    lambda kernels, logits, drafts: _pair(kernels.run(GREEDY, greedy_launch(logits, drafts))[0]),
    verify_greedy_reference,
    instance=lambda logits, drafts: (logits.shape, logits.dtype, drafts.dtype),
    check_args=_greedy_check_args,
)


def _sampling_kernel(kernels: Kernels, *args) -> tuple[mx.array, mx.array]:
    return _pair(kernels.run(SAMPLING, sampling_launch(*args))[0])


_sampling = KernelOp(
    "verify.sampling",
    _sampling_kernel,
    verify_sampling_reference,
    instance=lambda target, draft, drafts, uniforms: (
        target.shape,
        target.dtype,
        None if draft is None else draft.dtype,
        drafts.dtype,
        uniforms.dtype,
    ),
    check_args=_sampling_check_args,
)


def verify_greedy(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """(drafts accepted, the target's token after them) for logits [K+1, V] and drafts [K]."""
    _check_shapes(logits, drafts)
    if drafts.shape[0] == 0:
        return verify_greedy_reference(logits, drafts)
    return _greedy(logits, drafts)


def verify_sampling(
    target_probs: mx.array, draft_probs: mx.array | None, drafts: mx.array, uniforms: mx.array
) -> tuple[mx.array, mx.array]:
    """(drafts accepted, next token) by rejection sampling: `target_probs` [K+1, V], `draft_probs`
    [K, V] or None (deterministic drafts), `drafts` [K], `uniforms` [K+1] in [0, 1)."""
    _check_shapes(target_probs, drafts)
    K = drafts.shape[0]
    if draft_probs is not None and draft_probs.shape != (K, target_probs.shape[1]):
        raise ValueError(
            f"verify: draft_probs has shape {draft_probs.shape}, expected {(K, target_probs.shape[1])}"
        )
    if uniforms.shape != (K + 1,):
        raise ValueError(f"verify: uniforms has shape {uniforms.shape}, expected {(K + 1,)}")
    if K == 0:
        return verify_sampling_reference(target_probs, draft_probs, drafts, uniforms)
    return _sampling(target_probs, draft_probs, drafts, uniforms)


def _check_shapes(rows: mx.array, drafts: mx.array) -> None:
    if rows.ndim != 2 or drafts.ndim != 1 or rows.shape[0] != drafts.shape[0] + 1:
        raise ValueError(
            f"verify: expected target rows [K+1, V] and drafts [K], got {rows.shape} and "
            f"{drafts.shape}"
        )
