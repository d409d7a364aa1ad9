"""Which weights a model holds, as a short hash: every tensor's name, shape and dtype, and a fixed
sample of its bytes.

Saved chat sessions carry it, so that a session is refused by any other model, even one with the
same shapes (a base and an instruction-tuned checkpoint). Shapes alone cannot tell those apart;
fine-tuning changes practically every weight, so a sample of each tensor does. `load` computes it
from the checkpoint's own tensors while reading them (no extra pass over the weights), so it does
not depend on the compute dtype or on quantized matrices being expanded on the CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

# Elements sampled per tensor, evenly spaced over the flattened tensor.
SAMPLES_PER_TENSOR = 64


def tensor_sample(value: mx.array) -> mx.array:
    """`SAMPLES_PER_TENSOR` elements of `value` at fixed positions (all of a smaller tensor); lazy,
    so that it is evaluated together with the tensor itself."""
    flat = value.reshape(-1)
    if flat.size <= SAMPLES_PER_TENSOR:
        return flat
    positions = [i * flat.size // SAMPLES_PER_TENSOR for i in range(SAMPLES_PER_TENSOR)]
    return flat[mx.array(positions, dtype=mx.int64)]


def fingerprint(
    described: Mapping[str, tuple[Sequence[int], mx.Dtype]], samples: Mapping[str, mx.array]
) -> str:
    """The hash of tensors given as name -> (shape, dtype) and name -> `tensor_sample`."""
    digest = hashlib.sha256()
    for name in sorted(described):
        shape, dtype = described[name]
        digest.update(f"{name}|{tuple(shape)}|{dtype}|".encode())
        digest.update(np.array(samples[name].view(mx.uint8)).tobytes())
    return digest.hexdigest()[:32]


def model_fingerprint(model: Any) -> str:
    """The fingerprint `load` recorded on `model`; for a model built otherwise, computed once from
    its parameters and kept on it."""
    recorded = getattr(model, "weights_fingerprint", None)
    if isinstance(recorded, str):
        return recorded
    parameters = dict(tree_flatten(model.parameters()))
    described = {name: (value.shape, value.dtype) for name, value in parameters.items()}
    model.weights_fingerprint = fingerprint(
        described, {name: tensor_sample(value) for name, value in parameters.items()}
    )
    return model.weights_fingerprint
