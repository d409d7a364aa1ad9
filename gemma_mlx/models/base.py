"""Pieces shared by the Gemma architectures: strict config reading, RoPE variants, norms."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.errors import ConfigError
from gemma_mlx.kernels.activations import (  # noqa: F401  (the models' names)
    geglu,
    rms_norm,
    rope,
    softcap,
)

_MISSING = object()


def read(config: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING):
    """`config[key]` checked against `kind`; a missing key without a default is an error.

    Defaults are only ever "feature off" values: a config never switches a feature on silently.
    """
    if key not in config or config[key] is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: required key '{key}' is missing")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind in (int, float):
        raise ConfigError(f"config.json: '{key}' must be {kind.__name__}, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"config.json: '{key}' must be {names}, got {value!r}")
    return value


LAYER_TYPES = ("sliding_attention", "full_attention")


def read_layer_types(config: dict[str, Any], num_layers: int) -> list[str]:
    """`layer_types`, or the 5:1 pattern derived from an explicit `sliding_window_pattern`."""
    if config.get("layer_types") is not None:
        types = read(config, "layer_types", list)
        if len(types) != num_layers:
            raise ConfigError(
                f"config.json: 'layer_types' has {len(types)} entries, "
                f"'num_hidden_layers' is {num_layers}"
            )
        for t in types:
            if t not in LAYER_TYPES:
                raise ConfigError(f"config.json: unknown layer type {t!r} in 'layer_types'")
        return list(types)
    pattern = read(config, "sliding_window_pattern", int)
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


class RoPE(nn.Module):
    """Rotary embedding over the first `rotated` pairs of a head (rotate-half layout).

    `inv_freq[i] = base^(-2i / head_dim)` for i < rotated, 0 beyond (Gemma 4's "proportional"
    RoPE: the exponent's denominator is the full head dim). `scale` multiplies positions
    ("linear" RoPE scaling uses 1/factor).
    """

    def __init__(self, head_dim: int, base: float, rotated: int | None = None, scale: float = 1.0):
        super().__init__()
        rotated = head_dim // 2 if rotated is None else rotated
        self.head_dim = head_dim
        self.scale = scale
        if rotated == head_dim // 2:
            self.base, self._freqs = base, None
        else:
            # mx.fast.rope takes wavelengths; an infinite wavelength leaves the pair unrotated.
            exponents = mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / head_dim
            wavelengths = mx.power(mx.array(base, mx.float32), exponents)
            pad = mx.full((head_dim // 2 - rotated,), math.inf, mx.float32)
            self.base, self._freqs = None, mx.concatenate([wavelengths, pad])

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return rope(x, self.head_dim, self.base, self.scale, offset, self._freqs)


def make_rope(params: dict[str, Any], head_dim: int, where: str) -> RoPE:
    """Build a RoPE from one `rope_parameters` entry (types: default, linear, proportional)."""
    rope_type = params.get("rope_type", "default")
    base = read(params, "rope_theta", float)
    factor = float(params.get("factor", 1.0))
    if rope_type == "default":
        return RoPE(head_dim, base)
    if rope_type == "linear":
        return RoPE(head_dim, base, scale=1.0 / factor)
    if rope_type == "proportional":
        rotated = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        return RoPE(head_dim, base, rotated=rotated, scale=1.0 / factor)
    raise ConfigError(f"config.json: unsupported rope_type {rope_type!r} in {where}")


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. Gemma 1-3 scale by (1 + w); Gemma 4 by w; `weight=False`: none."""

    def __init__(self, dims: int, eps: float, offset: float = 0.0, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.offset = offset
        if weight:
            self.weight = mx.ones((dims,)) if offset == 0.0 else mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" not in self:
            return rms_norm(x, None, self.eps)
        w = self.weight + self.offset if self.offset else self.weight
        return rms_norm(x, w, self.eps)
