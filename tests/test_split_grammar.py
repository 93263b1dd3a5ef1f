"""The split grammar shared by the split environment and the dp searcher."""

from __future__ import annotations

import numpy as np
import pytest

from tree_search.builders import ADAPTIVE_SHAPES, classic_trees, huffman
from tree_search.data.features import class_embeddings
from tree_search.data.planted import PlantedConfig
from tree_search.envs import SearchStopped, TreeEnvConfig, make_env
from tree_search.split_grammar import (
    Plan,
    SplitCache,
    SplitRule,
    huffman_rule,
    normalise_embeddings,
    partition_group,
    partition_groups,
    plan_head,
    plan_tree,
    projected_flat,
    rank_cutoffs,
    split_groups,
    split_rules,
)

CONFIG = TreeEnvConfig(dataset="planted", planted=PlantedConfig(num_classes=256, dim=16), split_min_group=8)


def _stop(tree, projections=None):
    raise SearchStopped("the tree only")


@pytest.fixture(scope="module")
def env():
    return make_env({"env": "split", **CONFIG.to_env_config()}, reward_fn=_stop)


def test_the_environment_builds_the_grammar_s_trees(env):
    """Repeating one rule in the environment gives `plan_tree` of that rule: one grammar, one place."""
    data = env.unwrapped.dataset
    embeddings = normalise_embeddings(class_embeddings(data))
    compared = 0
    for action, rule in enumerate(env.unwrapped.rules[:-1]):
        _, info = env.reset(seed=0)
        done = truncated = False
        while not (done or truncated):
            if not info["action_mask"][action]:
                break  # the rule is illegal for some group (fanout >= its size): not a homogeneous episode
            _, _, done, truncated, info = env.step(action)
        else:
            planned = plan_tree(data.counts, embeddings, Plan(rule), seed=CONFIG.seed,
                                leaf_size=CONFIG.split_leaf_size, head_max=CONFIG.split_head_max)  # fmt: skip
            assert env.unwrapped.last_tree.canonical_hash == planned.canonical_hash, str(rule)
            compared += 1
    assert compared >= 18  # every order, cut and fanout up to 8


def test_a_group_splits_the_same_way_wherever_it_is():
    rng = np.random.default_rng(0)
    V = 300
    counts = rng.zipf(1.5, V).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(V, 6)))
    group = np.sort(rng.choice(V, 120, replace=False))
    for rule in split_rules((2, 4, 8))[:-1]:
        leaves, parts = partition_group(group, rule, counts, embeddings, seed=3)
        again = partition_group(rng.permutation(group), rule, counts, embeddings, seed=3)  # another order
        assert np.array_equal(np.sort(np.concatenate([leaves, *parts])), group)  # every member once
        if rule.order != "frequency":  # clusters do not depend on the order the members come in
            assert sorted(map(tuple, map(np.sort, parts))) == sorted(map(tuple, map(np.sort, again[1]))), str(rule)
    kmeans = SplitRule("kmeans", "count", 4)
    assert not all(  # the seed matters
        np.array_equal(a, b)
        for a, b in zip(
            partition_group(group, kmeans, counts, embeddings, seed=3)[1],
            partition_group(group, kmeans, counts, embeddings, seed=4)[1],
            strict=True,
        )  # fmt: skip
    )


