"""dp's plans replayed as decisions of the two-level split environment (the expert's demonstrations)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from quick_settings import PLANTED, QUICK

from tree_search.agents.dp_search import DPSearcher
from tree_search.agents.expert import demonstrate
from tree_search.data.features import class_embeddings
from tree_search.envs import SearchStopped, TreeEnvConfig, load_env_dataset, make_env
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.split_grammar import FLAT, Plan, huffman_rule, normalise_embeddings, partition_group, plan_head

CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8, cost_cap=1.5,
                       split_two_level=True, max_steps=17)  # fmt: skip


def _stop(tree, projections=None):
    raise SearchStopped("the tree only")


@pytest.fixture(scope="module")
def env():
    return make_env({"env": "split", **CONFIG.to_env_config()}, reward_fn=_stop)


def _by_content(tree, projections):
    return {(int(tree.min_leaf[n]), int(tree.subtree_size[n])): p for n, p in projections.items()}


def test_the_two_level_mode_adds_dp_s_actions_and_leaves_the_default_episodes_alone(env):
    default = make_env({"env": "split", **dataclasses.replace(CONFIG, split_two_level=False).to_env_config()},
                       reward_fn=_stop)  # fmt: skip
    assert default.action_space.n == 9 * 4 + 1  # v1's 37 actions
    # 36 split rules, 9 classic root shapes, 3 projected flat nodes, 6 Huffman subtrees, flat
    assert env.action_space.n == 36 + 9 + 3 + 6 + 1
    assert env.unwrapped.action_of(huffman_rule(3)) == 36 + 9 + 3 + 1
    with pytest.raises(ValueError, match="no action for the rule"):
        default.unwrapped.action_of(huffman_rule(3))
    with pytest.raises(ValueError, match="split_two_level must be False with a taxonomy start"):
        dataclasses.replace(CONFIG, taxonomy="tokens.tsv")
    with pytest.raises(ValueError, match="max_steps to at least 17"):
        make_env({"env": "split", **dataclasses.replace(CONFIG, max_steps=16).to_env_config()}, reward_fn=_stop)


def test_random_two_level_plans_build_plan_head_s_trees(env):
    """Every plan of dp's grammar (root rule, one completion per part) is one episode, with the same tree."""
    split = env.unwrapped
    data = split.dataset
    embeddings = normalise_embeddings(class_embeddings(data))
    rng = np.random.default_rng(0)
    roots = [r for r in split.rules if r.cut in ("count", "mass", "headtail", "cutoffs")]
    completions = [r for r in split.rules if r.cut not in ("cutoffs",)]
    compared = huffman_parts = projected_parts = 0
    for _ in range(30):
        root = roots[rng.integers(len(roots))]
        env.reset()
        if not env.unwrapped.action_masks()[split.action_of(root)]:
            continue
        _, parts = partition_group(np.arange(data.num_classes), root, data.counts, embeddings, seed=CONFIG.seed,
                                   head_max=CONFIG.split_head_max)  # fmt: skip
        chosen = {}
        for i, part in enumerate(parts):
            if part.size > 1:
                legal = [c for c in completions if c.flat or c.fanout < part.size]
                chosen[i] = legal[rng.integers(len(legal))]
        demo = demonstrate(env, root, chosen, parts)
        tree, projections = plan_head(data.counts, embeddings, Plan(root, {i: Plan(c) for i, c in chosen.items()}),
                                      seed=CONFIG.seed, leaf_size=CONFIG.split_leaf_size,
                                      head_max=CONFIG.split_head_max)  # fmt: skip
        assert demo.tree.canonical_hash == tree.canonical_hash, (str(root), [str(c) for c in chosen.values()])
        assert _by_content(demo.tree, demo.projections) == _by_content(tree, projections)
        assert demo.actions.size == 1 + len(chosen) and demo.action_masks[np.arange(demo.actions.size),
                                                                          demo.actions].all()  # fmt: skip
        compared += 1
        huffman_parts += sum(c.cut == "huffman" for c in chosen.values())
        projected_parts += sum(c.flat and c.projection > 0 for c in chosen.values())
    assert compared >= 15 and huffman_parts >= 5 and projected_parts >= 2


def test_a_huffman_part_is_that_part_s_huffman_tree(env):
    split = env.unwrapped
    counts = split.dataset.counts
    root = next(r for r in split.rules if r.cut == "count" and r.fanout == 2 and r.order == "frequency")
    from tree_search.builders import huffman

    _, parts = partition_group(np.arange(counts.size), root, counts, split.embeddings, seed=CONFIG.seed)
    demo = demonstrate(env, root, {0: huffman_rule(4), 1: FLAT}, parts)
    tree = demo.tree
    root_children = [c - tree.num_classes for c in tree.children(0)]
    sizes = sorted(int(tree.subtree_size[n]) for n in root_children)
    assert sizes == sorted(p.size for p in parts)
    first = next(n for n in root_children if tree.min_leaf[n] == parts[0].min())
    # the part's subtree has the depths of the part's own 4-ary Huffman tree, class by class
    own = huffman(counts[parts[0]], 4)
    assert np.array_equal(tree.depth[parts[0]] - 1, own.depth)
    assert tree.fanout[first] == 4
    flat = next(n for n in root_children if tree.min_leaf[n] == parts[1].min())
    assert tree.fanout[flat] == parts[1].size  # one flat node of any size in the two-level mode


def test_dp_s_choice_replays_as_its_own_tree():
    dataset = load_env_dataset(CONFIG)
    searcher = DPSearcher(LocalEvaluator(dataset, QUICK, budget=12), dataset, CONFIG)
    list(searcher.search())
    root, completions, parts, predicted = searcher.best_plan()
    env = make_env({"env": "split", **CONFIG.to_env_config()}, reward_fn=_stop)
    demo = demonstrate(env, root, completions, parts)
    tree, projections = searcher._tree(root, completions)
    assert demo.tree.canonical_hash == tree.canonical_hash
    assert _by_content(demo.tree, demo.projections) == _by_content(tree, projections)
    # the plan is dp's best at the cap: its predicted NLL is the lowest knapsack value over the measured roots
    assert predicted == min(searcher._objective(entry) for entry in searcher.measured.values())
    assert len({str(c) for c in completions.values()}) >= 1 and demo.observations.shape == (demo.actions.size, 11)
    assert np.allclose(demo.observations[:, 10], np.log2(CONFIG.cost_cap) / 4)  # the cap, seen from the first step
