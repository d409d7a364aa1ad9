"""GGUF files written from the tiny transformers checkpoints the way llama.cpp's converter writes them.

Tensor names come from gguf-py's own table (`get_tensor_name_map`), metadata keys from llama.cpp's
Gemma 3 / Gemma 4 converters (docs/conversion.md). Linear weights
are quantized with gguf-py's quantizers; `reference_state_dict` gives the values gguf-py
dequantizes them to, so that transformers can run the very model the GGUF holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
    get_tensor_name_map,
    quants,
)
from hf_reference import VARIANTS, S
from transformers import Gemma3TextConfig

# Names gguf-py 0.19's table does not have yet (llama.cpp master).
EXTRA_NAMES = {
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
}
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def gguf_variant(name: str):
    """The tiny config of `name`, restricted to what Gemma 3 GGUF metadata can express: llama.cpp
    fixes the sliding pattern (5 sliding, 1 full), the local RoPE base (1e4) and the query scale."""
    config = VARIANTS[name]()
    if name != "gemma3":
        return config
    fields = config.to_dict() | {
        "layer_types": [S] * 5 + ["full_attention"],
        "query_pre_attn_scalar": config.head_dim,
    }
    return Gemma3TextConfig(**fields)


def hf_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The transformers model's text weights under text-only names (`model.`, no towers)."""
    out = {}
    for name, value in model.state_dict().items():
        name = name.replace("model.language_model.", "model.")
        if name.startswith(
            ("model.vision", "model.audio", "model.embed_vision", "model.embed_audio")
        ):
            continue
        if "rotary_emb" in name:
            continue
        out[name] = value.detach().float().numpy()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", True):
        out.pop("lm_head.weight", None)
    return out


def gguf_name(arch: str, hf_name: str, n_layers: int) -> str:
    table = get_tensor_name_map(
        MODEL_ARCH.GEMMA3 if arch == "gemma3" else MODEL_ARCH.GEMMA4, n_layers
    )
    for short, gguf_suffix in EXTRA_NAMES.items():
        if hf_name.endswith(short):
            return f"blk.{hf_name.split('.')[2]}.{gguf_suffix}"
    name = table.get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise KeyError(hf_name)
    return name if name.endswith(".weight") else name + ".weight"


def choose_type(
    hf_name: str, value: np.ndarray, qtype: GGMLQuantizationType
) -> GGMLQuantizationType:
    if value.ndim >= 2 and value.shape[-1] % 32 == 0 and "router" not in hf_name:
        return qtype
    return GGMLQuantizationType.F32


