"""The dynamic-programming searcher: exact knapsack trees, its budget, and the classic front it beats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tree_search.agents.dp_search import DPSearcher, choose_completions
from tree_search.builders import huffman
from tree_search.data.planted import PlantedConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads import NodeRecipe
from tree_search.heads.evaluator import LocalEvaluator

QUICK = NodeRecipe(train_tokens=None, valid_tokens=None, steps=16, batch_size=128, lr=0.05, measurements=2)
PLANTED = PlantedConfig(num_classes=64, dim=16, signal=3.0, num_train=8000, num_valid=2000, num_test=2000)
CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8, cost_cap=1.5)


def test_choose_completions_is_feasible_and_exact_at_the_extremes():
    rng = np.random.default_rng(0)
    optimal = feasible = 0
    for _ in range(200):
        options, parts = rng.integers(1, 5), rng.integers(1, 5)
        loss, cost = rng.random((options, parts)), rng.random((options, parts))
        best = min(
            (sum(loss[c, j] for j, c in enumerate(combo)), sum(cost[c, j] for j, c in enumerate(combo)))
            for combo in itertools.product(range(options), repeat=parts)
            if sum(cost[c, j] for j, c in enumerate(combo)) <= 1.0
        ) if any(sum(cost[c, j] for j, c in enumerate(combo)) <= 1.0
                 for combo in itertools.product(range(options), repeat=parts)) else None  # fmt: skip
        found = choose_completions(loss, cost, 1.0)
        if best is None:
            assert found is None
            continue
        choice, total_loss, total_cost = found
        feasible += 1
        assert total_cost <= 1.0 + 1e-12 and total_loss == pytest.approx(loss[choice, np.arange(parts)].sum())
        assert total_loss >= best[0] - 1e-12  # never better than the optimum (it is a real choice)
        optimal += total_loss <= best[0] + 1e-12
        for o in range(options):  # never worse than one option for every part, when that fits
            if cost[o].sum() <= 1.0:
                assert total_loss <= loss[o].sum() + 1e-12
    assert feasible > 100 and optimal >= 0.95 * feasible  # relaxation + greedy upgrades: optimal in most instances
    loss, cost = np.array([[1.0, 1.0], [0.5, 0.2]]), np.array([[0.1, 0.1], [1.0, 1.0]])
    assert choose_completions(loss, cost, 10.0)[0].tolist() == [1, 1]  # unconstrained: the lowest loss per part
    assert choose_completions(loss, cost, 0.2)[0].tolist() == [0, 0]  # only the cheapest fits
    assert choose_completions(loss, cost, 1.1)[0].tolist() == [0, 1]  # the better upgrade first
    assert choose_completions(loss, cost, 0.1) is None
    with_gap = np.array([[np.nan, 1.0], [0.5, 0.2]])  # an unmeasured option is never chosen
    assert choose_completions(with_gap, cost, 10.0)[0].tolist() == [1, 1]


def test_dp_trees_are_predicted_exactly_and_beat_the_classic_trees_under_the_cap():
    dataset = load_env_dataset(CONFIG)
    evaluator = LocalEvaluator(dataset, QUICK, budget=30)
    searcher = DPSearcher(evaluator, dataset, CONFIG, device="cpu")
    found = list(searcher.search())
    assert len(found) == evaluator.used <= 30 and len({e.key for e in found}) == len(found)
    # the knapsack's trees were predicted from node losses of *other* trees: exact to float rounding, which
    # needs node-exact training and splits that depend on a group's content only
    assert searcher.predictions, "no knapsack tree was evaluated"
    for predicted, evaluated in searcher.predictions:
        assert predicted == pytest.approx(evaluated, rel=1e-9, abs=1e-9)
    counts = dataset.counts
    cap = CONFIG.cost_cap * huffman(counts, 2).expected_cost(counts, dataset.dim) / (dataset.num_classes * dataset.dim)
    best = min((e for e in found if e.cost_ratio <= cap * (1 + 1e-9)), key=lambda e: e.valid_nll)
    classic = [LocalEvaluator(dataset, QUICK).evaluate(huffman(counts, k)) for k in (2, 3, 4)]
    within = [e for e in classic if e.cost_ratio <= cap * (1 + 1e-9)]
    assert within and best.valid_nll < min(e.valid_nll for e in within) - 0.05
