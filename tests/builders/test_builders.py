import heapq
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_search import builders
from tree_search.tree import Tree, TreeError

counts_strategy = st.lists(st.integers(min_value=0, max_value=10_000), min_size=2, max_size=60).filter(
    lambda c: sum(c) > 0
)
arity_strategy = st.integers(min_value=2, max_value=7)


def leaves_once(tree: Tree) -> bool:
    leaves = np.sort(tree.child_ids[tree.child_ids < tree.num_classes])
    return np.array_equal(leaves, np.arange(tree.num_classes))


def left_to_right_leaves(tree: Tree) -> list[int]:
    _, codes, _ = tree.paths()
    return np.lexsort(codes.T[::-1]).tolist()


def heapq_huffman_length(counts, arity=2) -> float:
    """Textbook n-ary Huffman with a heap: the expected code length it achieves."""
    total = sum(counts)
    items = [(c, i, 0.0) for i, c in enumerate(counts)]  # (weight, tiebreak, weighted depth sum)
    padding = (-(len(counts) - 1)) % (arity - 1)
    items += [(0, -1 - k, 0.0) for k in range(padding)]
    heapq.heapify(items)
    counter = itertools.count(len(counts))
    while len(items) > 1:
        group = [heapq.heappop(items) for _ in range(arity)]
        weight = sum(g[0] for g in group)
        # every class below goes one level deeper: add the group's weight
        heapq.heappush(items, (weight, next(counter), sum(g[2] for g in group) + weight))
    return items[0][2] / total


def brute_force_optimum(counts, arity) -> float:
    """Minimum expected codeword length over all prefix codes of alphabet size ``arity`` (Kraft)."""
    p = np.asarray(counts, dtype=float) / sum(counts)
    best = math.inf
    V = len(counts)
    for lengths in itertools.product(range(1, V), repeat=V):
        if sum(arity ** (-x) for x in lengths) <= 1 + 1e-12:
            best = min(best, float(p @ lengths))
    return best


# ---------------------------------------------------------------------- every builder


@settings(max_examples=60, deadline=None)
@given(counts=counts_strategy, arity=arity_strategy, seed=st.integers(0, 2**32 - 1))
def test_every_builder_gives_a_valid_tree_with_each_class_once(counts, arity, seed):
    V = len(counts)
    order = np.random.default_rng(seed).permutation(V)
    cutoffs = sorted({int(x) for x in np.random.default_rng(seed).integers(1, V, size=3)}) if V > 2 else [1]
    trees = [
        builders.huffman(counts, arity),
        builders.balanced(V, arity, order=order),
        builders.random_tree(V, seed=seed, max_arity=arity),
        builders.frequency_cutoffs(counts, cutoffs),
        builders.frequency_cutoffs(counts, builders.cutoffs_by_mass(counts)),
        *(
            c.tree
            for c in builders.classic_trees(
                counts, f"huffman-2,huffman-{arity},balanced-{arity},cutoffs,random"
            ).values()
        ),
    ]
    for tree in trees:
        assert tree.num_classes == V
        assert leaves_once(tree)
        assert np.all(tree.fanout >= 2)
        assert np.all(tree.node_parent[1:] < np.arange(1, tree.num_internal))  # topological


@settings(max_examples=80, deadline=None)
@given(counts=counts_strategy, arity=arity_strategy, seed=st.integers(0, 1000))
def test_huffman_is_never_beaten_by_other_trees_of_its_arity(counts, arity, seed):
    V = len(counts)
    best = builders.huffman(counts, arity).expected_path_length(counts)
    assert builders.huffman(counts, arity).fanout.max() <= arity
    assert best <= builders.balanced(V, arity).expected_path_length(counts) + 1e-9
    assert best <= builders.random_tree(V, seed=seed, max_arity=arity).expected_path_length(counts) + 1e-9
    assert best == pytest.approx(heapq_huffman_length(counts, arity), abs=1e-9)


