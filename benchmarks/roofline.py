"""Bytes a decode step reads, computed from a model's parameter shapes (never its values).

Per decoded token a Gemma decoder reads:
- every dense weight once (linears, norms, scalars), at its stored size (quantized weights with
  their scales and biases);
- one row of `embed_tokens` and one row of the per-layer-embedding table (PLE, E2B/E4B); a tied
  head reads the whole `embed_tokens` matrix, which then counts once (the looked-up row is in it);
- of each MoE expert stack, `top_k / num_experts` (the experts a token is routed to);
- the K/V of every attention layer at the current context (`kv_bytes`): sliding layers at most
  their window, KV-shared layers re-reading their producer's cache.

Works on gemma_mlx and mlx-lm models alike (same module names), lazily built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

PLE_TABLE = "embed_tokens_per_layer"
TOKEN_TABLE = "embed_tokens"


@dataclass
class WeightBytes:
    """Weight bytes read per decoded token, split by what reads them."""

    dense: int  # linears, norms, scalars, a tied or untied head
    embedding_rows: int  # one row of each looked-up table not already counted as a head
    experts: int  # the routed share of the expert stacks

    @property
    def total(self) -> int:
        return self.dense + self.embedding_rows + self.experts


def _is_expert_stack(module: nn.Module) -> bool:
    """mlx-lm's SwitchLinear / QuantizedSwitchLinear: weights [E, out, in]."""
    return type(module).__name__ in ("SwitchLinear", "QuantizedSwitchLinear")


def weight_bytes_per_token(model: nn.Module) -> WeightBytes:
    args = model.args
    tied = "lm_head" not in model
    top_k, num_experts = (
        getattr(args, "top_k_experts", 0) or 0,
        getattr(args, "num_experts", 0) or 0,
    )
    dense = rows = experts = 0
    for path, module in model.named_modules():
        own = sum(v.nbytes for k, v in module.items() if isinstance(v, mx.array) and k[0] != "_")
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            if path.rsplit(".", 1)[-1] == TOKEN_TABLE and tied:
                dense += own  # the head reads all of it
            else:
                rows += own // module.weight.shape[0]
        elif _is_expert_stack(module):
            experts += own * top_k // num_experts
        else:
            dense += own
    return WeightBytes(dense, rows, experts)


def kv_bytes(args, context: int, dtype: mx.Dtype) -> int:
    """K/V bytes every attention layer reads for one decoded token at `context` positions.

    `args` is our `ModelArgs` (per-layer head dims, KV heads, window).
    """
    total = 0
    for layer in range(args.num_hidden_layers):
        positions = min(context, args.sliding_window) if args.is_sliding(layer) else context
        total += 2 * positions * args.n_kv_heads(layer) * args.layer_head_dim(layer)
    return total * dtype.size


def gguf_weight_bytes_per_token(path: Path) -> int:
    """The same count for a GGUF file (llama.cpp's tensor names, stored block sizes)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str, default: int = 0) -> Any:
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture", "")
    top_k, num_experts = field(f"{arch}.expert_used_count"), field(f"{arch}.expert_count")
    tied = all(t.name != "output.weight" for t in reader.tensors)
    total = 0
    for tensor in reader.tensors:
        nbytes, rows = int(tensor.n_bytes), int(tensor.shape[-1])  # shape is GGUF's ne: [in, out]
        if tensor.name == "token_embd.weight":
            total += nbytes if tied else nbytes // rows
        elif tensor.name.startswith("per_layer_token_embd"):
            total += nbytes // rows
        elif "_exps." in tensor.name:
            total += nbytes * top_k // num_experts
        else:
            total += nbytes
    return total


@dataclass
class Roofline:
    """A decode speed placed against the memory bandwidth."""

    weight_bytes: int
    kv_bytes: int
    context: int
    bandwidth_gbs: float | None

    @property
    def bytes_per_token(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def ceiling_tps(self) -> float | None:
        """Tokens/s if every byte were read at full bandwidth and nothing else took time."""
        if not self.bandwidth_gbs:
            return None
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token

    def fraction(self, decode_tps: float) -> float | None:
        """Achieved share of the bandwidth at `decode_tps`."""
        ceiling = self.ceiling_tps
        return None if ceiling is None else decode_tps / ceiling
