"""Speculative verify in two launches each (`metal/verify_*.metal`), and its composed-MLX references.

A round's verify reduces target rows [K+1, V] over a 262k vocabulary to two integers (drafts
accepted, next token), read by the round's single host sync. The composed-MLX references below
run on other backends and are the kernels' oracle (the self-check on first use, the emulator
tests).

Semantics, shared by kernel and reference:
- greedy: a row's token is the lowest id among its largest logits; a NaN logit counts as -inf
  (so NaN never beats a number, and an all-NaN row gives id 0);
- sampling: all probability arithmetic in float32 whatever the inputs' dtype (a bfloat16 running
  sum stalls long before 1 over 262k entries). Draft i is accepted while u_i * q_i < p_i; the
  next token is the first id with a positive weight (max(p - q, 0), or p when that is all 0;
  NaN weighs 0) whose running sum exceeds u_K * total; rounding may leave none, then the last id
  with a positive weight; no positive weight at all gives id 0. So a token of probability 0
  (filtered out by top-k, say) is never drawn. Running sums go chunk by chunk (CHUNK entries):
  the chunk whose running sum first exceeds the threshold, then the id inside it against the
  threshold less the sum before the chunk, which keeps weights far below the total's float32
  resolution apart.

Dtypes: greedy reads logits in the model's dtype (an argmax only compares; the conversion to
float32 is exact). Sampling reads the probabilities it is given and converts each to float32;
the loop gives float32 (`SamplingFilters.distribution`): 1 MiB per 262k row, twice bfloat16's,
i.e. (K+1) MiB written by the softmax and ~2 MiB (rows p_n and q_n) read by the verify, a few
microseconds of a Mac's bandwidth against a forward pass that reads gigabytes of weights.

Launch geometry: launch 1 splits a row into chunks, one threadgroup each, thread t reading
entries i * THREADS + t of its chunk so that adjacent lanes read adjacent entries. Sampling reduces
the one row it samples from (after the accepted drafts) in chunks of CHUNK = 2048 entries: 128
threadgroups for 262,144 entries, the split MLX's own two-pass all-reduce makes, 16 KiB of p and
q each. Greedy reduces all K+1 rows at once, in chunks of 8192: (K+1) * 32 threadgroups of 16-32
KiB. Launch 2, one threadgroup, combines the chunks (greedy: row by row until the first rejected
draft; sampling: picks the chunk, then rescans only it). Metal has no grid-wide barrier, hence
two launches; one threadgroup reading up to 9 rows of 0.5-1 MiB serially would leave all but one
GPU core idle. THREADS = 256: `maxTotalThreadsPerThreadgroup`
cannot be queried through `mx.fast.metal_kernel`; Apple GPUs allow 1024 and lower it per pipeline
only under heavy register or threadgroup-memory use, which these kernels (a few dozen registers,
under 100 bytes of threadgroup memory) do not have; 256 leaves a 4x margin.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .backend import CHECK_KEY, KernelOp
from .spec import Kernels, KernelSpec, Launch, placeholder

SIMD_WIDTH = 32
THREADS = 256
# Vocabulary entries per thread in launch 1 (a chunk: THREADS times as many), see the module doc.
GREEDY_ENTRIES_PER_THREAD = 32
ENTRIES_PER_THREAD = 8
CHUNK = THREADS * ENTRIES_PER_THREAD  # sampling's chunk, also the reference's

HEADERS = ("select.h", "verify.h")
GREEDY_CHUNKS = KernelSpec(
    "verify_greedy_chunks", ("logits",), ("values", "ids"), "verify_greedy_chunks.metal", HEADERS
)
GREEDY = KernelSpec(
    "verify_greedy", ("values", "ids", "drafts"), ("result",), "verify_greedy.metal", HEADERS
)
SAMPLING_INPUTS = ("target", "draft", "drafts", "uniforms")
SAMPLING_CHUNKS = KernelSpec(
    "verify_sampling_chunks",
    SAMPLING_INPUTS,
    ("sums",),
    "verify_sampling_chunks.metal",
    HEADERS,
)
SAMPLING = KernelSpec(
    "verify_sampling", (*SAMPLING_INPUTS, "sums"), ("result",), "verify_sampling.metal", HEADERS
)


def chunks(vocab: int, chunk: int = CHUNK) -> int:
    """Threadgroups per row in launch 1."""
    return -(-vocab // chunk)


# --- launches ---------------------------------------------------------------------------------


def _chunk_launch(
    inputs: tuple, rows: int, vocab: int, per_thread: int, outputs, template: tuple = ()
) -> Launch:
    """Launch 1: one threadgroup per chunk (THREADS * per_thread entries) of each of `rows` rows."""
    return Launch(
        inputs=inputs,
        grid=(chunks(vocab, THREADS * per_thread) * THREADS, rows, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=tuple(shape for shape, _ in outputs),
        output_dtypes=tuple(dtype for _, dtype in outputs),
        template=(("TG", THREADS), ("PER_THREAD", per_thread), *template),
    )


def _combine_launch(inputs: tuple, template: tuple = ()) -> Launch:
    """Launch 2: one threadgroup; result [2] = (accepted, next token)."""
    return Launch(
        inputs=inputs,
        grid=(THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=((2,),),
        output_dtypes=(mx.int32,),
        template=(("TG", THREADS), *template),
    )


def greedy_chunks_launch(logits: mx.array) -> Launch:
    rows, vocab = logits.shape
    per_thread = GREEDY_ENTRIES_PER_THREAD
    shape = (rows, chunks(vocab, THREADS * per_thread))
    outputs = ((shape, mx.float32), (shape, mx.uint32))
    return _chunk_launch((logits,), rows, vocab, per_thread, outputs)


def greedy_launch(values: mx.array, ids: mx.array, drafts: mx.array) -> Launch:
    return _combine_launch((values, ids, drafts))


def _sampling_inputs(target_probs, draft_probs, drafts, uniforms) -> tuple:
    draft = placeholder() if draft_probs is None else draft_probs
    return target_probs, draft, drafts, uniforms


def sampling_chunks_launch(
    target_probs: mx.array, draft_probs: mx.array | None, drafts: mx.array, uniforms: mx.array
) -> Launch:
    vocab = target_probs.shape[1]
    return _chunk_launch(
        _sampling_inputs(target_probs, draft_probs, drafts, uniforms),
        1,
        vocab,
        ENTRIES_PER_THREAD,
        (((2, chunks(vocab)), mx.float32),),
        (("HAS_DRAFT_PROBS", draft_probs is not None),),
    )


def sampling_launch(
    target_probs: mx.array,
    draft_probs: mx.array | None,
    drafts: mx.array,
    uniforms: mx.array,
    sums: mx.array,
) -> Launch:
    return _combine_launch(
        (*_sampling_inputs(target_probs, draft_probs, drafts, uniforms), sums),
        (
            ("PER_THREAD", ENTRIES_PER_THREAD),
            ("CHUNKS_PER_THREAD", -(-sums.shape[1] // THREADS)),
            ("HAS_DRAFT_PROBS", draft_probs is not None),
        ),
    )


def _pair(result: mx.array) -> tuple[mx.array, mx.array]:
    """The kernel's [2] output as two scalars, by views (an integer index would be a gather)."""
    return result[:1].reshape(()), result[1:].reshape(())