def test_huffman_textbook_cases():
    # CLRS 16.3: a:45 b:13 c:12 d:16 e:9 f:5 -> 224 bits per 100 characters
    clrs = [45, 13, 12, 16, 9, 5]
    tree = builders.huffman(clrs)
    assert tree.expected_path_length(clrs) == pytest.approx(2.24)
    assert tree.depth.tolist() == [1, 3, 3, 3, 4, 4]
    # dyadic probabilities: Huffman reaches the entropy exactly
    dyadic = [8, 4, 2, 1, 1]
    p = np.array(dyadic) / 16
    assert builders.huffman(dyadic).expected_path_length(dyadic) == pytest.approx(float(-(p * np.log2(p)).sum()))
    # uniform over 2^k classes: a complete tree of depth k
    assert builders.huffman([1] * 16).depth.tolist() == [4] * 16
    # Fibonacci weights give the deepest possible tree
    assert builders.huffman([1, 1, 2, 3, 5, 8, 13]).max_depth == 6
    # 3-ary Huffman of 6 classes needs one dummy: root fanout 3, one node with 2 real children
    ternary = builders.huffman([1, 1, 1, 1, 1, 1], arity=3)
    assert sorted(ternary.fanout.tolist()) == [2, 3, 3]


@pytest.mark.parametrize("arity", [2, 3, 4])
def test_n_ary_huffman_matches_brute_force(arity):
    rng = np.random.default_rng(arity)
    for V in range(2, 7):
        for _ in range(6):
            counts = rng.integers(1, 50, size=V).tolist()
            got = builders.huffman(counts, arity).expected_path_length(counts)
            assert got == pytest.approx(brute_force_optimum(counts, arity), abs=1e-9), counts


def test_huffman_beats_balanced_on_skewed_counts():
    counts = 1.0 / np.arange(1, 2001)  # Zipf(1)
    for arity in (2, 4, 16):
        huff = builders.huffman(counts, arity).expected_path_length(counts)
        flat = builders.balanced(2000, arity).expected_path_length(counts)
        assert huff < flat - 0.5


def test_huffman_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least 2 classes"):
        builders.huffman([3])
    with pytest.raises(ValueError, match="class 1 has -1"):
        builders.huffman([3, -1, 2])
    with pytest.raises(ValueError, match="finite"):
        builders.huffman([3, float("nan")])
    with pytest.raises(ValueError, match="arity must be an integer >= 2"):
        builders.huffman([1, 2, 3], arity=1)


def test_huffman_is_from_merges_of_the_lowest_masses():
    counts = [5, 1, 2, 8, 3]
    # lowest two each time, leaves before merged nodes on ties: (1,2)->5 [node 5], (3,5@node5)
    expected = builders.from_merges(5, [[1, 2], [4, 5], [0, 6], [3, 7]])
    assert builders.huffman(counts) == expected


# ---------------------------------------------------------------------- balanced


@settings(max_examples=40, deadline=None)
@given(V=st.integers(2, 300), arity=arity_strategy, seed=st.integers(0, 100))
def test_balanced_depths_and_order(V, arity, seed):
    order = np.random.default_rng(seed).permutation(V)
    tree = builders.balanced(V, arity, order=order)
    assert left_to_right_leaves(tree) == order.tolist()
    low = math.floor(math.log(V, arity) + 1e-9)
    assert tree.max_depth == math.ceil(math.log(V, arity) - 1e-9)
    assert tree.depth.min() >= max(1, low)
    assert tree.fanout.max() <= arity


def test_balanced_rejects_bad_order():
    with pytest.raises(ValueError, match="permutation"):
        builders.balanced(4, 2, order=[0, 1, 1, 2])


# ---------------------------------------------------------------------- frequency cutoffs


def test_frequency_cutoffs_shape_matches_adaptive_softmax():
    counts = [50, 1, 30, 7, 7, 2, 9, 4]  # ranks: 0,2,6,3,4,7,5,1 (ties by id)
    tree = builders.frequency_cutoffs(counts, [2, 5])
    root = tree.children(0).tolist()
    assert root[:2] == [0, 2]  # head: the two most frequent classes
    assert tree.children(1).tolist() == [6, 3, 4]  # cluster [2, 5)
    assert tree.children(2).tolist() == [7, 5, 1]  # cluster [5, 8)
    assert root[2:] == [8 + 1, 8 + 2]
    flat = builders.frequency_cutoffs(counts, [])
    assert flat.num_internal == 1 and flat.max_depth == 1
    single = builders.frequency_cutoffs(counts, [5, 7])  # cluster [7, 8) has one class: a root leaf
    assert single.num_internal == 2


