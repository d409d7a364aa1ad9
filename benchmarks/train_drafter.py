"""Train a tiny MTP drafter (Gemma 4 assistant architecture) for the real Gemma 3 270M, on the CPU.

No Gemma 4 assistant weights can be downloaded here, so this makes a drafter with real acceptance:

1. The target writes its own training text: a greedy and `--samples` sampled continuations of each
   training prompt (`PROMPTS`; `EVAL_PROMPTS` are held out for `benchmarks.speculative`).
2. One teacher-forced pass per sequence gives, at every position, the target's final-normed hidden
   state, its greedy next token (the label) and the K/V of its last sliding and last full layer.
3. The drafter (2 layers, hidden 256, centroid-masked head: 2048 clusters of 128 tokens, top 32)
   is trained to predict the target's greedy token 1, 2 and 3 steps ahead, each step fed the
   previous step's `post_projection` as at inference. The tokens that occur as labels fill the
   first clusters (most frequent first), so the top 32 clusters hold all of them; their head rows
   start as a PCA projection of the target's embeddings, every other row is zero (logit 0).
   Losses: cluster cross-entropy (the centroid scores) + token cross-entropy over every label
   token and a zero logit for the unseen ones (a 262k-way softmax would be too slow here).

    python -m benchmarks.train_drafter --out benchmarks/out/drafter-270m [--minutes 15] [--samples 3]

On a 2-core CPU: ~6 min to generate 31k tokens, ~3 min of teacher forcing, then the training budget
(~390 steps in 15 min). The result accepts ~21% of single drafts on held-out prompts: enough to
break even, not to win much (`benchmarks.speculative`).

Writes config.json + model.safetensors (bfloat16) to a temporary directory and moves it into place.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (preloads OpenBLAS before MLX is imported)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from rich.progress import Progress

from gemma_mlx.models import gemma4_assistant
from gemma_mlx.outputs import OutputError, check_target, save_safetensors, staged_directory

PROMPTS = [
    "The history of the Roman Empire",
    "Once upon a time, in a small village",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "In 1969, astronauts",
    "Photosynthesis is the process by which",
    "Here is a recipe for chocolate chip cookies:",
    "The stock market fell sharply today after",
    "import numpy as np\nimport matplotlib.pyplot as plt\n",
    "My favorite season of the year is",
    "The capital of France is",
    "Climate change affects",
    "Dear Sir or Madam,",
    "The quick brown fox",
    "To install the package, run",
    "Water boils at",
    "The main causes of the First World War were",
    "class Stack:\n    def __init__(self):",
    "In mathematics, a prime number is",
    "The city of Tokyo",
    "SELECT name, age FROM users WHERE",
    "The human heart has four chambers",
    "Top 10 tips for better sleep:\n1.",
    "Albert Einstein was born in",
    "The mitochondria is",
    "Q: What is the tallest mountain in the world?\nA:",
    "The football match ended",
    "Artificial intelligence is",
    "How to change a flat tire:",
    "The Amazon rainforest",
    "<html>\n<head>\n<title>",
    "Shakespeare wrote",
    "The price of gold",
    "Once the meeting started, everyone",
    "The planets of the solar system are",
    "for i in range(10):",
    "A healthy breakfast includes",
    "The Industrial Revolution began",
    "Monday morning, the office",
    "The theory of evolution",
]
EVAL_PROMPTS = [
    "The history of ancient Egypt",
    "def quicksort(arr):",
    "The benefits of regular exercise include",
    "In 1492, Christopher Columbus",
    "The recipe calls for two cups of flour",
    "Machine learning is a field of",
    "The weather today is",
    "Q: What is the capital of Japan?\nA:",
]

SAMPLE_TEMPERATURE = 0.8
STEPS_AHEAD = 3
NUM_CENTROIDS, TOP_CLUSTERS = 2048, 32


# --- the target ---------------------------------------------------------------------------


def load_target():
    """(model, tokenizer) of the built-in Gemma 3 270M, exactly as `gemma_mlx.load` serves it."""
    from gemma_mlx.hub import load

    return load(None)


def generate_batch(target, prompts: list[list[int]], length: int, temperature: float, seed: int):
    """Continue equal-length prompts together (batch decoding); returns token rows [B, P + length]."""
    mx.random.seed(seed)
    cache = target.make_cache()
    tokens = mx.array(prompts, mx.int32)
    logits = target(tokens, cache, logits_to_keep=1)[:, -1]
    out = [tokens]
    for _ in range(length):
        if temperature == 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            nxt = mx.random.categorical(logits / temperature)
        nxt = nxt.astype(mx.int32)[:, None]
        out.append(nxt)
        logits = target(nxt, cache)[:, -1]
        mx.eval(logits)
    return mx.concatenate(out, axis=1)


def teacher_forced(target, rows: mx.array):
    """Per position: hidden [B, T, H], greedy labels [B, T], and the drafter's K/V per layer type."""
    cache = target.make_cache()
    logits, hidden = target(rows, cache, return_hidden=True)
    labels = mx.argmax(logits, axis=-1).astype(mx.int32)
    producers = gemma4_assistant.kv_producers(target.args)
    kv = {t: tuple(cache[i].state) for t, i in producers.items()}
    mx.eval(hidden, labels, kv)
    return hidden, labels, kv