def _greedy_kernel(kernels: Kernels, logits: mx.array, drafts: mx.array):
    values, ids = kernels.run(GREEDY_CHUNKS, greedy_chunks_launch(logits))
    return _pair(kernels.run(GREEDY, greedy_launch(values, ids, drafts))[0])


def _sampling_kernel(kernels: Kernels, *args) -> tuple[mx.array, mx.array]:
    (sums,) = kernels.run(SAMPLING_CHUNKS, sampling_chunks_launch(*args))
    return _pair(kernels.run(SAMPLING, sampling_launch(*args, sums))[0])


# --- the composed-MLX references (other backends, and the kernels' oracle) ------------------


def greedy_tokens(logits: mx.array) -> mx.array:
    """Each row's lowest id among its largest logits, NaN counting as -inf: int32 [rows]."""
    return mx.argmax(mx.where(mx.isnan(logits), -mx.inf, logits), axis=-1).astype(mx.int32)


def verify_greedy_reference(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """(number of drafts accepted, the target's token after them) for logits [K+1, V], drafts [K]."""
    best = greedy_tokens(logits)
    n = mx.cumprod((best[:-1] == drafts).astype(mx.int32)).sum()
    return n, best[n]


def _first_or_last(positive: mx.array, above: mx.array) -> mx.array:
    """The first index where both hold, else the last where `positive` holds, else 0."""
    hits = positive & above
    last = mx.where(positive, mx.arange(positive.size), 0).max()
    return mx.where(hits.any(), mx.argmax(hits), last)


def inverse_cdf(weights: mx.array, u: mx.array) -> mx.array:
    """The id that `u` in [0, 1) draws from float32 `weights` [V] >= 0 (module doc), chunk by
    chunk as the kernel does: the chunk, then the id inside it."""
    vocab = weights.shape[0]
    grid = mx.pad(weights, (0, chunks(vocab) * CHUNK - vocab)).reshape(-1, CHUNK)
    sums = grid.sum(axis=1)
    before = mx.cumsum(sums, inclusive=False)
    threshold = u * (before[-1] + sums[-1])
    chunk = _first_or_last(sums > 0, before + sums > threshold)
    row = grid[chunk]
    inside = _first_or_last(row > 0, mx.cumsum(row) > threshold - before[chunk])
    return (chunk * CHUNK + inside).astype(mx.int32)


def verify_sampling_reference(
    target_probs: mx.array, draft_probs: mx.array | None, drafts: mx.array, uniforms: mx.array
) -> tuple[mx.array, mx.array]:
    """Leviathan et al.'s rejection sampling for one round; returns (accepted, next token).

    `target_probs` [K+1, V] and `draft_probs` [K, V] (None: deterministic drafts, q = one-hot) are
    the distributions the target would sample from and the drafts were sampled from, in any float
    dtype (computed in float32); `uniforms` [K+1] are U[0, 1): the first K decide acceptance
    (u < p/q), the last samples the next token from max(p - q, 0), or from p after K acceptances.
    """
    K, vocab = drafts.shape[0], target_probs.shape[1]
    rows = mx.arange(K)
    p = target_probs[rows, drafts].astype(mx.float32)
    q = mx.ones_like(p) if draft_probs is None else draft_probs[rows, drafts].astype(mx.float32)
    n = mx.cumprod((uniforms[:K].astype(mx.float32) * q < p).astype(mx.int32)).sum()
    row = target_probs[n].astype(mx.float32)
    if draft_probs is None:
        rejected = mx.concatenate([drafts, mx.array([-1], mx.int32)])[n]
        q_row = (mx.arange(vocab) == rejected).astype(mx.float32)
    elif K == 0:
        q_row = mx.zeros_like(row)
    else:
        q_row = draft_probs[mx.minimum(n, K - 1)].astype(mx.float32) * (n < K)
    residual = mx.where(row > q_row, row - q_row, 0.0)
    weights = mx.where(residual.sum() > 0, residual, mx.where(row > 0, row, 0.0))
    return n, inverse_cdf(weights, uniforms[K].astype(mx.float32))


# --- self-check: inputs, and what a correct sampling kernel may return -----------------------


def _greedy_check_args(logits: mx.array, drafts: mx.array) -> tuple:
    """Random logits in the caller's shape and dtype, made hard: each row's maximum twice (the
    lower id must win), NaN at id 0 (NaN must not win) and in the last row everywhere but a
    quarter of -inf (NaN and -inf tie: id 0); drafts all accepted, so every row is read."""
    rows, vocab = logits.shape
    ids = mx.arange(vocab)
    x = mx.random.normal(logits.shape, key=CHECK_KEY)
    a, b = mx.random.randint(1, vocab, (2, rows, 1), key=mx.random.split(CHECK_KEY)[1])
    x = mx.where((ids == a) | (ids == b), x.max() + 1, x)
    x = mx.where(ids == 0, mx.nan, x)
    last = mx.where(ids < vocab // 4, -mx.inf, mx.nan)
    x = mx.concatenate([x[:-1], last[None]]).astype(logits.dtype)
    return x, greedy_tokens(x[:-1]).astype(drafts.dtype)


def _sampling_check_args(target_probs, draft_probs, drafts, uniforms) -> tuple:
    """Nearly flat rows (the inverse CDF's hardest case) with a quarter of zeros, in the caller's
    shapes and dtypes; the first K // 2 drafts accepted (u = 0) and the next rejected (q = 1
    there, and p = 0.5 so that the residual differs from p by 40% of the row's mass), so the
    token comes from a residual."""
    keys = mx.random.split(CHECK_KEY, 4)
    (rows, vocab), K = target_probs.shape, drafts.shape[0]
    ids = mx.arange(vocab)
    zeros = (ids >= vocab // 4) & (ids < vocab // 2)

    def probs(shape, key):
        x = mx.softmax(0.1 * mx.random.normal(shape, key=key), axis=-1)
        return mx.where(zeros, 0.0, x)

    chosen = mx.random.randint(0, max(vocab // 4, 1), (K,), key=keys[2])
    rejected = K // 2
    at_rejection = (mx.arange(rows)[:, None] == rejected) & (ids == chosen[rejected])
    target = mx.where(at_rejection, 0.5, probs((rows, vocab), keys[0]))
    draft = None
    if draft_probs is not None:
        draft = probs(draft_probs.shape, keys[1])
        draft = mx.where(at_rejection[:K], 1.0, draft).astype(draft_probs.dtype)
    u = mx.random.uniform(shape=uniforms.shape, key=keys[3])
    u = mx.where(mx.arange(K + 1) < rejected, 0.0, u)
    u = mx.where(mx.arange(K + 1) == rejected, 1.0 - 2.0**-24, u)
    return (
        target.astype(target_probs.dtype),
        draft,
        chosen.astype(drafts.dtype),
        u.astype(uniforms.dtype),
    )


def kernel_cdf_slack(vocab: int) -> float:
    """How far, as a fraction of the total, the sampling kernel's float32 comparison of a running
    sum with u * total can be from the exact one. Each float32 sum of non-negative terms is off by
    at most (additions on a term's path) * 2^-24 of the sum; per term: its chunk's sum (launch
    1: PER_THREAD in a thread, 31 in a SIMD-group in any order, TG/32 across SIMD-groups), the
    scan of chunk sums (the chunks a thread holds, 31, TG/32), the running sum inside the chunk
    (PER_THREAD, 31, TG/32); the threshold and the chunk's start each carry the first two, plus
    one rounding each for u * total, threshold - start and p - q. Doubled as a margin."""
    simd, groups = SIMD_WIDTH - 1, THREADS // SIMD_WIDTH
    chunk_sum = ENTRIES_PER_THREAD + simd + groups
    scan = -(-chunks(vocab) // THREADS) + simd + groups
    inside = ENTRIES_PER_THREAD + simd + groups
    return 2 * (2 * (chunk_sum + scan) + inside + 3) * 2.0**-24


def reference_cdf_slack(vocab: int) -> float:
    """The same bound for `inverse_cdf` with MLX's reductions in any order: a chunk's sum, the
    scan of chunk sums and the running sum inside a chunk of at most CHUNK additions each."""
    return 2 * (2 * (CHUNK + chunks(vocab)) + CHUNK + 3) * 2.0**-24


def _host(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def sampling_problem(args: tuple, result: tuple[mx.array, mx.array], slack: float) -> str | None:
    """Why `result` = (accepted, token) is not a correct round for `args` of `verify_sampling`, or
    None; see `round_problem`, which this runs on the inputs' values in float64."""
    target, draft, drafts, uniforms = args
    return round_problem(
        _host(target),
        None if draft is None else _host(draft),
        np.array(drafts).astype(np.int64),
        _host(uniforms),
        (int(result[0].item()), int(result[1].item())),
        slack,
    )


def round_problem(
    p_all: np.ndarray,
    q_all: np.ndarray | None,
    d: np.ndarray,
    u: np.ndarray,
    result: tuple[int, int],
    slack: float,
) -> str | None:
    """Why `result` is not a correct round for target probabilities p_all [K+1, V], draft ones
    q_all [K, V] (None: one-hot), drafts d [K] and uniforms u [K+1], or None; in float64.

    The accepted count must follow the decisions u * q < p, except where the float32 product may
    round across p (within 2^-23 of it); the token must have a positive weight, and its float64
    cumulative interval must contain u_K * total, widened by `slack` * total."""
    n, token = result
    K, vocab = d.size, p_all.shape[1]
    if not (0 <= n <= K and 0 <= token < vocab):
        return f"returned (accepted {n}, token {token}) for K = {K}, V = {vocab}"
    for i in range(n + 1 if n < K else K):
        p = p_all[i, d[i]]
        uq = u[i] * (1.0 if q_all is None else q_all[i, d[i]])
        if abs(uq - p) <= 2.0**-23 * abs(uq):
            continue  # either outcome is a correct float32 decision
        if (uq < p) != (i < n):
            return f"accepted {n} drafts, but u * q < p decides draft {i} the other way"
    p = p_all[n]
    if n == K:
        q = np.zeros(vocab)
    elif q_all is None:
        q = (np.arange(vocab) == d[n]).astype(np.float64)
    else:
        q = q_all[n]
    weights = np.where(p > q, p - q, 0.0)
    if not weights.sum() > 0:
        weights = np.where(p > 0, p, 0.0)
    if not weights.sum() > 0:
        return None if token == 0 else f"token {token} where no id has weight (id 0 expected)"
    if not weights[token] > 0:
        return f"token {token} has weight 0"
    cumulative = np.cumsum(weights)
    total = cumulative[-1]
    threshold = u[K] * total
    low, high = cumulative[token] - weights[token], cumulative[token]
    if not low - slack * total <= threshold <= high + slack * total:
        return (
            f"token {token} covers [{low / total:.9f}, {high / total:.9f}] of the cumulative "
            f"distribution, u = {u[K]:.9f} is outside by more than {slack:.2e}"
        )
    return None


# --- the operations ---------------------------------------------------------------------------

_greedy = KernelOp(
    "verify.greedy",
    _greedy_kernel,
    verify_greedy_reference,
    instance=lambda logits, drafts: (logits.shape, logits.dtype, drafts.dtype),
    check_args=_greedy_check_args,
)
# Greedy needs no `accepts`: its answer is unique (a strict total order), so it must equal the
# reference's exactly. Sampling's moves with float32 summation order: checked for correctness.
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
    accepts=lambda got, args: sampling_problem(args, got, kernel_cdf_slack(args[0].shape[1])),
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