def test_projected_cutoffs_number_the_clusters_and_check_the_sizes():
    counts = [50, 1, 30, 7, 7, 2, 9, 4]
    tree, projections = builders.projected_cutoffs(counts, [2, 5, 7], [4, 16, 2], dim=16)
    # cluster [2, 5) is node 1 (projected to 4), [5, 7) node 2 (16 = dim: no projection), [7, 8) a root leaf
    assert tree == builders.frequency_cutoffs(counts, [2, 5, 7]) and projections == {1: 4}
    for sizes in ([4, 16], [4, 16, 2, 2], [4, 0, 2]):
        with pytest.raises(ValueError, match="one size >= 1 per cutoff"):
            builders.projected_cutoffs(counts, [2, 5, 7], sizes, dim=16)


@pytest.mark.parametrize("cutoffs", [[0, 3], [3, 3], [5, 3], [3, 8], [2.5], [True]])
def test_frequency_cutoffs_rejects_bad_cutoffs(cutoffs):
    with pytest.raises(ValueError, match="cutoffs should be a sequence of unique, positive integers"):
        builders.frequency_cutoffs([5, 4, 3, 2, 1, 1, 1, 1], cutoffs)


def test_cutoffs_by_mass():
    counts = [50, 30, 10, 5, 3, 1, 1]
    assert builders.cutoffs_by_mass(counts, (0.8, 0.95)) == [2, 4]
    with pytest.raises(ValueError, match="increasing fractions"):
        builders.cutoffs_by_mass(counts, (0.9, 0.5))


# ---------------------------------------------------------------------- random


def test_random_tree_is_reproducible_and_varied():
    a = builders.random_tree(50, seed=7, max_arity=4)
    assert a == builders.random_tree(50, seed=7, max_arity=4)
    assert a == builders.random_tree(50, seed=np.random.default_rng(7), max_arity=4)
    assert a != builders.random_tree(50, seed=8, max_arity=4)
    assert a.fanout.max() <= 4


# ---------------------------------------------------------------------- descriptions


def test_from_merges_numbering_and_errors():
    tree = builders.from_merges(4, [[0, 1], [2, 3], [4, 5]])
    assert tree.children_lists() == [[6, 5], [2, 3], [0, 1]]  # merge m is internal node 2 - m
    with pytest.raises(TreeError, match="merge 1 refers to node 6, which does not exist yet"):
        builders.from_merges(4, [[0, 1], [2, 6], [3, 5]])
    with pytest.raises(TreeError, match="merge 1 uses node 1, which merge 0 already merged"):
        builders.from_merges(4, [[0, 1], [1, 2], [3, 5]])
    with pytest.raises(TreeError, match="merge 0 joins 1 node"):
        builders.from_merges(4, [[0]])
    with pytest.raises(TreeError, match="2 roots remain"):
        builders.from_merges(4, [[0, 1], [2, 3]])
    with pytest.raises(TreeError, match="no merges"):
        builders.from_merges(4, [])


def test_from_nested_and_its_errors():
    tree = builders.from_nested([[0, 3], 1, [2, [4, 5]]])
    assert tree.num_classes == 6
    assert tree.depth.tolist() == [2, 1, 2, 2, 3, 3]
    with pytest.raises(TreeError, match=r"root\[1\]: a node with 1 child"):
        builders.from_nested([0, [1], 2])
    with pytest.raises(TreeError, match="class 1 appears 2 times"):
        builders.from_nested([0, [1, 1]])
    with pytest.raises(TreeError, match="class 3 is out of range"):
        builders.from_nested([0, [1, 3]])
    with pytest.raises(TreeError, match=r"root\[0\]: expected a class id or a list"):
        builders.from_nested(["a", 1])
    with pytest.raises(TreeError, match="root: expected a list"):
        builders.from_nested(3)


def test_from_nested_handles_deep_trees_without_recursion():
    nested: list = [0, 1]
    for y in range(2, 5000):
        nested = [nested, y]
    assert builders.from_nested(nested).max_depth == 4999