def write_gguf(
    model: torch.nn.Module,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.Q4_0,
    choose: Callable[[str, np.ndarray], GGMLQuantizationType] | None = None,
    special: dict[int, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; returns the dequantized values, by HF name. `choose`
    (HF name, value) -> type picks each tensor's type (default: `qtype` where it fits, F32);
    `special`: token id -> spelling of control tokens (e.g. the image/audio placeholders)."""
    config = model.config.get_text_config()
    arch = "gemma3" if config.model_type.startswith("gemma3") else "gemma4"
    writer = GGUFWriter(path, arch)
    _write_metadata(writer, arch, config, special or {})
    stored = {}
    for name, value in hf_tensors(model).items():
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1.0  # llama.cpp stores Gemma 1-3 norms as (1 + w)
        target = choose(name, value) if choose else choose_type(name, value, qtype)
        data = quantize(value, target) if target != GGMLQuantizationType.F32 else value
        writer.add_tensor(gguf_name(arch, name, config.num_hidden_layers), data, raw_dtype=target)
        back = quants.dequantize(data, target) if target != GGMLQuantizationType.F32 else value
        stored[name] = back - 1.0 if arch == "gemma3" and name.endswith("norm.weight") else back
    if arch == "gemma4":
        from gemma_mlx.models.gemma4 import ModelArgs

        args = ModelArgs.from_dict(config.to_dict())
        full = args.rope_parameters["full_attention"]
        if full.get("rope_type") == "proportional":
            pairs = (args.global_head_dim or args.head_dim) // 2
            rotated = round(full["partial_rotary_factor"] * pairs)
            factors = np.array([1.0] * rotated + [1e30] * (pairs - rotated), dtype=np.float32)
            writer.add_tensor("rope_freqs.weight", factors)
    finish(writer)
    return stored


def quantize(value: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's quantizer; for Q6_K (which gguf-py cannot write) `quantize_q6_k`."""
    if qtype == GGMLQuantizationType.Q6_K:
        return quantize_q6_k(value)
    return quants.quantize(value, qtype)


def quantize_q6_k(value: np.ndarray) -> np.ndarray:
    """A valid Q6_K encoding (ggml's block_q6_K layout) of rows whose length is a multiple of 256:
    per 16 weights a signed 8-bit multiple of the block's float16 d, codes q - 32 in -32..31.
    Simpler than llama.cpp's search for the best scales; what matters here is that the bytes are
    Q6_K with scales of both signs."""
    rows = value.reshape(-1, 256).astype(np.float32)
    n = rows.shape[0]
    sub = rows.reshape(n, 16, 16)
    extreme = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]
    sub_scale = extreme / -32.0  # [n, 16], signed as llama.cpp's: the extreme value is code 0
    d = (np.abs(sub_scale).max(-1) / 127.0).astype(np.float16)  # [n]
    d32 = d.astype(np.float32)[:, None]
    sc = np.rint(np.divide(sub_scale, d32, out=np.zeros_like(sub_scale), where=d32 > 0))
    sc = np.clip(sc, -128, 127).astype(np.int8)
    step = d32 * sc.astype(np.float32)  # [n, 16]
    codes = np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] != 0)
    q = (np.clip(np.rint(codes), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # h, k, i
    low, high = q & 15, q >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)  # byte 64 h + 32 (k % 2) + i
    qh = (high << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(2, dtype=np.uint8)
    blocks = np.concatenate(
        [ql, qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1
    )
    return blocks.reshape(*value.shape[:-1], value.shape[-1] // 256 * 210)


def finish(writer: GGUFWriter) -> None:
    """Write the header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_state_dict(model: torch.nn.Module, stored: dict[str, np.ndarray]) -> None:
    """Load the GGUF's own (dequantized) values into the transformers model, in place."""
    prefix = (
        "model.language_model."
        if any(k.startswith("model.language_model.") for k in model.state_dict())
        else "model."
    )
    state = {}
    for name, value in stored.items():
        key = prefix + name[len("model.") :] if name.startswith("model.") else name
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)


def _write_metadata(writer: GGUFWriter, arch: str, c, special: dict[int, str]) -> None:
    n = c.num_hidden_layers
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(n)
    writer.add_head_count(c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_sliding_window(c.sliding_window)
    if c.final_logit_softcapping:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        full = c.rope_parameters["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    else:
        # Per-layer facts as our config reader (checked against transformers) derives them.
        from gemma_mlx.models.gemma4 import ModelArgs

        a = ModelArgs.from_dict(c.to_dict())
        sliding = [a.is_sliding(i) for i in range(n)]
        wide = [a.mlp_width(i) for i in range(n)]
        kv = [a.n_kv_heads(i) for i in range(n)]
        writer.add_feed_forward_length(wide if len(set(wide)) > 1 else wide[0])
        writer.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
        writer.add_key_length(a.global_head_dim or a.head_dim)
        writer.add_value_length(a.global_head_dim or a.head_dim)
        writer.add_uint32(f"{arch}.attention.key_length_swa", a.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length_swa", a.head_dim)
        writer.add_rope_freq_base(a.rope_parameters["full_attention"]["rope_theta"])
        writer.add_float32(
            f"{arch}.rope.freq_base_swa", a.rope_parameters["sliding_attention"]["rope_theta"]
        )
        writer.add_array(f"{arch}.attention.sliding_window_pattern", sliding)
        if a.num_kv_shared_layers:
            writer.add_uint32(f"{arch}.attention.shared_kv_layers", a.num_kv_shared_layers)
        if a.hidden_size_per_layer_input:
            writer.add_uint32(
                f"{arch}.embedding_length_per_layer_input", a.hidden_size_per_layer_input
            )
        if a.enable_moe_block:
            writer.add_expert_count(a.num_experts)
            writer.add_expert_used_count(a.top_k_experts)
            writer.add_expert_feed_forward_length(a.moe_intermediate_size)
    _write_vocabulary(writer, c.vocab_size, special)


def _write_vocabulary(writer: GGUFWriter, size: int, special: dict[int, str]) -> None:
    """A SentencePiece vocabulary: specials, the 256 byte tokens, then word pieces; `special`
    replaces the pieces at its ids by control tokens."""
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", *"abcdefghijklmnopqrstuvwxyz"]
    more = [a + b for a in words for b in words[1:]]
    tokens = (SPECIAL + pieces + words + more)[:size]
    types = [TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (size - len(types))
    for token_id, spelling in special.items():
        tokens[token_id], types[token_id] = spelling, TokenType.CONTROL
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
