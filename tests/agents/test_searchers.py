"""Every searcher: respects its budget, yields what was counted, finds planted structure."""

from __future__ import annotations

import math

import pytest
from quick_settings import PLANTED, QUICK

from tree_search.agents import BaselineSearcher, OptunaSearcher, PolicyConfig, dataset_classics
from tree_search.agents.dp_search import DPSearcher
from tree_search.agents.seeding import homogeneous_episodes
from tree_search.data.planted import PlantedConfig, make_planted
from tree_search.envs import SearchStopped, TreeEnvConfig, load_env_dataset, make_env
from tree_search.reward.evaluator import BudgetExhausted, LocalEvaluator

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

        return RLlibSearcher(agent, factory, evaluator, policy=PolicyConfig(batch_steps=8, minibatch_size=8), seed=0,
                             seed_classics=False)  # the policy on its own  # fmt: skip
    return OptunaSearcher(agent, factory, evaluator, seed=0, seed_classics=False)  # the sampler on its own


@pytest.fixture(scope="module")
def dataset():
    return load_env_dataset(CONFIG)


@pytest.mark.parametrize("agent", AGENTS)
def test_searcher_respects_budget_and_yields_exactly_what_was_counted(agent, dataset, request):
    if agent in ("ppo", "appo"):
        request.getfixturevalue("ray_session")
    budget = 6
    counted = []
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget, listeners=[lambda e, t: counted.append(e)])
    factory = CheckedEnvFactory(dataset)
    yielded = list(make_searcher(agent, factory, evaluator).search())
    assert len(yielded) == budget == evaluator.used
    assert len({e.key for e in yielded}) == budget  # distinct trees: repeats are never counted
    # every counted evaluation reaches the caller once, in order, with its own numbers (none lost, none invented)
    counted = [e for e in counted if e.counted]
    assert [(e.index, e.key, e.valid_nll) for e in yielded] == [(e.index, e.key, e.valid_nll) for e in counted]
    assert all(math.isfinite(e.valid_nll) and e.error is None for e in yielded)
    assert factory.actions >= budget and factory.illegal == 0  # masking: no illegal action was ever sent


# A task where a search cannot enumerate: groups of more than 16 classes are offered to the agent, so one episode
# takes up to 6 decisions among 37 rules, and thousands of distinct trees are reachable for a budget of 32.
WIDE = PlantedConfig(num_classes=256, dim=16, signal=3.0, num_train=16_000, num_valid=4_000, num_test=1_000)
WIDE_CONFIG = TreeEnvConfig(dataset="planted", planted=WIDE, train=QUICK, split_min_group=16, max_steps=6)


def _distinct_trees(dataset, config, episodes: int) -> set[str]:
    """Canonical hashes of the trees of random legal episodes (no reward computed)."""

    def shapes_only(tree, projections=None):
        raise SearchStopped("shapes only")  # the episode ends truncated; its tree is kept in `last_tree`

    env = make_env({"env": "split", **config.to_env_config()}, dataset=dataset, reward_fn=shapes_only)
    seen = set()
    for seed in range(episodes):
        _, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        done = truncated = False
        while not (done or truncated):
            _, _, done, truncated, info = env.step(env.action_space.sample(mask=info["action_mask"]))
        seen.add(env.unwrapped.last_tree.canonical_hash)
    return seen


@pytest.fixture(scope="module")
def wide():
    dataset = load_env_dataset(WIDE_CONFIG)
    reference = LocalEvaluator(dataset, QUICK)
    oracle = reference.evaluate(make_planted(WIDE).tree, searcher="oracle").valid_nll
    huffman = reference.evaluate(dataset_classics(dataset, ("huffman-2",))["huffman-2"].tree).valid_nll
    assert oracle < huffman - 0.2  # the planted structure matters
    return dataset, oracle, huffman


def test_the_wide_planted_task_has_far_more_reachable_trees_than_a_budget_can_try(wide):
    # 500 random episodes give 400+ distinct trees (1,500 gave over 1,000): a budget of 32 cannot enumerate them
    assert len(_distinct_trees(wide[0], WIDE_CONFIG, 500)) >= 400


