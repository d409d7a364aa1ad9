"""Draft lengths for a batch (`DraftPlanner`), and the batch table of the cost model.

The planner is checked against brute force: over every allocation of drafts to three sequences,
its choice has the highest expected tokens per second under its own cost model; drafts go to the
sequences that keep them, none where extra rows cost more than they bring, and a plain step is
measured before anything is drafted.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.batch_cost import bytes_per_token, experts_read
from benchmarks.roofline import WeightBytes
from gemma_mlx.batching.speculation import DraftPlanner, FixedDrafts, draft_planner
from gemma_mlx.errors import OptionError


def planner_with(costs: dict[int, float], **options) -> DraftPlanner:
    planner = DraftPlanner(probe_every=10**9, **options)
    for rows, seconds in costs.items():
        planner.observe(rows, seconds)
    return planner


def expected_speed(planner: DraftPlanner, alphas, ks) -> float:
    tokens = sum((1 - a ** (k + 1)) / (1 - a) for a, k in zip(alphas, ks, strict=True))
    return tokens / planner.cost(len(alphas) + sum(ks))


def test_a_plain_step_is_measured_first():
    assert DraftPlanner().plan([0.9, 0.9], [8, 8], 2) == [0, 0]


@pytest.mark.parametrize(
    "alphas, costs",
    [
        ([0.9, 0.5, 0.05], {3: 1.0, 6: 1.2, 12: 2.0}),  # cheap rows: drafts for the good ones
        ([0.3, 0.2, 0.1], {3: 1.0, 6: 2.5, 12: 6.0}),  # dear rows, poor drafts: none
        ([0.95, 0.95, 0.95], {3: 1.0, 4: 1.7, 12: 2.2}),  # a jump at 4 rows, flat after it
    ],
)
def test_the_plan_maximizes_expected_tokens_per_second(alphas, costs):
    planner = planner_with(costs, max_draft=4)
    ks = planner.plan(alphas, [4, 4, 4], len(alphas))
    best = max(
        (expected_speed(planner, alphas, c), c) for c in itertools.product(range(5), repeat=3)
    )
    assert expected_speed(planner, alphas, ks) == pytest.approx(best[0])


def test_drafts_follow_acceptance_and_limits():
    planner = planner_with({4: 1.0, 8: 1.1, 36: 1.5})
    ks = planner.plan([0.95, 0.6, 0.0, 0.9], [8, 8, 8, 1], 4)
    assert ks[0] > ks[1] > ks[2] == 0
    assert ks[3] == 1  # its limit: max_tokens leaves room for one draft


def test_verify_cost_is_shared():
    """The same sequence gets drafts in a batch where a step costs little more per row, and none
    alone where a 2-row step costs nearly two 1-row steps."""
    alone = planner_with({1: 1.0, 2: 1.9, 4: 2.8})
    assert alone.plan([0.5], [8], 1) == [0]
    shared = planner_with({8: 1.0, 16: 1.1, 40: 1.6})
    ks = shared.plan([0.5] * 8, [8] * 8, 8)
    assert sum(ks) > 0


def test_fixed_drafts():
    assert FixedDrafts(3).plan([0.1, 0.9], [8, 2], 2) == [3, 2]
    assert isinstance(draft_planner("auto"), DraftPlanner)
    with pytest.raises(OptionError, match="num_draft"):
        draft_planner(-1)


def test_experts_read_matches_sampling():
    rng = np.random.default_rng(0)
    for batch in (1, 2, 8, 16):
        distinct = [
            len({e for _ in range(batch) for e in rng.choice(128, 8, replace=False)})
            for _ in range(400)
        ]
        assert np.mean(distinct) == pytest.approx(experts_read(128, 8, batch), rel=0.03)


def test_batch_weight_bytes():
    dense = WeightBytes(dense=1000, embedding_rows=10, experts=0)
    assert [bytes_per_token(dense, 0, 0, b) for b in (1, 4)] == [1010, 1000 / 4 + 10]
    moe = WeightBytes(dense=1000, embedding_rows=0, experts=80)  # 8 of 128 experts per token
    per = [bytes_per_token(moe, 128, 8, b) for b in (1, 2, 4, 8, 16)]
    assert per[0] == pytest.approx(1080)
    assert all(a > b for a, b in itertools.pairwise(per))
    # Sixteen tokens read more experts than one, so the expert share shrinks less than 1/16.
    assert per[-1] * 16 - 1000 > 80