def test_plans_mix_rules_and_huffman_completions():
    rng = np.random.default_rng(1)
    V = 200
    counts = rng.zipf(1.4, V).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(V, 5)))
    assert plan_tree(counts, embeddings, Plan(huffman_rule(3))).canonical_hash == huffman(counts, 3).canonical_hash
    root = SplitRule("kmeans", "count", 4)
    _, parts = partition_group(np.arange(V), root, counts, embeddings)
    mixed = Plan(root, {0: Plan(huffman_rule(2)), 1: Plan(SplitRule("pca", "count", 2)), 3: Plan(huffman_rule(4))})
    cache: dict = {}
    tree = plan_tree(counts, embeddings, mixed, cache=cache)
    again = plan_tree(counts, embeddings, mixed, cache=cache)  # from the cache of group splits
    assert tree.canonical_hash == again.canonical_hash and cache
    # part 0 is exactly binary Huffman over its classes; part 2 inherits the root's rule
    part0 = np.sort(parts[0])
    sub = huffman(counts[part0], 2)
    sizes = sorted(tree.subtree_size[1:][tree.node_parent[1:] == 0].tolist())
    assert sizes == sorted(p.size for p in parts)
    inside = tree.subtree_sums(np.isin(np.arange(V), part0).astype(np.int64))
    nodes0 = np.flatnonzero((inside > 0) & (tree.subtree_size == inside))  # nodes entirely within part 0
    assert nodes0.size == sub.num_internal  # binary Huffman over part 0: one node per merge
    assert np.all(tree.fanout[nodes0] == 2)


def _by_content(tree, projections):
    """Projections keyed by the projected node's (smallest class, number of classes): independent of node numbering."""
    return {(int(tree.min_leaf[n]), int(tree.subtree_size[n])): int(p) for n, p in projections.items()}


@pytest.mark.parametrize("name", ADAPTIVE_SHAPES)
def test_cutoffs_and_projected_flat_tails_build_every_adaptive_softmax_shape(name):
    rng = np.random.default_rng(2)
    V, dim = 3000, 64
    counts = rng.zipf(1.2, V).astype(float)
    embeddings = rng.normal(size=(V, 4))
    shape = classic_trees(counts, [name], embeddings=embeddings, dim=dim)[name]
    cuts = shape.params["cutoffs"]
    # PyTorch's rule: tail cluster i projected to dim // 4**(i+1) dims
    plan = Plan(rank_cutoffs(cuts), {i: Plan(projected_flat(max(1, dim // 4 ** (i + 1)))) for i in range(len(cuts))})
    tree, projections = plan_head(counts, normalise_embeddings(embeddings), plan)
    assert tree.canonical_hash == shape.tree.canonical_hash
    assert projections and _by_content(tree, projections) == _by_content(shape.tree, shape.projections)
    # the head: the cuts[0] most frequent classes are the root's leaves
    ranked = np.lexsort((np.arange(V), -counts))
    root_leaves = [c for c in tree.children(0) if c < V]
    assert sorted(root_leaves) == sorted(ranked[: cuts[0]].tolist())


def test_cutoffs_past_a_group_s_size_are_dropped_and_projected_flat_nodes_keep_their_projection():
    rng = np.random.default_rng(3)
    counts = rng.zipf(1.3, 40).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(40, 3)))
    members = np.arange(10, 30)
    leaves, parts = partition_group(members, rank_cutoffs((3, 8, 25)), counts, embeddings)
    ranked = members[np.lexsort((members, -counts[members]))]
    assert leaves.tolist() == ranked[:3].tolist()
    assert [p.tolist() for p in parts] == [ranked[3:8].tolist(), ranked[8:].tolist()]  # rank 25 > 20 members: gone
    leaves, parts = partition_group(members, rank_cutoffs((25,)), counts, embeddings)
    assert leaves.tolist() == members.tolist() and parts == []  # smaller than the head: flat
    # a part planned as projected flat is one node with that projection; the others inherit the cutoffs and split on
    plan = Plan(rank_cutoffs((4, 12)), {1: Plan(projected_flat(2))})
    tree, projections = plan_head(counts, embeddings, plan)
    ranked = np.lexsort((np.arange(40), -counts))
    assert _by_content(tree, projections) == {(int(ranked[12:].min()), 28): 2}
    (node,) = projections
    assert sorted(tree.children(node)) == sorted(ranked[12:].tolist())
    assert plan_tree(counts, embeddings, plan).canonical_hash == tree.canonical_hash
    with pytest.raises(ValueError, match="increasing distinct ranks"):
        rank_cutoffs((5, 5))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        projected_flat(0)


def test_the_split_cache_drops_its_oldest_splits_beyond_its_budget():
    cache = SplitCache(budget=10)
    four, three = (np.arange(2), [np.arange(2)]), (np.arange(1), [np.arange(2)])
    cache["a"], cache["b"] = four, three  # 4 + 3 ids
    assert list(cache) == ["a", "b"] and cache.held == 7
    cache["c"] = four  # 11 > 10: "a" goes
    assert list(cache) == ["b", "c"] and cache.held == 7
    cache["c"] = three  # replacing an entry counts its new size only
    assert cache.held == 6
    cache["d"] = (np.arange(20), [])  # over the budget alone: kept, everything older goes
    assert list(cache) == ["d"] and cache.held == 20


def test_a_bounded_split_cache_gives_the_same_trees():
    rng = np.random.default_rng(1)
    counts = rng.zipf(1.4, 300).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(300, 5)))
    plan = Plan(SplitRule("kmeans", "count", 2), {0: Plan(SplitRule("pca", "count", 4))})
    every: dict = {}
    free = plan_tree(counts, embeddings, plan, cache=every)
    tight = SplitCache(budget=50)
    assert plan_tree(counts, embeddings, plan, cache=tight) == free
    assert tight.held <= 50 and len(tight) < 20 < len(every)  # it did drop splits (the tree has about 150)


def test_groups_split_together_split_as_they_do_alone():
    """`partition_groups` batches the k-means and PCA orderings of groups of one size; each split stays its own."""
    rng = np.random.default_rng(2)
    V = 500
    counts = rng.zipf(1.5, V).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(V, 6)))
    members = rng.permutation(V)
    groups = [members[:64], members[64:128], members[128:192], members[192:230], members[230:268], members[268:500]]
    rules = [rule for rule in split_rules((2, 3, 8)) if rule.order != "frequency" or rule.cut == "headtail"]
    requests = [(group, rule) for rule in rules for group in groups]
    together = partition_groups(requests, counts, embeddings, seed=3)
    for (group, rule), (leaves, parts) in zip(requests, together, strict=True):
        alone_leaves, alone_parts = partition_group(group, rule, counts, embeddings, seed=3)
        assert np.array_equal(leaves, alone_leaves), str(rule)
        assert len(parts) == len(alone_parts) and all(map(np.array_equal, parts, alone_parts)), str(rule)


