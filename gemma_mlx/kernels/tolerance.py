"""How close a fused layer kernel's floats must come to its reference's.

A fused kernel keeps float32 where the composed MLX ops round to the model's dtype in between
(scores, a matrix product's sum order, a norm's sum of squares), so its results may differ by a
few units in the last place of that dtype; a wrong row, group, scale or position differs by the
values themselves. The comparison is normwise: |kernel - reference| <= tolerance * max|reference|
over each output, for the dtype the outputs are rounded to.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

# A few units in the last place of the largest output: float32 2^-23 (order of summation over
# thousands of terms), float16 2^-10, bfloat16 2^-7.
NORMWISE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}


def normwise_mismatch(
    got: mx.array | Sequence[mx.array],
    want: mx.array | Sequence[mx.array],
    dtype: mx.Dtype,
    extra: float = 0.0,
) -> str | None:
    """Why `got` is not `want` to `NORMWISE[dtype]` (plus `extra`, for what an operation's own
    float32 arithmetic leaves open), or None."""
    got = (got,) if isinstance(got, mx.array) else tuple(got)
    want = (want,) if isinstance(want, mx.array) else tuple(want)
    tolerance = NORMWISE[dtype] + extra
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            return f"output {i} has shape {a.shape}, the reference {b.shape}"
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        if not (mx.isfinite(a).all() and mx.isfinite(b).all()).item():
            return f"output {i} or its reference holds a NaN or an infinity"
        error = mx.abs(a - b).max().item()
        scale = mx.abs(b).max().item()
        if error > tolerance * max(scale, 1e-30):
            return (
                f"output {i} differs from the reference by {error:.3g} "
                f"(max |reference| {scale:.3g}, tolerance {tolerance:g} of it)"
            )
    return None