# --- the drafter's head: clusters and initial rows ------------------------------------------


def pca_projection(table: np.ndarray, dims: int, sample: int = 20000) -> np.ndarray:
    rows = table[np.random.default_rng(0).choice(table.shape[0], sample, replace=False)]
    _, _, vt = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    return vt[:dims].T.astype(np.float32)  # [H_target, dims]


# --- training -------------------------------------------------------------------------------


class Trainer(nn.Module):
    """The drafter's body, projections and centroids, plus head rows for the training vocabulary."""

    def __init__(self, drafter: gemma4_assistant.Model, rows: mx.array):
        super().__init__()
        self.drafter = drafter
        self.rows = rows  # [A, D]: head rows of the tokens that occur as labels

    def loss(self, batch: dict, cluster_of: mx.array, weights: list[float]) -> mx.array:
        """Cross-entropies of the drafter's steps 1..len(weights) for queries L = 1..T - steps.

        Query L stands for token L (not yet in the target cache): it sees keys [0, L) (sliding:
        [L - W + 1, L)), sits at position L, and starts from the target's hidden state at L - 1.
        Step j is fed token L + j (teacher forcing) and predicts the target's greedy token after
        it, `labels[L + j]`.
        """
        labels, local = batch["labels"], batch["label_index"]
        T, steps = labels.shape[1], len(weights)
        q = T - steps
        keys, queries = mx.arange(T)[None, :], mx.arange(1, q + 1)[:, None]
        window = self.drafter.args.text.sliding_window
        masks = {
            "full_attention": keys < queries,
            "sliding_attention": (keys < queries) & (keys > queries - window),
        }
        h = batch["hidden"][:, :q]
        total = mx.array(0.0)
        for j, weight in enumerate(weights):
            x = batch["emb"][:, 1 + j : 1 + j + q]
            z, h = self.drafter(x, h, batch["kv"], 1, masks)
            target = labels[:, 1 + j : 1 + j + q]
            scores = self.drafter.masked_embedding.centroids(z)
            cluster_ce = nn.losses.cross_entropy(scores, cluster_of[target])
            # Every label token competes (as at inference, where the top clusters hold them all);
            # unseen tokens keep all-zero rows, so one zero logit stands for them.
            logits = z @ self.rows.T
            logits = mx.concatenate([logits, mx.zeros_like(logits[..., :1])], axis=-1)
            token_ce = nn.losses.cross_entropy(logits, local[:, 1 + j : 1 + j + q])
            total = total + weight * (cluster_ce + token_ce).mean()
        return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/drafter-270m"))
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--length", type=int, default=192, help="tokens generated per prompt")
    parser.add_argument(
        "--samples",
        type=int,
        default=3,
        help="sampled continuations per prompt (plus the greedy one)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument(
        "--text", type=Path, help="reuse (or save) the generated token rows here (.npy)"
    )
    args = parser.parse_args(argv)
    try:  # before the slow part
        check_target(args.out, directory=True, force=args.force)
    except OutputError as e:
        raise SystemExit(f"error: {e}") from e

    target, tokenizer = load_target()
    start = time.perf_counter()
    if args.text is not None and args.text.exists():
        data = mx.array(np.load(args.text))
    else:
        encoded = [tokenizer.encode(p) for p in PROMPTS]
        width = min(len(e) for e in encoded)
        prompts = [e[:width] for e in encoded]
        rows = [generate_batch(target, prompts, args.length, 0.0, 0)]
        rows += [
            generate_batch(target, prompts, args.length, SAMPLE_TEMPERATURE, seed)
            for seed in range(1, 1 + args.samples)
        ]
        data = mx.concatenate(rows)
        if args.text is not None:
            np.save(args.text, np.array(data))
    print(f"generated {data.size} tokens in {time.perf_counter() - start:.0f} s")

    config = gemma4_assistant.config_for_target(
        target.args,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=1024,
        num_centroids=NUM_CENTROIDS,
        centroid_intermediate_top_k=TOP_CLUSTERS,
    )
    drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    table = np.array(target.model.embed_tokens.weight)
    projection = pca_projection(table, 256)
    del table
    batches = []
    for i in range(0, data.shape[0], 8):
        chunk = data[i : i + 8]
        hidden, labels, kv = teacher_forced(target, chunk)
        batches.append(
            {"emb": target.model.embed(chunk), "hidden": hidden, "kv": kv, "labels": labels}
        )
    all_labels = np.concatenate([np.array(b["labels"]).ravel() for b in batches])
    vocab, counts = np.unique(all_labels, return_counts=True)
    vocab = vocab[np.argsort(-counts, kind="stable")]  # most frequent first
    V = target.args.vocab_size
    rest = np.setdiff1d(np.arange(V), vocab)
    ordering = np.concatenate([vocab, rest]).astype(np.int32)
    cluster_of = np.empty(V, np.int32)
    cluster_of[ordering] = np.arange(V) // (V // NUM_CENTROIDS)
    drafter.masked_embedding.token_ordering = mx.array(ordering)
    seen = np.array(target.model.embed_tokens.weight[mx.array(vocab)]) @ projection
    seen /= np.linalg.norm(seen, axis=1, keepdims=True).mean()
    position = {int(t): i for i, t in enumerate(vocab)}
    for b in batches:
        labels = np.array(b["labels"])
        b["label_index"] = mx.array(np.vectorize(position.get)(labels).astype(np.int32))
        mx.eval(b["emb"])
    print(f"{len(vocab)} distinct label tokens; data ready at {time.perf_counter() - start:.0f} s")

    trainer = Trainer(drafter, mx.array(seen))
    trainer.drafter.masked_embedding.freeze(keys=["token_ordering"])
    trainer.drafter.model.embed_tokens.freeze()
    optimizer = optim.AdamW(learning_rate=2e-3, weight_decay=0.0)
    cluster_map = mx.array(cluster_of)
    weights = [1.0, 0.7, 0.5]
    step_fn = nn.value_and_grad(trainer, lambda b: trainer.loss(b, cluster_map, weights))
    budget = args.minutes * 60
    began = time.perf_counter()
    step = 0
    with Progress() as progress:
        task = progress.add_task("training", total=budget)
        while (elapsed := time.perf_counter() - began) < budget:
            batch = batches[step % len(batches)]
            optimizer.learning_rate = (
                2e-3 * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1)))
            )
            loss, grads = step_fn(batch)
            optimizer.update(trainer, grads)
            mx.eval(trainer.parameters(), optimizer.state, loss)
            step += 1
            progress.update(
                task, completed=elapsed, description=f"step {step} loss {loss.item():.3f}"
            )

    head = mx.zeros((V, trainer.rows.shape[1]))
    head[mx.array(vocab)] = trainer.rows
    drafter.model.embed_tokens.weight = head
    save(drafter, config, args.out, args.force)
    print(f"{step} steps; saved to {args.out} ({_size(args.out) / 2**20:.0f} MiB)")


def save(drafter: nn.Module, config: dict, out: Path, force: bool) -> None:
    weights = {
        k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in tree_flatten(drafter.parameters())
    }
    with staged_directory(out, force=force) as staging:
        save_safetensors(staging / "model.safetensors", weights, metadata={"format": "mlx"})
        config = {**config, "torch_dtype": "bfloat16"}
        (staging / "config.json").write_text(json.dumps(config, indent=2))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


if __name__ == "__main__":
    main()
