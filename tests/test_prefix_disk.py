"""The prefix cache's disk tier (`--prompt-cache-dir`): snapshots evicted from memory, and those of
a server that restarted, are found on disk and continue exactly as a fresh run; files of another
model are ignored, damaged ones removed, each with a warning; the disk budget evicts the least
recently used file."""

from __future__ import annotations

import logging

import mlx.core as mx
import openai
import pytest
from server_helpers import serving
from tiny_chat_model import write_model

from gemma_mlx.decode import prefill
from gemma_mlx.generate import stream_generate
from gemma_mlx.loading import load
from gemma_mlx.server.prefix_cache import PrefixCache
from gemma_mlx.server.prefix_disk import DiskTier, file_name

PROMPT = [2, *range(20, 80)]  # past the sliding window of 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    return (
        load(write_model(root / "a", seed=0, max_position_embeddings=1024)),
        load(write_model(root / "b", seed=1, max_position_embeddings=1024)),
    )


def filled(model, tokens, cache=None) -> list:
    cache = model.make_cache() if cache is None else cache
    prefill(model, cache, tokens, 16)
    return cache


def greedy(model, tokenizer, prompt, cache=None) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, 8, prompt_cache=cache)]


def test_restart_finds_the_snapshot_and_continues_exactly(tiny, tmp_path):
    model, tokenizer = tiny[0]
    first = PrefixCache(
        model.make_cache, 1 << 30, DiskTier(tmp_path, 1 << 30, model, model.make_cache)
    )
    first.store(PROMPT, filled(model, PROMPT))
    assert [p.name for p in tmp_path.iterdir()] == [file_name(PROMPT)]

    restarted = PrefixCache(
        model.make_cache, 1 << 30, DiskTier(tmp_path, 1 << 30, model, model.make_cache)
    )
    longer = [*PROMPT, 90, 91]
    cache, n = restarted.fetch(longer)
    assert n == len(PROMPT)
    reference = filled(model, PROMPT)
    for got, want in zip(cache, reference, strict=True):
        assert got.offset == want.offset
        for a, b in zip(got.state, want.state, strict=True):
            assert mx.array_equal(a, b)
    assert greedy(model, tokenizer, longer, cache) == greedy(model, tokenizer, longer)
    assert len(restarted) == 1  # read back into memory


def test_memory_eviction_spills_to_disk(tiny, tmp_path):
    model, _ = tiny[0]
    size = sum(c.nbytes for c in filled(model, PROMPT))
    cache = PrefixCache(
        model.make_cache, size + size // 2, DiskTier(tmp_path, 1 << 30, model, model.make_cache)
    )
    other = [2, *range(100, 160)]
    cache.store(PROMPT, filled(model, PROMPT))
    cache.store(other, filled(model, other))
    assert len(cache) == 1  # the first left memory
    assert cache.fetch([*PROMPT, 5])[1] == len(PROMPT)


def test_foreign_and_damaged_files_are_skipped_with_a_warning(tiny, tmp_path, caplog):
    (model, _), (other, _) = tiny
    DiskTier(tmp_path, 1 << 30, other, other.make_cache).put(PROMPT, filled(other, PROMPT))
    (tmp_path / ("0" * 32 + ".safetensors")).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    with caplog.at_level(logging.WARNING, logger="gemma_mlx.server"):
        tier = DiskTier(tmp_path, 1 << 30, model, model.make_cache)
    assert tier.keys() == []
    assert "different model" in caplog.text and "cannot be read" in caplog.text
    assert (tmp_path / file_name(PROMPT)).exists()  # another model's file is left alone

    # Caches of other settings (here --max-kv-size's rotating full layers) are ignored too.
    def bounded() -> list:
        return model.make_cache(max_kv_size=64)

    elsewhere = tmp_path / "other-settings"
    DiskTier(elsewhere, 1 << 30, model, bounded).put(PROMPT, filled(model, PROMPT, bounded()))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gemma_mlx.server"):
        assert DiskTier(elsewhere, 1 << 30, model, model.make_cache).keys() == []
    assert "other settings" in caplog.text

    # A file damaged after the scan: refused when read (checksum), removed, nothing reused.
    mine = [2, *range(30, 70)]
    tier.put(mine, filled(model, mine))
    path = tmp_path / file_name(mine)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gemma_mlx.server"):
        _, n = PrefixCache(model.make_cache, 1 << 30, tier).fetch([*mine, 5])
    assert n == 0 and "checksum" in caplog.text and not path.exists()


def test_disk_budget_evicts_the_least_recently_used(tiny, tmp_path):
    model, _ = tiny[0]
    prompts = [[2, *range(s, s + 40)] for s in (100, 200, 300)]
    probe = DiskTier(tmp_path / "probe", 1 << 30, model, model.make_cache)
    probe.put(prompts[0], filled(model, prompts[0]))
    size = probe.nbytes
    tier = DiskTier(tmp_path / "tier", 2 * size + size // 2, model, model.make_cache)
    tier.put(prompts[0], filled(model, prompts[0]))
    tier.put(prompts[1], filled(model, prompts[1]))
    assert tier.get(prompts[0]) is not None  # used: the second is now the oldest
    tier.put(prompts[2], filled(model, prompts[2]))
    assert sorted(tier.keys()) == sorted([tuple(prompts[0]), tuple(prompts[2])])
    assert sorted(p.name for p in (tmp_path / "tier").iterdir()) == sorted(
        file_name(p) for p in (prompts[0], prompts[2])
    )


def test_server_restart_reuses_the_prompt(tiny, tmp_path):
    model, tokenizer = tiny[0]
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    flags = ("--served-model-name", "m", "--prompt-cache-dir", str(tmp_path / "cache"))
    replies = []
    for _ in range(2):  # a server, then a new one on the same directory
        with serving(model, tokenizer, *flags) as running:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
            replies.append(
                client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
            )
    first, second = replies
    assert first.choices[0].text == second.choices[0].text
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 100
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    expected = "".join(r.text for r in stream_generate(model, tokenizer, prompt, 8))
    assert first.choices[0].text == expected