def test_from_parents_and_its_errors():
    # classes 0..3, internal nodes 4 (root) and 5
    tree = builders.from_parents([4, 5, 5, 4, -1, 4], num_classes=4)
    assert tree.children_lists() == [[0, 3, 5], [1, 2]]
    # the root may be any internal id; nodes are renumbered from it
    assert builders.from_parents([5, 4, 4, 5, 5, -1], 4).children_lists() == [[0, 3, 5], [1, 2]]
    with pytest.raises(TreeError, match="class 0 as its parent"):
        builders.from_parents([4, 0, 4, 4, -1], 4)
    with pytest.raises(TreeError, match="exactly one root"):
        builders.from_parents([4, 4, 5, 5, -1, -1], 4)
    with pytest.raises(TreeError, match="the root must be an internal node"):
        builders.from_parents([-1, 4, 4, 4, 4], 4)
    with pytest.raises(TreeError, match="outside -1..5"):
        builders.from_parents([4, 4, 9, 5, -1, 4], 4)
    with pytest.raises(TreeError, match="unreachable|reached twice"):
        builders.from_parents([4, 4, 5, 6, -1, 6, 5], 4)  # nodes 5 and 6 parent each other


def test_from_children_renumbers():
    # node 2 is the parent of node 1: not topological, but fine with renumber=True
    tree = builders.from_children(4, [[0, 6], [2, 3], [1, 5]])
    assert tree.children_lists() == [[0, 5], [1, 6], [2, 3]]
    with pytest.raises(TreeError, match="smaller id"):
        builders.from_children(4, [[0, 6], [2, 3], [1, 5]], renumber=False)
    with pytest.raises(TreeError, match="unreachable"):
        builders.from_children(4, [[0, 1], [2, 3]])


def test_from_children_numbers_breadth_first_whatever_the_input_numbering():
    rng = np.random.default_rng(0)
    for seed in range(30):
        original = builders.random_tree(200, seed=seed, max_arity=4)
        V, n = 200, original.num_internal
        perm = np.concatenate([[0], 1 + rng.permutation(n - 1)])  # old id -> the caller's id, the root stays 0
        lists = [None] * n
        for old, row in enumerate(original.children_lists()):
            lists[perm[old]] = [c if c < V else V + int(perm[c - V]) for c in row]
        tree = builders.from_children(V, lists)
        # breadth-first with siblings in order: reading the children node by node meets V+1, V+2, ... in turn
        internal = [c for c in tree.child_ids.tolist() if c >= V]
        assert internal == list(range(V + 1, V + n))
        assert tree.canonical_hash == original.canonical_hash


def test_classic_trees_names():
    counts = np.arange(100, 0, -1)
    trees = builders.classic_trees(counts, "huffman-2,huffman-4,balanced-16,cutoffs")
    assert list(trees) == ["huffman-2", "huffman-4", "balanced-16", "cutoffs"]
    assert trees["huffman-4"].builder == "huffman" and trees["huffman-4"].params == {"arity": 4}
    assert trees["huffman-4"].tree == builders.huffman(counts, 4)
    for bad in ("oak", "huffman-1", "huffman-x", "cutoffs-100", "adaptive-1", "headtail-random-4", ""):
        with pytest.raises(ValueError, match="classic tree"):
            builders.classic_trees(counts, bad)
    with pytest.raises(ValueError, match="'kmeans-4' needs the class embeddings"):
        builders.classic_trees(counts, "kmeans-4")
    with pytest.raises(ValueError, match="'adaptive' needs the class features' dimension"):
        builders.classic_trees(counts, "adaptive")


