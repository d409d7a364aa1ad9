"""Count host synchronizations: the points where Python waits for the device.

`mx.eval`, `mx.synchronize`, `array.item()`, `array.tolist()` and `int()`/`float()`/`bool()` of an
array block until the graph behind them has run; `mx.async_eval` only submits it. On Metal every blocking call is a round trip between CPU
and GPU, so a decode loop should make one per token (to read the sampled token) and submit the
next step before it waits (pipelining).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps

import mlx.core as mx

BLOCKING = (
    ("eval", mx),
    ("synchronize", mx),
    ("item", mx.array),
    ("tolist", mx.array),
    ("__int__", mx.array),
    ("__float__", mx.array),
    ("__bool__", mx.array),
)
SUBMITTING = (("async_eval", mx),)


@contextmanager
def count_syncs() -> Iterator[Counter[str]]:
    """Counts calls by name ("eval", "item", ..., "async_eval") while the context is open."""
    counts: Counter[str] = Counter()
    originals = [(owner, name, getattr(owner, name)) for name, owner in BLOCKING + SUBMITTING]

    def counting(name, function):
        @wraps(function)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for owner, name, function in originals:
        setattr(owner, name, counting(name, function))
    try:
        yield counts
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def blocking(counts: Counter[str]) -> int:
    return sum(counts[name] for name, _ in BLOCKING)
