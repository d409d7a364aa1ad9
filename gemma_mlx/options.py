"""Type and range checks for option values, shared by the Python API and the command line.

A wrong value raises an `OptionError` (a wrong type an `OptionTypeError`, also a `TypeError`)
naming the option, instead of a TypeError from deep inside MLX or, worse, a silently wrong result.
Each check returns the value as the plain Python type the code below it expects.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from gemma_mlx.errors import OptionError, OptionTypeError

# MLX random keys are made from unsigned 64-bit seeds.
SEED_LIMIT = 2**64


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (bools are not numbers here), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionTypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise OptionError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(name: str, value: Any, finite: bool = True) -> float:
    """`value` as a float; NaN, and with `finite` also an infinity, is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise OptionError(f"{name} must be a finite number, got {value}")
    return value


def check_seed(value: Any, name: str = "seed") -> int | None:
    """None (a fresh random seed) or an integer in [0, 2**64)."""
    if value is None:
        return None
    seed = check_int(name, value, minimum=0)
    if seed >= SEED_LIMIT:
        raise OptionError(f"{name} must be below 2**64, got {seed}")
    return seed


def check_text(name: str, value: Any) -> str:
    """A str that can be encoded as UTF-8 (no lone surrogates, which arrive from undecodable bytes
    in command-line arguments)."""
    if not isinstance(value, str):
        raise OptionTypeError(f"{name} must be a string, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OptionError(
            f"{name} is not valid text: {value[e.start]!r} at position {e.start} is not a "
            "Unicode character (undecodable bytes? the text must be UTF-8)"
        ) from e
    return value


def check_callable(name: str, value: Any) -> Any:
    """None or a callable."""
    if value is not None and not callable(value):
        raise OptionTypeError(f"{name} must be callable, got {value!r}")
    return value
