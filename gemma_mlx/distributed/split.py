"""Which layers each rank of a pipeline holds: contiguous blocks balanced by memory.

A rank's share is its layers' weights plus their KV cache at the requested context; the first
rank also holds the token embedding (and E2B/E4B's per-layer-input tables), the last the final
norm and the output head (with tied embeddings that is the embedding matrix: the last rank keeps a
copy of it). KV-shared layers (E2B/E4B) attend the keys and values of the last earlier layer of
their type, so those producers and every consumer after them form one block that is never split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gemma_mlx.errors import ModelTooLargeError, OptionError

# Names of the tensors outside the decoder layers, by the rank that holds them.
FIRST_RANK_PREFIXES = (
    "model.embed_tokens.",
    "model.embed_tokens_per_layer.",
    "model.per_layer_model_projection.",
    "model.per_layer_projection_norm.",
)
LAST_RANK_PREFIXES = ("model.norm.", "lm_head.")
TIED_HEAD_PREFIX = "model.embed_tokens."
LAYER_PREFIX = "model.layers."
MAX_TRIM = 32  # the extra positions `Model.make_cache` keeps in sliding caches


@dataclass(frozen=True)
class Split:
    """Layers [start, end) of each rank, and the bytes each rank was planned to hold."""

    layers: tuple[tuple[int, int], ...]
    planned_bytes: tuple[int, ...]


def layer_of(name: str) -> int | None:
    if not name.startswith(LAYER_PREFIX):
        return None
    return int(name[len(LAYER_PREFIX) :].split(".", 1)[0])


def rank_tensors(names: Sequence[str], split: Split, rank: int, tied: bool) -> list[str]:
    """The tensor names rank `rank` loads."""
    lo, hi = split.layers[rank]
    last = rank == len(split.layers) - 1
    wanted = []
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            keep = lo <= layer < hi
        elif name.startswith(FIRST_RANK_PREFIXES) and rank == 0:
            keep = True
        else:
            head = name.startswith(LAST_RANK_PREFIXES) or (
                tied and name.startswith(TIED_HEAD_PREFIX)
            )
            keep = last and head
        if keep:
            wanted.append(name)
    return wanted


def unbreakable_blocks(args) -> list[range]:
    """Runs of layers a rank boundary may not cut: a KV-shared tail with its producers."""
    n = args.num_hidden_layers
    first_shared = args.first_kv_shared_layer
    if first_shared == n:
        return [range(i, i + 1) for i in range(n)]
    tail = min(args.kv_producer(i) for i in range(first_shared, n))
    return [range(i, i + 1) for i in range(tail)] + [range(tail, n)]


def kv_bytes(args, layer: int, context: int, dtype_size: int) -> int:
    """Keys and values one sequence keeps for `layer` at `context` tokens (0 for KV-shared)."""
    if layer >= args.first_kv_shared_layer:
        return 0
    positions = min(context, args.sliding_window + MAX_TRIM) if args.is_sliding(layer) else context
    return 2 * args.n_kv_heads(layer) * args.layer_head_dim(layer) * positions * dtype_size


def plan_split(
    args,
    tensor_bytes: Mapping[str, int],
    rank_memory: Sequence[int],
    context: int,
    dtype_size: int,
    what: str = "the model",
) -> Split:
    """Contiguous layer blocks, one run per rank, minimizing the largest share of a rank's
    memory (`rank_memory`: usable bytes per rank). Raises `ModelTooLargeError` with the numbers
    when even the best split overfills a rank."""
    n = len(rank_memory)
    blocks = unbreakable_blocks(args)
    if n > len(blocks):
        raise OptionError(
            f"{what}: {n} ranks but only {len(blocks)} layer blocks to split "
            f"({args.num_hidden_layers} layers; KV-shared layers stay with their producers)"
        )
    tied = args.tie_word_embeddings
    per_layer = [kv_bytes(args, i, context, dtype_size) for i in range(args.num_hidden_layers)]
    first = last = 0
    for name, size in tensor_bytes.items():
        layer = layer_of(name)
        if layer is not None:
            per_layer[layer] += size
        if name.startswith(FIRST_RANK_PREFIXES):
            first += size
        if name.startswith(LAST_RANK_PREFIXES) or (tied and name.startswith(TIED_HEAD_PREFIX)):
            last += size
    block_bytes = [sum(per_layer[i] for i in b) for b in blocks]

    def share(rank: int, lo: int, hi: int) -> int:
        """Bytes of rank `rank` holding blocks [lo, hi)."""
        extra = (first if rank == 0 else 0) + (last if rank == n - 1 else 0)
        return extra + sum(block_bytes[lo:hi])

    # best[r][j]: the least worst fill (bytes / memory) of ranks 0..r holding blocks [0, j).
    inf = float("inf")
    best = [[inf] * (len(blocks) + 1) for _ in range(n)]
    cut = [[0] * (len(blocks) + 1) for _ in range(n)]
    for j in range(1, len(blocks) + 1):
        best[0][j] = share(0, 0, j) / rank_memory[0]
    for r in range(1, n):
        for j in range(r + 1, len(blocks) + 1):
            for i in range(r, j):
                fill = max(best[r - 1][i], share(r, i, j) / rank_memory[r])
                if fill < best[r][j]:
                    best[r][j], cut[r][j] = fill, i
    bounds = [len(blocks)]
    for r in range(n - 1, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    bounds.append(0)
    bounds.reverse()
    planned = tuple(share(r, bounds[r], bounds[r + 1]) for r in range(n))
    layers = tuple((blocks[bounds[r]].start, blocks[bounds[r + 1] - 1].stop) for r in range(n))
    if best[n - 1][len(blocks)] > 1:
        worst = max(range(n), key=lambda r: planned[r] / rank_memory[r])
        weights = sum(tensor_bytes.values())
        kv = sum(kv_bytes(args, i, context, dtype_size) for i in range(args.num_hidden_layers))
        raise ModelTooLargeError(
            f"{what} does not fit on {n} ranks: {_gib(weights)} GiB of weights and "
            f"{_gib(kv)} GiB of KV cache for {context} tokens; the ranks can hold "
            f"{', '.join(_gib(m) for m in rank_memory)} GiB, and the best split still puts "
            f"{_gib(planned[worst])} GiB on rank {worst} (layers {layers[worst][0]}.."
            f"{layers[worst][1] - 1}), which can hold {_gib(rank_memory[worst])} GiB: add a rank, "
            "shorten the context or load a quantized checkpoint"
        )
    return Split(layers, planned)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"