@pytest.mark.parametrize("agent", ["dp", "tpe", "ppo"])
def test_a_search_of_32_trees_closes_half_the_gap_between_huffman_and_the_oracle(agent, wide, request):
    if agent == "ppo":
        request.getfixturevalue("ray_session")
    dataset, oracle, huffman = wide
    evaluator = LocalEvaluator(dataset, QUICK, budget=32)  # a fresh evaluator: no tree is known to the search
    if agent == "dp":
        searcher = DPSearcher(evaluator, dataset, WIDE_CONFIG)
    else:
        searcher = make_searcher(agent, CheckedEnvFactory(dataset, WIDE_CONFIG), evaluator)
    found = min(e.valid_nll for e in searcher.search())
    print(f"{agent}: huffman {huffman:.4f}, oracle {oracle:.4f}, found {found:.4f}")
    assert found <= huffman - 0.5 * (huffman - oracle)


def test_tpe_beats_random_search_at_equal_budget(wide):
    """On this task random search also closes most of the gap (65-75%); TPE does better, on every seed.

    Measured over seeds 0-4: TPE ahead by 0.034, 0.077, 0.009, 0.076 and 0.062 nats. Were the two
    alike, TPE would lead on all three seeds here one time in eight, and by 0.02 on average rarely.
    """
    dataset = wide[0]
    lead = []
    for seed in range(3):
        found = {}
        for agent in ("tpe", "random"):
            evaluator = LocalEvaluator(dataset, QUICK, budget=32)
            searcher = OptunaSearcher(agent, CheckedEnvFactory(dataset, WIDE_CONFIG), evaluator, seed=seed,
                                      seed_classics=False)  # fmt: skip
            found[agent] = min(e.valid_nll for e in searcher.search())
        lead.append(found["random"] - found["tpe"])
    assert min(lead) > 0 and sum(lead) / len(lead) > 0.02, lead


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
    assert 5 <= len(episodes) <= env.action_space.n and all(len(set(e.params.values())) == 1 for e in episodes)
    assert len({e.tree.canonical_hash for e in episodes}) == len(episodes)  # one episode per distinct tree
    within = [e.tree for e in episodes if e.within_cap]
    assert within and len(within) < len(episodes)  # some over the cap (never trained), some within
    for e in episodes:  # "within" is the environment's own cap rule
        assert e.within_cap == (env.unwrapped.scorer.cost(e.tree) <= env.unwrapped.scorer.cap * (1 + 1e-9))
    budget = 12
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget)
    found = list(OptunaSearcher("tpe", factory, evaluator, seed=0).search())
    p = env.unwrapped.counts / env.unwrapped.counts.sum()
    # multiply-adds by hand; equal costs keep the action order (three trees tie at 20 here in exact arithmetic)
    seeded = sorted(within, key=lambda t: -round(float(p @ t.path_fanout_sum), 9))[: budget // 2]
    assert [e.key for e in found[: budget // 2]] == [t.canonical_hash for t in seeded]  # the costliest first
    assert len(found) == budget  # then the sampler's own trees


def test_a_seeded_ppo_search_plays_the_classic_trees_then_starts_from_the_best(dataset, ray_session):
    """RLlib seeding: the homogeneous trees first (the costliest first), then the best one's actions cloned."""
    from tree_search.agents.rllib_search import RLlibSearcher

    factory = CheckedEnvFactory(dataset, CONFIG.with_updates(cost_cap=3.0, split_min_group=8))
    budget = 8  # half of it to seeds: the 4 costliest trees within the cap
    within = sorted((e for e in homogeneous_episodes(factory) if e.within_cap), key=lambda e: -e.cost)[: budget // 2]
    evaluator = LocalEvaluator(dataset, QUICK, budget=budget)
    searcher = RLlibSearcher("ppo", factory, evaluator, policy=PolicyConfig(batch_steps=8, minibatch_size=8), seed=0)
    found = list(searcher.search())
    assert [e.key for e in found[: len(within)]] == [e.tree.canonical_hash for e in within]
    assert len(found) == budget and factory.illegal == 0
    best = min(found[: len(within)], key=lambda e: e.valid_nll)
    demonstrated = next(e for e in within if e.tree.canonical_hash == best.key)
    assert searcher.demonstration and searcher.demonstration[0] == demonstrated.action  # at the root all are legal
    # the sampling policy (the env runner's copy, after the weights were sent) gives the best tree's actions
    # about the target probability, where an untrained policy gives each legal action about the same
    assert searcher.demonstration_probability >= 0.45
    assert len(searcher.demonstration) == demonstrated.steps
    # a search that is not seeded starts from the untrained policy
    unseeded = RLlibSearcher("ppo", factory, LocalEvaluator(dataset, QUICK, budget=4), seed=0, seed_classics=False,
                             policy=PolicyConfig(batch_steps=8, minibatch_size=8))  # fmt: skip
    list(unseeded.search())
    assert unseeded.demonstration is None and unseeded.demonstration_probability is None


def test_ppo_gives_up_when_no_tree_fits_the_cap(dataset, ray_session):
    """A cap below every tree of the environment penalises every episode: the search stops instead of spinning."""
    from tree_search.agents.rllib_search import RLlibSearcher

    factory = CheckedEnvFactory(dataset, CONFIG.with_updates(cost_cap=0.2))
    evaluator = LocalEvaluator(dataset, QUICK, budget=4)
    searcher = RLlibSearcher("ppo", factory, evaluator, policy=PolicyConfig(batch_steps=8, minibatch_size=8), seed=0,
                             give_up_after=3)  # fmt: skip
    assert list(searcher.search()) == [] and searcher.gave_up and evaluator.used == 0
    assert searcher.iterations == 3 and factory.actions > 0


def test_a_tree_file_is_a_baseline_matched_to_the_dataset_by_token(dataset, tmp_path, monkeypatch):
    import numpy as np

    from tree_search import builders
    from tree_search.agents.baselines import resolved_baselines, split_baselines, tree_file_baseline
    from tree_search.export import save_tree
    from tree_search.search.config import SearchConfig
    from tree_search.tree import Tree

    original = builders.huffman(dataset.counts, 3)
    V, tokens = dataset.num_classes, dataset.vocab.tokens
    perm = np.random.default_rng(0).permutation(V)  # the file's class j is the dataset's class perm[j]
    file_id = np.argsort(perm)
    ids = original.child_ids
    shuffled = Tree.from_csr(V, original.child_ptr, np.where(ids < V, file_id[np.minimum(ids, V - 1)], ids))
    path = save_tree(tmp_path / "mine.tree.json", shuffled, labels=[tokens[c] for c in perm])
    baseline = tree_file_baseline(path, tokens)
    assert baseline.name == "mine.tree.json" and baseline.tree.canonical_hash == original.canonical_hash

    assert split_baselines(f"front,{path}") == (builders.classic_names("front"), (str(path),))
    evaluator = LocalEvaluator(dataset, QUICK)
    found = {e.searcher: e for e in BaselineSearcher(evaluator, dataset, f"huffman-2,{path}").search()}
    assert set(found) == {"baseline:huffman-2", "baseline:mine.tree.json"}
    assert found["baseline:mine.tree.json"].key == evaluator.evaluate(original).key  # the same tree, known

    gone = f"huffman-2,{tmp_path / 'nope.tree.json'}"
    with pytest.raises(ValueError, match=r"no such tree file: .*nope.tree.json"):
        resolved_baselines(gone)  # a new run's start
    assert SearchConfig(baselines=gone).baselines == gone  # a run read back (compare, report) does not need the file
    with pytest.raises(ValueError, match="two tree files named alike"):
        SearchConfig(baselines=f"{path},{tmp_path / 'other' / 'mine.tree.json'}")
    monkeypatch.chdir(tmp_path)
    assert resolved_baselines("front,mine.tree.json") == f"front,{tmp_path.resolve() / 'mine.tree.json'}"  # absolute
    unlabelled = save_tree(tmp_path / "plain.tree.json", original)
    with pytest.raises(ValueError, match="plain.tree.json: the tree file has no labels"):
        tree_file_baseline(unlabelled, tokens)
    wrong = save_tree(tmp_path / "other.tree.json", original, labels=["x" + t for t in tokens])
    with pytest.raises(ValueError, match=r"other.tree.json: 64 of its classes are not tokens of the dataset \('x0'"):
        tree_file_baseline(wrong, tokens)


def test_a_set_leaves_out_a_tree_too_large_for_the_dataset_and_says_why(dataset, monkeypatch):
    """two-level holds V x sqrt(V) distances: above its bound a set leaves it out (logged); named alone, an error."""
    from tree_search.builders import classics

    assert "two-level" in dataset_classics(dataset, "all")  # 64 classes: built
    monkeypatch.setattr(classics, "TWO_LEVEL_MAX_CLASSES", dataset.num_classes - 1)
    said: list[str] = []
    trees = dataset_classics(dataset, "all,huffman-8", log=said.append)
    assert "two-level" not in trees and {"huffman-2", "huffman-8", "kmeans-16", "random"} <= set(trees)
    assert said == [
        f"two-level is not built above {dataset.num_classes - 1} classes: its balanced k-means over 8 "
        f"clusters would hold 0.0 GB of distances at {dataset.num_classes}; left out of the baselines"
    ]
    with pytest.raises(ValueError, match="two-level is not built above 63 classes"):
        dataset_classics(dataset, "huffman-2,two-level")
