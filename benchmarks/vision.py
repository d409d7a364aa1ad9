"""Images: encode time and prompt speed with an image, gemma_mlx against mlx-vlm, same weights,
same run.

    python -m benchmarks.vision [--size tiny|e2b-vision] [--model DIR] [--trials 5]
                                [--max-soft-tokens 280] [--text-tokens 64]

The checkpoint is a random Gemma 4 in Hugging Face format written by transformers (torch needed):
`tiny` is the E2B-shaped test checkpoint (2-layer vision tower of width 32, 4-pixel patches), and
`e2b-vision` the same tiny text model with E2B's real vision tower (16 layers of width 768,
16-pixel patches). `--model DIR` takes any Gemma 4 checkpoint directory instead. Both engines load
it themselves (mlx-vlm 0.7.10's `load_model`; gemma_mlx's `load`) and get the same inputs: one
random image, preprocessed once by `gemma_mlx.media.image` (equal to transformers' processor), and
one prompt of `--text-tokens` text tokens around the image's soft tokens. Measured, median of
`--trials` after a warm-up, the engines taking turns:

- encode: the vision tower and its embedder on the image's patches (`encode_image` in both);
- prompt: from patches and token ids to the first generated token (encode, placement, prefill,
  first step), as prompt tokens per second; the first generated tokens are compared too.

Both run in this process with the same BLAS; the products here have many rows, so the few-row
routing does not apply. Results append to `benchmarks/results/vision-<machine>.jsonl`;
`vision-<machine>.md` shows the latest record of each model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np
from PIL import Image

from benchmarks import store
from benchmarks.machine import describe
from gemma_mlx.decode import default_prefill_step_size, generate_tokens
from gemma_mlx.errors import GemmaMLXError
from gemma_mlx.generate import after_media_prefill
from gemma_mlx.loading import load_model
from gemma_mlx.media.image import SOFT_TOKEN_BUDGETS, image_patches
from gemma_mlx.models.gemma4_multimodal import MediaTokens
from gemma_mlx.outputs import write_file_atomically
from gemma_mlx.sample import greedy

VISION = "vision"  # the "benchmark" field of these records
SCHEMA = 1
EXIT_BAD_INPUT = 2
SIZES = ("tiny", "e2b-vision")
FIRST_TOKENS = 8  # greedy tokens compared between the engines


class VisionBenchmarkError(GemmaMLXError):
    pass


def write_checkpoint(size: str, directory: Path) -> Path:
    """A random Gemma 4 checkpoint (text, vision tower) in Hugging Face format, via transformers.

    `global_head_dim` is written into the text config as Google's configs have it: transformers
    5.2x drops it when saving (it keeps `per_layer_config`), and mlx-vlm reads only the former."""
    try:
        import torch
        from transformers import (
            Gemma4Config,
            Gemma4ForConditionalGeneration,
            Gemma4TextConfig,
            Gemma4VisionConfig,
        )
    except ImportError as e:
        raise VisionBenchmarkError(
            f"writing the {size} checkpoint needs torch and transformers ({e}); or pass --model"
        ) from e
    sliding, full = "sliding_attention", "full_attention"
    text = Gemma4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        sliding_window=8, layer_types=[sliding, sliding, full] * 2, max_position_embeddings=4096,
        final_logit_softcapping=30.0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
        num_kv_shared_layers=3, initializer_range=0.08, pad_token_id=0,
    )  # fmt: skip
    tiny_vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64,
        initializer_range=0.1,
    )  # fmt: skip
    vision = Gemma4VisionConfig(**tiny_vision) if size == "tiny" else Gemma4VisionConfig()  # E2B
    tokens = {"boi_token_id": 504, "eoi_token_id": 505, "image_token_id": 506,
              "video_token_id": 507, "boa_token_id": 508, "eoa_token_index": 509,
              "audio_token_id": 510}  # fmt: skip
    config = Gemma4Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None, **tokens
    )
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["text_config"]["global_head_dim"] = 32
    path.write_text(json.dumps(saved))
    return directory


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


class Ours:
    name = "gemma_mlx"

    def __init__(self, directory: Path):
        self.model = load_model(directory, media=True)

    def encode(self, patches: mx.array, positions: mx.array) -> mx.array:
        out = self.model.encode_image(patches, positions)
        mx.eval(out)
        return out

    def first_tokens(self, tokens: list[int], patches: mx.array, positions: mx.array, n: int):
        """`n` greedy tokens after the prompt: encode, place, media prefill, decode."""
        media = self.model.place_media(tokens, images=[self.model.encode_image(patches, positions)])
        steps = after_media_prefill(generate_tokens, media)(
            self.model, tokens, self.model.make_cache(), greedy, [], n,
            default_prefill_step_size(), None,
        )  # fmt: skip
        return [step.token for step in steps]


class MlxVlm:
    name = "mlx-vlm"

    def __init__(self, directory: Path):
        try:
            from mlx_vlm.generate.ar import generate_step
            from mlx_vlm.utils import load_model
        except ImportError as e:
            raise VisionBenchmarkError(
                f"mlx-vlm is not installed: pip install mlx-vlm ({e})"
            ) from e
        self.generate_step = generate_step
        self.model = load_model(directory)

    def encode(self, patches: mx.array, positions: mx.array) -> mx.array:
        out = self.model.encode_image(patches[None], positions[None])
        mx.eval(out)
        return out

    def first_tokens(self, tokens: list[int], patches: mx.array, positions: mx.array, n: int):
        steps = self.generate_step(
            mx.array(tokens)[None], self.model, patches[None], None, max_tokens=n,
            temperature=0.0, image_position_ids=positions[None],
            prefill_step_size=default_prefill_step_size(),
        )  # fmt: skip
        return [int(token.item() if hasattr(token, "item") else token) for token, _ in steps]


def prompt_tokens(ids: MediaTokens, soft_tokens: int, text_tokens: int) -> list[int]:
    """BOS, text, the image's markers and placeholders, text: `text_tokens` text tokens in all
    (ids below every media token: the tiny vocabulary's are its last)."""
    rng = np.random.default_rng(1)
    text = [int(t) for t in rng.integers(3, min(400, ids.boi), text_tokens)]
    half = text_tokens // 2
    return [2, *text[:half], ids.boi, *[ids.image] * soft_tokens, ids.eoi, *text[half:]]


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    ours = Ours(directory)
    media_args = ours.model.media_args
    vision = media_args.vision
    if media_args.unified or vision is None:
        raise VisionBenchmarkError(
            f"{directory}: needs a Gemma 4 checkpoint with a vision tower (not the 12B's "
            "encoder-free vision, which mlx-vlm does not run)"
        )
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    load_before = os.getloadavg()[0]
    preprocess, prepared = timed(
        lambda: image_patches(image, vision.patch_size, vision.pooling_kernel_size,
                              args.max_soft_tokens)
    )  # fmt: skip
    outputs: dict[str, mx.array] = {}
    patches, positions = mx.array(prepared.patches), mx.array(prepared.positions)
    tokens = prompt_tokens(media_args.tokens, prepared.soft_tokens, args.text_tokens)
    engines = [ours, MlxVlm(directory)]
    times: dict[str, dict[str, list[float]]] = {
        e.name: {"encode": [], "prompt": []} for e in engines
    }
    # Trials alternate between the engines (and their order), so that both see the same load.
    for trial in range(args.trials + 1):  # the first is a warm-up
        for engine in engines if trial % 2 else engines[::-1]:
            encode, embeddings = timed(lambda e=engine: e.encode(patches, positions))
            prompt, _ = timed(lambda e=engine: e.first_tokens(tokens, patches, positions, 1))
            if trial:
                times[engine.name]["encode"].append(encode)
                times[engine.name]["prompt"].append(prompt)
            outputs[engine.name] = embeddings
    results = {}
    for engine in engines:
        encode, prompt = (statistics.median(times[engine.name][k]) for k in ("encode", "prompt"))
        results[engine.name] = {
            "encode_s": encode,
            "prompt_s": prompt,
            "prompt_tps": len(tokens) / prompt,
            "first_tokens": engine.first_tokens(tokens, patches, positions, FIRST_TOKENS),
        }
    ours, peer = results["gemma_mlx"], results["mlx-vlm"]
    shape = (prepared.soft_tokens, -1)
    difference = np.abs(
        np.array(outputs["gemma_mlx"]).reshape(shape) - np.array(outputs["mlx-vlm"]).reshape(shape)
    ).max()
    return {
        "benchmark": VISION,
        "schema": SCHEMA,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(measure_bandwidth=False).as_dict(),
        "model": {"label": args.model or args.size, "vision": {k: getattr(vision, k) for k in (
            "hidden_size", "num_hidden_layers", "patch_size", "pooling_kernel_size")}},
        "image": {"pixels": [480, 640], "patches": int(patches.shape[0]),
                  "soft_tokens": prepared.soft_tokens, "preprocess_s": preprocess},
        "prompt_tokens": len(tokens),
        "trials": args.trials,
        "load_average": [load_before, os.getloadavg()[0]],  # other work on the machine
        "engines": results,
        "embedding_max_abs_diff": float(difference),
        "same_first_tokens": ours["first_tokens"] == peer["first_tokens"],
    }  # fmt: skip


def latest_by_model(path: Path) -> list[dict[str, Any]]:
    """The latest vision record of each model label in the results file `path`."""
    latest = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("benchmark") == VISION:
            latest[record["model"]["label"]] = record
    return list(latest.values())


def markdown(records: list[dict[str, Any]]) -> str:
    """One section per record, under the machine's title."""
    title = f"# Vision: gemma_mlx vs mlx-vlm ({records[0]['machine']['label']})"
    return "\n".join([title, "", *(line for r in records for line in section(r))])


def section(record: dict[str, Any]) -> list[str]:
    ours, peer = record["engines"]["gemma_mlx"], record["engines"]["mlx-vlm"]
    image = record["image"]
    lines = [
        f"## `{record['model']['label']}` ({record['time']})",
        "",
        f"Vision tower {record['model']['vision']}; one "
        f"{image['pixels'][0]}x{image['pixels'][1]} image: {image['patches']} patches, "
        f"{image['soft_tokens']} soft tokens (preprocessing {image['preprocess_s'] * 1e3:.1f} ms, "
        f"ours only); prompt {record['prompt_tokens']} tokens; median of {record['trials']}.",
        "",
        "| engine | encode ms | prompt ms | prompt tok/s |",
        "|---|---|---|---|",
    ]
    for name, e in (("gemma_mlx", ours), ("mlx-vlm", peer)):
        lines.append(
            f"| {name} | {e['encode_s'] * 1e3:.2f} | {e['prompt_s'] * 1e3:.2f} "
            f"| {e['prompt_tps']:.1f} |"
        )
    lines += [
        "",
        f"Ratio (mlx-vlm time / ours): encode {peer['encode_s'] / ours['encode_s']:.2f}x, "
        f"prompt {peer['prompt_s'] / ours['prompt_s']:.2f}x. Soft tokens max |diff| "
        f"{record['embedding_max_abs_diff']:.2e}; first {FIRST_TOKENS} greedy tokens "
        f"{'identical' if record['same_first_tokens'] else 'DIFFERENT'}. Load average "
        f"{record['load_average'][0]:.1f} before, {record['load_average'][1]:.1f} after "
        f"({record['machine']['cpu_cores']} cores).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--model", help="a Gemma 4 checkpoint directory (instead of --size)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-soft-tokens", type=int, default=280)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=store.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.trials < 1 or args.text_tokens < 2:
        parser.error("--trials must be at least 1 and --text-tokens at least 2")
    if args.max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        parser.error(f"--max-soft-tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(args.model) if args.model else Path(scratch) / args.size
            if not args.model:
                write_checkpoint(args.size, directory)
            record = measure(args, directory)
    except GemmaMLXError as e:
        print(f"benchmarks.vision: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    results = args.results_dir / f"vision-{record['machine']['label']}.jsonl"
    store.append(results, [record])
    text = markdown(latest_by_model(results))
    write_file_atomically(results.with_suffix(".md"), lambda p: p.write_text(text), force=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
