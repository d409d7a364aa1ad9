"""Gemma 4 "assistant" drafter (multi-token prediction), as transformers' `Gemma4AssistantForCausalLM`.

A drafter is a small Gemma 4 decoder whose layers have queries only: every layer attends to the K/V
that the target model already computed (the last non-KV-shared target layer of the same type), so the
drafter has no cache and no prefill. One draft step:

    z = layers(pre_projection(concat(target_embed(token) * sqrt(H_target), h)))   # fixed position
    logits = head(norm(z));  h = post_projection(norm(z))                           # h fed back

Step 1 takes `h` = the target's final-normed hidden state. The head is the drafter's own (tied)
draft-width embedding, or, on E2B/E4B-style drafters (`use_ordered_embeddings`), a centroid-masked
head that scores only the tokens of the top-k of `num_centroids` token clusters, never a
vocabulary-wide row. Attention scale is 1.0 (q is RMS-normed), as in the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from gemma_mlx.kernels import drafter_head
from gemma_mlx.models import gemma4
from gemma_mlx.models.base import ConfigError, read

SharedKV = dict[str, tuple[mx.array, mx.array]]


@dataclass
class ModelArgs:
    model_type: str
    text: gemma4.ModelArgs
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 0
    centroid_intermediate_top_k: int = 0
    tie_word_embeddings: bool = True

    @property
    def embed_scale_dtype(self) -> str | None:
        """Unused by the drafter (its input is the target's scaled embedding); set by the loader."""
        return self.text.embed_scale_dtype

    @embed_scale_dtype.setter
    def embed_scale_dtype(self, value: str | None) -> None:
        self.text.embed_scale_dtype = value

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a `gemma4_assistant` config.json (the drafter's decoder is its `text_config`)."""
        text_config = read(config, "text_config", dict)
        # Every drafter layer reads the target's K/V; the text decoder's own check (some layer must
        # own K/V) does not apply, so read it as unshared and mark all layers shared afterwards.
        text = gemma4.ModelArgs.from_dict({**text_config, "num_kv_shared_layers": 0})
        text.num_kv_shared_layers = text.num_hidden_layers
        for key, bad in (
            ("hidden_size_per_layer_input", text.hidden_size_per_layer_input),
            ("enable_moe_block", text.enable_moe_block),
            ("use_double_wide_mlp", text.use_double_wide_mlp),
        ):
            if bad:
                raise ConfigError(f"config.json: a drafter's text_config cannot set '{key}'")
        ordered = read(config, "use_ordered_embeddings", bool, False)
        args = cls(
            model_type=read(config, "model_type", str),
            text=text,
            backbone_hidden_size=read(config, "backbone_hidden_size", int),
            use_ordered_embeddings=ordered,
            num_centroids=read(config, "num_centroids", int) if ordered else 0,
            centroid_intermediate_top_k=(
                read(config, "centroid_intermediate_top_k", int) if ordered else 0
            ),
            tie_word_embeddings=read(config, "tie_word_embeddings", bool, True),
        )
        if ordered and (
            text.vocab_size % args.num_centroids
            or not 0 < args.centroid_intermediate_top_k <= args.num_centroids
        ):
            raise ConfigError(
                f"config.json: 'num_centroids' = {args.num_centroids} must divide 'vocab_size' = "
                f"{text.vocab_size}, and 'centroid_intermediate_top_k' = "
                f"{args.centroid_intermediate_top_k} must be in 1..num_centroids"
            )
        return args


def kv_producers(target: gemma4.ModelArgs) -> dict[str, int]:
    """Layer type -> the last target layer of that type that owns K/V: what a drafter attends."""
    owners = range(target.first_kv_shared_layer)
    return {
        t: max(i for i in owners if target.layer_types[i] == t) for t in set(target.layer_types)
    }


class MaskedEmbedder(nn.Module):
    """Centroid-masked head: score the clusters, then only the tokens of the top-k clusters.

    `token_ordering` lists the vocabulary cluster by cluster (`vocab / num_centroids` ids each).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids
        self.centroids = nn.Linear(args.text.hidden_size, args.num_centroids, bias=False)
        self.token_ordering = mx.zeros((args.text.vocab_size,), dtype=mx.int32)

    def __call__(self, z: mx.array, rows: nn.Module) -> tuple[mx.array, mx.array]:
        """(token ids [..., top_k * cluster], their logits) for normed hidden states z [..., D].

        `rows(ids)` returns the head's weight rows of `ids` (an embedding lookup).
        """
        scores = self.centroids(z)
        top = mx.argpartition(-scores, self.top_k - 1, axis=-1)[..., : self.top_k]
        clusters = self.token_ordering.reshape(self.num_centroids, -1)
        ids = clusters[top].reshape(*z.shape[:-1], -1)
        logits = (rows(ids) @ z[..., None]).squeeze(-1)
        return ids, logits


class Model(nn.Module):
    """The drafter network; `__call__` runs the layers, `head` turns its output into token scores."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        text = args.text
        # Reuse the target decoder's classes: with every layer KV-shared they have q/o only.
        self.model = gemma4.TextModel(text)
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, args.backbone_hidden_size, bias=False)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(args)

    def __call__(
        self,
        embeddings: mx.array,
        hidden: mx.array,
        shared_kv: SharedKV,
        position: int,
        masks: dict[str, str | mx.array | None] | None = None,
    ) -> tuple[mx.array, mx.array]:
        """(normed drafter states z, post-projected states for the next step), both [B, S, .].

        `embeddings`: the target's scaled embeddings of the last tokens; `hidden`: the target's
        final-normed hidden state (step 1) or the previous step's projection. Queries sit at
        positions `position ...`; `shared_kv[layer_type]` holds the K/V they attend, masked by
        `masks[layer_type]` (None: every key visible).
        """
        x = self.pre_projection(mx.concatenate([embeddings, hidden], axis=-1))
        types = self.args.text.layer_types
        for layer_type, layer in zip(types, self.model.layers, strict=True):
            mask = masks.get(layer_type) if masks else None
            x, _ = layer(x, position, mask, None, shared_kv[layer_type], None)
        z = self.model.norm(x)
        return z, self.post_projection(z)

    def head(self, z: mx.array) -> tuple[mx.array | None, mx.array]:
        """(candidate ids or None for the whole vocabulary, their logits); no softcap."""
        if self.args.use_ordered_embeddings:
            return self.masked_embedding(z, self._head_rows)
        if self.args.tie_word_embeddings:
            return None, self.model.embed_tokens.as_linear(z)
        return None, self.lm_head(z)

    def greedy_token(self, z: mx.array) -> mx.array:
        """The head's greedy token [...] int32: a centroid-masked head goes through
        `gemma_mlx.kernels.drafter_head` (two kernels on Metal, no vocabulary-wide row)."""
        if not self.args.use_ordered_embeddings:
            return mx.argmax(self.head(z)[1], axis=-1).astype(mx.int32)
        head = self.masked_embedding
        table = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        return drafter_head.greedy_token(
            head.centroids(z), z, head.token_ordering, drafter_head.HeadTable.of(table), head.top_k
        )

    def _head_rows(self, ids: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens(ids)
        return self.lm_head.weight[ids]

    @property
    def layers(self) -> list[gemma4.DecoderLayer]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names are ours; drop rotary buffers, unused K/V weights and a tied `lm_head`."""
        out = {}
        for name, value in weights.items():
            if "rotary_emb" in name or any(
                f".self_attn.{p}." in name for p in ("k_proj", "v_proj", "k_norm", "v_norm")
            ):
                continue
            if name == "masked_embedding.token_ordering":
                value = value.astype(mx.int32)
            out[name] = value
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


def config_for_target(
    target: gemma4.ModelArgs,
    *,
    hidden_size: int,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    num_centroids: int = 0,
    centroid_intermediate_top_k: int = 32,
) -> dict[str, Any]:
    """config.json of a new drafter that fits `target` (for training one; Gemma 3 targets too).

    Its layers take the head dims, KV-head counts and RoPE of the target's K/V producers; the last
    layer is full attention, the others sliding. `num_centroids` > 0 gives a centroid-masked head.
    """
    types = ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"]
    producer = kv_producers(target)
    sliding, full = producer["sliding_attention"], producer["full_attention"]
    text = {
        "model_type": "gemma4_text",
        "vocab_size": target.vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": target.n_kv_heads(sliding),
        "attention_k_eq_v": target.n_kv_heads(full) != target.n_kv_heads(sliding),
        "num_global_key_value_heads": target.n_kv_heads(full),
        "head_dim": target.layer_head_dim(sliding),
        "global_head_dim": target.layer_head_dim(full),
        "rms_norm_eps": target.rms_norm_eps,
        "sliding_window": target.sliding_window,
        "layer_types": types,
        "rope_parameters": target.rope_parameters,
        "max_position_embeddings": target.max_position_embeddings,
        "tie_word_embeddings": True,
    }
    config = {
        "model_type": "gemma4_assistant",
        "text_config": text,
        "backbone_hidden_size": target.hidden_size,
        "tie_word_embeddings": True,
        "use_ordered_embeddings": num_centroids > 0,
    }
    if num_centroids:
        config["num_centroids"] = num_centroids
        config["centroid_intermediate_top_k"] = centroid_intermediate_top_k
    return config