def test_rules_that_order_a_group_alike_share_its_ordering_through_the_cache():
    """Equal-count and equal-mass cuts (and a clustered tail) order a group alike: computed once, split as alone."""
    rng = np.random.default_rng(5)
    V = 200
    counts = rng.zipf(1.5, V).astype(float)
    embeddings = normalise_embeddings(rng.normal(size=(V, 6)))
    group = rng.permutation(V)[:90]
    cache = SplitCache()
    first = split_groups([(group, SplitRule("kmeans", "count", 4))], counts, embeddings, seed=1, cache=cache)[0]
    orderings = [key for key in cache if key[0] == "order"]
    assert len(orderings) == 1  # the group's (k-means, 4 parts) ordering
    again = [SplitRule("kmeans", "mass", 4), SplitRule("pca", "mass", 4), SplitRule("kmeans", "count", 2)]
    shared = split_groups([(group, rule) for rule in again], counts, embeddings, seed=1, cache=cache)
    assert len([key for key in cache if key[0] == "order"]) == 3  # PCA and 2 parts are orderings of their own
    for rule, (leaves, parts) in zip([SplitRule("kmeans", "count", 4), *again], [first, *shared], strict=True):
        alone_leaves, alone_parts = partition_group(group, rule, counts, embeddings, seed=1)
        assert np.array_equal(leaves, alone_leaves) and len(parts) == len(alone_parts)
        assert all(map(np.array_equal, parts, alone_parts)), str(rule)
