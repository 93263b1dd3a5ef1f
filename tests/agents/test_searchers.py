"""Every searcher: respects its budget, reports monotone best-so-far, finds planted structure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tree_search.agents import BaselineSearcher, OptunaSearcher, PolicyConfig, dataset_classics
from tree_search.agents.optuna_search import homogeneous_episodes
from tree_search.data.planted import PlantedConfig, make_planted
from tree_search.envs import TreeEnvConfig, load_env_dataset, make_env
from tree_search.heads import NodeRecipe
from tree_search.heads.evaluator import BudgetExhausted, LocalEvaluator

QUICK = NodeRecipe(train_tokens=None, valid_tokens=None, steps=16, batch_size=128, lr=0.05, measurements=2)
PLANTED = PlantedConfig(num_classes=64, dim=16, signal=3.0, num_train=8000, num_valid=2000, num_test=2000)
CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK)
AGENTS = ["tpe", "cmaes", "random", "nsga2", "ppo", "appo"]


class CheckedEnvFactory:
    """Builds split environments and records every action against the mask in force."""

    def __init__(self, dataset, config=CONFIG):
        self.dataset, self.config, self.actions, self.illegal = dataset, config, 0, 0

    def __call__(self, reward_fn):
        env = make_env({"env": "split", **self.config.to_env_config()}, dataset=self.dataset, reward_fn=reward_fn)
        step, factory = env.step, self

        def checked_step(action):
            factory.actions += 1
            factory.illegal += int(not env.action_masks()[int(action)])
            return step(action)

        env.step = checked_step
        return env


def make_searcher(agent, factory, evaluator):
    if agent in ("ppo", "appo"):
        from tree_search.agents.rllib_search import RLlibSearcher

        return RLlibSearcher(agent, factory, evaluator, policy=PolicyConfig(batch_steps=8, minibatch_size=8), seed=0)
    return OptunaSearcher(agent, factory, evaluator, seed=0, seed_classics=False)  # the sampler on its own


@pytest.fixture(scope="module")
def dataset():
    return load_env_dataset(CONFIG)


@pytest.mark.parametrize("agent", AGENTS)
def test_searcher_respects_budget_and_reports_monotone_best(agent, dataset, request):
    if agent in ("ppo", "appo"):
        request.getfixturevalue("ray_session")
    budget = 6
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget)
    factory = CheckedEnvFactory(dataset)
    yielded = list(make_searcher(agent, factory, evaluator).search())
    assert len(yielded) == budget == evaluator.used
    assert len({e.key for e in yielded}) == budget  # distinct trees: repeats are never counted
    best = np.minimum.accumulate([e.valid_nll for e in yielded])
    assert np.all(np.diff(best) <= 0) and math.isfinite(best[-1])
    assert factory.actions >= budget and factory.illegal == 0  # masking: no illegal action was ever sent


@pytest.mark.parametrize("agent", ["ppo", "tpe"])
def test_search_closes_half_the_gap_between_huffman_and_the_oracle(agent, dataset, request):
    if agent == "ppo":
        request.getfixturevalue("ray_session")
    planted = make_planted(PLANTED)
    reference = LocalEvaluator(dataset, QUICK)
    oracle = reference.evaluate(planted.tree, searcher="oracle").valid_nll
    huffman = reference.evaluate(dataset_classics(dataset, ("huffman-2",))["huffman-2"].tree).valid_nll
    assert oracle < huffman - 0.2  # the planted structure matters
    evaluator = LocalEvaluator(dataset, QUICK, budget=16)  # a fresh evaluator: no tree is known to the search
    found = min(e.valid_nll for e in make_searcher(agent, CheckedEnvFactory(dataset), evaluator).search())
    print(f"{agent}: huffman {huffman:.4f}, oracle {oracle:.4f}, found {found:.4f}")
    assert found <= huffman - 0.5 * (huffman - oracle)


def test_evaluator_deduplicates_and_enforces_the_budget(dataset):
    trees = {k: c.tree for k, c in dataset_classics(dataset, ("huffman-2", "huffman-4", "balanced-2")).items()}
    seen = []
    evaluator = LocalEvaluator(dataset, QUICK, budget=2, listeners=[lambda e, t: seen.append(e)])
    first = evaluator.evaluate(trees["huffman-2"], searcher="a")
    again = evaluator.evaluate(trees["huffman-2"].canonical(), searcher="b")  # same tree, other numbering
    assert again.valid_nll == first.valid_nll and not again.counted and evaluator.used == 1 and len(seen) == 1
    evaluator.evaluate(trees["huffman-4"])
    assert evaluator.exhausted
    with pytest.raises(BudgetExhausted, match="budget of 2"):
        evaluator.evaluate(trees["balanced-2"])
    result = evaluator(trees["balanced-2"])  # environments get a failed result, never an exception
    assert not result.ok and "budget" in result.error
    assert evaluator(trees["huffman-2"]).valid_nll == first.valid_nll  # known trees are still answered


def test_baselines_are_extra_and_include_pytorch_adaptive_softmax(dataset):
    evaluator = LocalEvaluator(dataset, QUICK, budget=1)
    rows = list(BaselineSearcher(evaluator, dataset, ("huffman-2", "adaptive", "two-level", "kmeans-4")).search())
    assert [r.searcher for r in rows] == [
        "baseline:huffman-2",
        "baseline:adaptive",
        "baseline:two-level",
        "baseline:kmeans-4",
    ]
    assert evaluator.used == 0 and all(r.ok for r in rows)
    assert rows[1].projections == {1: PLANTED.dim // 4, 2: PLANTED.dim // 16}
    with pytest.raises(ValueError, match="unknown classic tree 'oak'"):
        dataset_classics(dataset, ("oak",))


def test_a_seeded_optuna_search_starts_from_the_homogeneous_trees(dataset):
    """The classic trees the split environment can express come first, at most half the budget of them."""
    factory = CheckedEnvFactory(dataset, CONFIG.with_updates(cost_cap=3.0, split_min_group=8))
    episodes = homogeneous_episodes(factory)
    env = factory(lambda *a: None)
    assert 5 <= len(episodes) <= env.action_space.n and all(len(set(p.values())) == 1 for p, _, _ in episodes)
    assert len({t.canonical_hash for _, t, _ in episodes}) == len(episodes)  # one episode per distinct tree
    within = [t for _, t, fits in episodes if fits]
    assert within and len(within) < len(episodes)  # some over the cap (never trained), some within
    for tree, fits in [(t, f) for _, t, f in episodes]:  # "within" is the environment's own cap rule
        assert fits == (env.unwrapped.scorer.cost(tree) <= env.unwrapped.scorer.cap * (1 + 1e-9))
    budget = 12
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget)
    found = list(OptunaSearcher("tpe", factory, evaluator, seed=0).search())
    seeded = sorted(within, key=lambda t: -t.expected_cost(env.unwrapped.counts))[: budget // 2]
    assert [e.key for e in found[: budget // 2]] == [t.canonical_hash for t in seeded]  # the costliest first
    assert len(found) == budget  # then the sampler's own trees
