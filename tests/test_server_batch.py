"""The server's continuous batching: clients in flight at once, joining the batch at different
steps, each get exactly what they get alone (`gemma_mlx.generate`) at temperature 0, and a
seeded sampling request the same tokens whatever runs beside it."""

from __future__ import annotations

import threading

import openai
import pytest
from server_helpers import serving
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.batching.scheduler import BatchScheduler
from gemma_mlx.loading import load

NAME = "tiny"
PENALTY = {"repetition_penalty": 3.0}  # varied greedy text from a random tiny model
PROMPTS = [
    ("the quick brown fox", 24),
    ("a lazy dog sleeps " * 6, 12),
    ("hello", 30),
    ("paris is the capital of", 18),
    ("rare characters: é ü ß", 8),
    ("it keeps going and going and", 20),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("server-batch") / "m"
    return load(write_model(directory, max_position_embeddings=1024))


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    flags = ["--served-model-name", NAME, "--decode-concurrency", "8", "--prefill-step-size", "16"]
    with serving(model, tokenizer, *flags) as running:
        yield running


def watch_steps(engine) -> list[tuple[int, int, int]]:
    """Record, for each of the engine's batched steps from now on, how many requests run, how
    many wait for room, and how many of the running ones speculate."""
    seen: list[tuple[int, int, int]] = []
    scheduler = engine.scheduler
    step = scheduler.step

    def counted():
        active = scheduler.active
        seen.append((len(active), len(scheduler.waiting), sum(s.draft is not None for s in active)))
        return step()

    scheduler.step = counted
    return seen


def in_flight(url: str, prompts: list[tuple[str, int]], **options) -> list[str]:
    """Completions of `prompts`, all sent at once from their own threads."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    texts: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        prompt, max_tokens = prompts[i]
        reply = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=max_tokens, extra_body=options
        )
        texts[i] = reply.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return texts


def test_concurrent_clients_each_get_their_solo_output(tiny, server):
    """Client i starts once client i-1 has streamed its first text, so the requests join a batch
    that is already decoding (and its prompts are prefilled in chunks between others' tokens)."""
    model, tokenizer = tiny
    expected = [
        gemma_mlx.generate(model, tokenizer, p, max_tokens=m, **PENALTY) for p, m in PROMPTS
    ]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    started = [threading.Event() for _ in PROMPTS]
    texts: list[str | None] = [None] * len(PROMPTS)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            if i:
                assert started[i - 1].wait(120)
            prompt, max_tokens = PROMPTS[i]
            stream = client.completions.create(
                model=NAME, prompt=prompt, max_tokens=max_tokens, stream=True,
                extra_body=PENALTY,
            )  # fmt: skip
            parts = []
            for chunk in stream:
                parts.append(chunk.choices[0].text)
                started[i].set()
            texts[i] = "".join(parts)
        except BaseException as e:  # reported below, with the others' results
            errors.append(e)
            started[i].set()

    seen = watch_steps(server.engine)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert texts == expected
    sizes = sorted({n for n, _, _ in seen})
    assert max(sizes) >= 3, f"the requests never shared a step: batch sizes {sizes}"


def test_a_seeded_request_is_batch_independent(tiny, server):
    model, tokenizer = tiny
    options = {"temperature": 1.0, "seed": 1234, "max_tokens": 16}
    expected = gemma_mlx.generate(
        model, tokenizer, "the quick brown fox", temp=1.0, seed=1234, max_tokens=16
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    neighbours: list[str] = []

    def neighbour(prompt: str) -> None:
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0.8)
        neighbours.append(reply.choices[0].text)

    threads = [threading.Thread(target=neighbour, args=(p,)) for p, _ in PROMPTS[:3]]
    for t in threads:
        t.start()
    seeded = client.completions.create(model=NAME, prompt="the quick brown fox", **options)
    for t in threads:
        t.join(120)
    assert len(neighbours) == 3
    assert seeded.choices[0].text == expected


def test_speculative_decoding_stays_on_in_the_batch(tiny):
    """With a drafter, concurrent requests draft and verify in one pass and still give their
    plain greedy text."""
    model, tokenizer = tiny
    prompts = [("the quick brown fox jumps over the lazy dog. " * 4, 20), PROMPTS[1], PROMPTS[5]]
    expected = [gemma_mlx.generate(model, tokenizer, p, max_tokens=m) for p, m in prompts]
    flags = ["--served-model-name", NAME, "--draft-model", "prompt-lookup", "--num-draft", "3"]
    with serving(model, tokenizer, *flags) as running:
        seen = watch_steps(running.engine)
        texts = in_flight(running.url, prompts)
    assert texts == expected
    assert max(drafting for _, _, drafting in seen) >= 2


def test_requests_beyond_the_kv_budget_wait_their_turn(tiny):
    """A budget that holds one request's caches and pass but not two: four requests sent at once
    run one after another, and each gets its solo output (none is refused)."""
    model, tokenizer = tiny
    prompts = [PROMPTS[0]] * 4
    probe = BatchScheduler(model, tokenizer)
    for prompt, max_tokens in prompts[:2]:
        probe.submit(prompt, max_tokens)
    one = probe.memory_needed([probe.waiting[0]])
    assert probe.memory_needed(list(probe.waiting)) > one
    expected = [gemma_mlx.generate(model, tokenizer, prompts[0][0], max_tokens=24, **PENALTY)] * 4
    with serving(model, tokenizer, "--served-model-name", NAME, "--kv-budget", str(one)) as running:
        seen = watch_steps(running.engine)
        texts = in_flight(running.url, prompts, **PENALTY)
    assert texts == expected
    assert max(active for active, _, _ in seen) == 1
    assert max(waiting for _, waiting, _ in seen) >= 2
