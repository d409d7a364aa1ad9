"""Pipeline parallelism (`gemma_mlx.distributed`): the split, and 2 and 3 ranks on 127.0.0.1 with
MLX's ring backend (each rank a `pipeline_worker.py` process; several models per launch, since
starting processes is the cost). Greedy output must equal the single-process output token for
token; each rank holds exactly its own tensors; a rank that dies or hangs ends the others."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_chat_model import write_model

import gemma_mlx
from benchmarks.configs import GEMMA4, tiny_config
from benchmarks.tiny_model import write_tiny_model
from gemma_mlx.distributed.split import Split, plan_split, rank_tensors, unbreakable_blocks
from gemma_mlx.distributed.stage import PipelineModel
from gemma_mlx.distributed.watchdog import EXIT_TIMEOUT, Watchdog
from gemma_mlx.drafters import make_drafter
from gemma_mlx.errors import ModelTooLargeError, OptionError
from gemma_mlx.models import gemma4_assistant, get_model_classes

WORKER = Path(__file__).with_name("pipeline_worker.py")
PROMPT = [2, 10, 20, 30, 40, 50, 60, 70, 10, 20, 30]
TOKENS = {"dense": 10, "e-style": 10, "moe": 10, "270m": 6}  # the 270M's steps cost most
GIB = 2**30


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(ranks: int, job: dict, tmp_path: Path, timeout: float = 60) -> list[subprocess.Popen]:
    """`ranks` worker processes joined by the ring backend (what `mlx.launch` sets up)."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = os.environ | {
        "MLX_HOSTFILE": str(hostfile),
        "GEMMA_MLX_PIPELINE_TIMEOUT": str(timeout),
    }
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(job_file)],
            env=env | {"MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ranks)
    ]


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    results = []
    for p in processes:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


# --- the split (no processes) ---


def lazy_model(config: dict):
    model_class, args_class = get_model_classes(config)
    return model_class(args_class.from_dict(config))


def tensor_bytes(model) -> dict[str, int]:
    return {name: value.size * 2 for name, value in tree_flatten(model.parameters())}


def test_kv_shared_layers_stay_with_their_producers():
    model = lazy_model(GEMMA4["e2b"])
    args = model.args
    tail = unbreakable_blocks(args)[-1]
    # E2B: layers 15..34 read layer 13's (sliding) and 14's (full) keys and values.
    assert (tail.start, tail.stop) == (13, 35)
    split = plan_split(args, tensor_bytes(model), [64 * GIB] * 3, 4096, 2)
    assert split.layers[-1][0] <= 13 and split.layers[-1][1] == 35


def test_split_is_the_best_contiguous_one():
    """Against brute force over every cut: the least largest share of a rank's memory."""
    model = lazy_model(tiny_config("31b"))
    args, sizes = model.args, tensor_bytes(model)
    memories = [60 * 2**20, 20 * 2**20, 40 * 2**20]
    split = plan_split(args, sizes, memories, 64, 2)
    n = args.num_hidden_layers
    total = sum(sizes.values())
    fills = []
    for a in range(1, n - 1):
        for b in range(a + 1, n):
            cuts = [(0, a), (a, b), (b, n)]
            trial = Split(tuple(cuts), ())
            shares = [
                sum(sizes[t] for t in rank_tensors(list(sizes), trial, r, True))
                + sum(
                    2 * args.n_kv_heads(i) * args.layer_head_dim(i) * 64 * 2 for i in range(lo, hi)
                )
                for r, (lo, hi) in enumerate(cuts)
            ]
            fills.append((max(s / m for s, m in zip(shares, memories, strict=True)), cuts))
    best = min(f for f, _ in fills)
    planned = max(p / m for p, m in zip(split.planned_bytes, memories, strict=True))
    assert planned == pytest.approx(best)
    # the smallest rank holds the fewest layers; no rank holds the whole model
    widths = [hi - lo for lo, hi in split.layers]
    assert widths[1] == min(widths) and max(split.planned_bytes) < total