def test_the_front_set_spans_costs_and_every_tree_is_valid():
    rng = np.random.default_rng(0)
    V = 500
    counts = np.sort(rng.zipf(1.3, V).astype(float))[::-1]
    embeddings = rng.normal(size=(V, 8))
    trees = builders.classic_trees(counts, "front", embeddings=embeddings, dim=64)
    assert list(trees) == list(builders.CLASSIC_SETS["front"])
    costs = {}
    for name, classic in trees.items():
        assert classic.tree.num_classes == V and leaves_once(classic.tree), name
        costs[name] = 64 * float(counts / counts.sum() @ classic.tree.path_fanout_sum)  # multiply-adds, unprojected
    # the cheapest tree is a Huffman tree of fanout 2 or 3 (cost fanout x dim per node on the path: k / ln k is
    # smallest near e, so 3-ary wins for flat counts; binary for counts this skewed)
    assert min(costs, key=costs.get) in ("huffman-2", "huffman-3")
    assert max(costs.values()) > 10 * costs["huffman-2"]  # the front reaches far above it
    assert len({round(c) for c in costs.values()}) >= 20  # many different costs
    # Huffman's cost grows with its fanout; the head-and-tail top level keeps the frequent half of the mass at the root
    huffman = [costs[f"huffman-{k}"] for k in (2, 3, 4, 6, 8, 12, 16, 32)]
    assert huffman == sorted(huffman)
    headtail = trees["headtail-kmeans-4"].tree
    root_leaves = [c for c in headtail.children(0) if c < V]
    assert 0.5 <= counts[root_leaves].sum() / counts.sum() < 0.5 + counts.max() / counts.sum() + 1e-9
    assert set(root_leaves) == set(range(len(root_leaves)))  # the most frequent classes (counts are sorted)
    adaptive = {k: trees[k] for k in ("adaptive-50", "adaptive", "adaptive-10")}
    heads = [sum(1 for c in t.tree.children(0) if c < V) for t in adaptive.values()]
    assert heads == [V // 50, V // 25, V // 10] and all(t.projections == {1: 16, 2: 4} for t in adaptive.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grave_cutoffs_are_the_least_cost_cutoffs_by_brute_force(seed):
    """Grave et al.'s dynamic program against every choice of cutoffs (clusters of 2+ classes), same cost function."""
    from itertools import combinations

    from tree_search.builders import grave_cutoffs, projected_cutoffs
    from tree_search.reward.reward import head_cost

    counts = np.sort(np.random.default_rng(seed).zipf(1.3, 40).astype(float))[::-1]
    for clusters in (1, 2, 3):
        costs = {}
        for cuts in combinations(range(1, 40), clusters):
            bounds = [*cuts, 40]
            if all(bounds[i + 1] - bounds[i] >= 2 for i in range(clusters)):
                sizes = [max(1, 16 // 4 ** (i + 1)) for i in range(clusters)]  # PyTorch's div_value 4
                tree, projections = projected_cutoffs(counts, list(cuts), sizes, 16)
                costs[cuts] = head_cost(tree, counts, 16, projections)
        found = grave_cutoffs(counts, 16, clusters, candidates=1000)
        assert costs[tuple(found)] == pytest.approx(min(costs.values()), rel=1e-12)
    tree = builders.classic_trees(counts, "grave-2", dim=16)["grave-2"]
    assert tree.params["cutoffs"] == grave_cutoffs(counts, 16, 2) and tree.projections


def test_class_weights_is_the_one_fallback_for_unknown_counts():
    from tree_search.builders.common import class_weights

    assert class_weights([3, 0, 1]).tolist() == [3.0, 0.0, 1.0]
    assert class_weights([0, 0, 0, 0]).tolist() == [1.0, 1.0, 1.0, 1.0]  # no count known: every class weighs the same
    with pytest.raises(ValueError, match="class 1 has -1"):
        class_weights([2, -1])


def test_baseline_names_are_huffman_and_balanced_per_arity_then_cutoffs_and_clustered_with_embeddings():
    assert builders.baseline_names((4, 16)) == ("huffman-2", "huffman-4", "huffman-16", "balanced-2", "balanced-4",
                                                "balanced-16", "cutoffs")  # fmt: skip
    clustered = ("pca-2", "kmeans-4", "kmeans-16", "adaptive")
    assert builders.baseline_names((2, 3), clustered=True) == ("huffman-2", "huffman-3", "balanced-2", "balanced-3",
                                                               "cutoffs", *clustered)  # fmt: skip
    for bad in (1, True, 2.5):
        with pytest.raises(ValueError, match="arity must be an integer >= 2"):
            builders.baseline_names((bad,))