def test_ranks_hold_each_tensor_once_but_the_tied_embedding():
    model = lazy_model(GEMMA4["e4b"])
    names = list(tensor_bytes(model))
    split = plan_split(model.args, tensor_bytes(model), [64 * GIB] * 3, 4096, 2)
    held = [set(rank_tensors(names, split, r, tied=True)) for r in range(3)]
    assert set().union(*held) == set(names)
    embed = "model.embed_tokens.weight"
    assert embed in held[0] and embed in held[2] and embed not in held[1]
    assert sum(len(h) for h in held) == len(names) + 1


def test_too_large_names_the_numbers():
    model = lazy_model(GEMMA4["31b"])
    with pytest.raises(ModelTooLargeError) as error:
        plan_split(model.args, tensor_bytes(model), [24 * GIB, 16 * GIB], 32768, 2, "31b")
    message = str(error.value)
    # 31B in bfloat16: ~61 GB of weights; 32k tokens of KV; two ranks of 24 and 16 GiB
    assert "does not fit on 2 ranks" in message and "GiB of weights" in message
    assert "24.00, 16.00 GiB" in message and "32768 tokens" in message
    with pytest.raises(OptionError, match="4 layer blocks"):
        plan_split(lazy_model(tiny_config("e2b")).args, {}, [GIB] * 5, 64, 2)


# --- ranks on 127.0.0.1 ---


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str | None]:
    root = tmp_path_factory.mktemp("pipeline-models")
    write_model(root / "drafter", seed=1)  # a drafter for "dense" (same vocabulary)
    return {
        "dense": str(write_model(root / "dense")),
        "e-style": str(write_tiny_model("e2b", root / "e2b")),
        "moe": str(write_tiny_model("26b-a4b", root / "moe")),
        "270m": None,
    }


@pytest.fixture(scope="module")
def single(models) -> dict[str, tuple[list[int], object]]:
    """Each model's greedy tokens in one process, and the model (for its tensors' sizes)."""
    out = {}
    for name, path in models.items():
        model, tokenizer = gemma_mlx.load(path)
        steps = gemma_mlx.stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS[name])
        out[name] = ([s.token for s in steps], model)
    return out


def own_bytes(model, layers: tuple[int, int], rank: int, ranks: int) -> int:
    """Bytes of the single-process model's tensors that rank `rank` holds."""
    lo, hi = layers
    total = 0
    for name, value in tree_flatten(model.parameters()):
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            keep = lo <= int(parts[2]) < hi
        elif parts[1] == "norm" or parts[0] == "lm_head":
            keep = rank == ranks - 1
        elif parts[1] == "embed_tokens":
            keep = rank == 0 or rank == ranks - 1  # tied: the last rank's head
        else:
            keep = rank == 0
        total += value.nbytes if keep else 0
    return total


def check_ranks(results, models, single, ranks: int, runs: list[dict]) -> list[str]:
    lines = []
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
        reports = [json.loads(line) for line in out.splitlines()]
        assert len(reports) == len(runs)
        for run, report in zip(runs, reports, strict=True):
            name = next(n for n, p in models.items() if p == run["model"])
            tokens, model = single[name]
            assert report["tokens"] == tokens, (name, run.get("draft"), rank)
            held = own_bytes(model, tuple(report["layers"]), rank, ranks)
            assert report["held"] == held, (name, rank)
            # the steady state: its own weights, its caches and one step's activations
            assert report["peak"] <= 1.1 * held + 2**22, (name, rank, report)
            whole = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            drafter = f" +{Path(run['draft']).name} drafting" if run.get("draft") else ""
            lines.append(
                f"{ranks} ranks, {name}{drafter}: rank {rank} "
                f"layers {report['layers']}, holds {held / 1e6:.1f} of {whole / 1e6:.1f} MB, "
                f"peak {report['peak'] / 1e6:.1f} MB (load {report['load_peak'] / 1e6:.1f} MB)"
            )
    return lines


@pytest.mark.parametrize("ranks", [2, 3])
def test_pipeline_output_equals_one_process(ranks, models, single, tmp_path):
    models_root = Path(models["dense"]).parent
    names = ["dense", "e-style", "moe", "270m"] if ranks == 2 else ["dense", "e-style", "moe"]
    runs = [{"model": models[n], "prompt": PROMPT, "tokens": TOKENS[n]} for n in names]
    # speculative: the drafter (another random dense model, whole on each rank; prompt lookup)
    # runs on every rank, the verify is pipelined
    runs.append({**runs[0], "draft": str(models_root / "drafter")})
    runs.append(
        {
            "model": models["dense"],
            "prompt": PROMPT,
            "tokens": TOKENS["dense"],
            "draft": "prompt-lookup",
        }
    )
    results = finish(start(ranks, {"runs": runs}, tmp_path))
    for line in check_ranks(results, models, single, ranks, runs):
        print(line)


def wait_stopped(process: subprocess.Popen, timeout: float) -> float:
    """When `process` entered the stopped state (SIGSTOP), polled from /proc."""
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            return time.monotonic()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("the rank did not stop")


@pytest.mark.parametrize("how", ["KILL", "STOP"])
def test_a_lost_rank_ends_the_others(how, models, tmp_path):
    """A killed rank's sockets close (the others' MLX raises); a hung one closes nothing (the
    watchdog ends the others once a step waits past the timeout)."""
    timeout = 3.0
    job = {
        "runs": [{"model": models["dense"], "prompt": PROMPT, "tokens": 200}],
        "die": {"rank": 1, "after": 3, "signal": how},
    }
    processes = start(3, job, tmp_path, timeout=timeout)
    try:
        if how == "STOP":
            stopped = wait_stopped(processes[1], 120)
        for rank in (0, 2):
            code = processes[rank].wait(timeout=120)
            err = processes[rank].stderr.read()
            if how == "KILL":
                assert code == 2 and "another rank ended" in err, (rank, code, err)
            else:
                assert time.monotonic() - stopped < timeout + 10
                assert code == EXIT_TIMEOUT and f"waited {timeout:g} s" in err, (rank, code, err)
    finally:
        for p in processes:
            p.kill()
            p.wait()


def test_generate_cli_under_mlx_launch(models, single, tmp_path):
    """The documented command: `mlx.launch ... -m gemma_mlx.generate` prints the same text on
    every rank as one process does."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    command = ["--model", models["dense"], "--prompt", "hello", "--max-tokens", "8"]
    alone = subprocess.run(
        [sys.executable, "-m", "gemma_mlx.generate", *command], capture_output=True, text=True
    )
    assert alone.returncode == 0, alone.stderr
    text = alone.stdout.splitlines()[0]
    launched = subprocess.run(
        [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1,127.0.0.1",
         "--starting-port", str(free_ports(1)[0]), "--python", sys.executable,
         "--", "-m", "gemma_mlx.generate", *command],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count(text) == 2, (text, launched.stdout)


# --- the stage in one process (a group of one: first and last rank at once) ---


def one_rank(model) -> PipelineModel:
    split = Split(((0, model.args.num_hidden_layers),), (0,))
    stage = PipelineModel(model, split, mx.distributed.init(), Watchdog(60, 0))
    stage.dtype = mx.float32
    return stage


@pytest.mark.parametrize("size", ["e4b", "26b-a4b"])  # PLE, KV sharing (untied head here); MoE
def test_a_one_rank_stage_computes_the_model(size):
    mx.random.seed(0)
    model = lazy_model(tiny_config(size) | {"tie_word_embeddings": size == "26b-a4b"})
    stage = one_rank(model)
    tokens = mx.array([[2, 5, 9, 14, 3, 7]], mx.int32)
    ours, theirs = stage.make_cache(), model.make_cache()
    assert len(ours) == len(theirs)
    # a prompt's last position (KV-shared layers see only it), then a 3-token step with hidden
    assert mx.array_equal(
        stage(tokens[:, :-1], ours, logits_to_keep=1), model(tokens[:, :-1], theirs, 1)
    )
    step = mx.array([[7, 1, 8]], mx.int32)
    for a, b in zip(
        stage(step, ours, return_hidden=True), model(step, theirs, return_hidden=True), strict=True
    ):
        assert mx.array_equal(a, b)


def test_the_mtp_assistant_is_refused_on_a_pipeline():
    target = lazy_model(tiny_config("e2b"))
    config = gemma4_assistant.config_for_target(target.args, hidden_size=32, num_hidden_layers=2)
    assistant = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(config))
    with pytest.raises(OptionError, match="MTP assistant"):
        make_drafter(assistant, one_rank(target))
