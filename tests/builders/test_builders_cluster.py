import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tree_search import builders
from tree_search.tree import Tree

METHODS = ["kmeans", "pca"]


def leaf_sets(tree: Tree) -> list[frozenset[int]]:
    """The classes below each internal node."""
    nodes, _, _ = tree.paths()
    rows, cols = np.nonzero(nodes >= 0)
    members: list[set[int]] = [set() for _ in range(tree.num_internal)]
    for y, u in zip(rows.tolist(), nodes[rows, cols].tolist(), strict=True):
        members[u].add(y)
    return [frozenset(m) for m in members]


def shuffled_blobs(centres: np.ndarray, per_blob: int, spread: float, seed: int) -> tuple[np.ndarray, list[set[int]]]:
    """Points around each centre, with class ids shuffled so blobs are not id ranges."""
    rng = np.random.default_rng(seed)
    points = np.repeat(centres, per_blob, axis=0) + spread * rng.standard_normal(
        (len(centres) * per_blob, centres.shape[1])
    )
    ids = rng.permutation(len(points))  # point k becomes class ids[k]
    embeddings = np.empty_like(points)
    embeddings[ids] = points
    blobs = [set(ids[b * per_blob : (b + 1) * per_blob].tolist()) for b in range(len(centres))]
    return embeddings, blobs


embedding_arrays = st.integers(2, 60).flatmap(
    lambda V: hnp.arrays(
        np.float64,
        st.tuples(st.just(V), st.integers(1, 4)),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    )
)


@settings(max_examples=60, deadline=None)
@given(
    embeddings=embedding_arrays,
    fanout=st.integers(2, 6),
    method=st.sampled_from(METHODS),
    leaf_size=st.none() | st.integers(1, 10),
    weighted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_cluster_tree_is_a_balanced_valid_tree(embeddings, fanout, method, leaf_size, weighted, seed):
    V = embeddings.shape[0]
    counts = np.random.default_rng(seed).integers(0, 3, size=V) if weighted else None  # zeros included
    tree = builders.cluster_tree(embeddings, counts, fanout=fanout, method=method, leaf_size=leaf_size, seed=seed)
    assert tree.num_classes == V
    assert np.array_equal(np.sort(tree.child_ids[tree.child_ids < V]), np.arange(V))
    assert np.all(tree.node_parent[1:] < np.arange(1, tree.num_internal))  # topological
    limit = max(fanout, leaf_size or fanout)
    size = tree.subtree_size
    for u in range(tree.num_internal):
        children = tree.children(u)
        if size[u] <= limit:  # a flat node: all its classes are leaf children
            assert np.all(children < V) and children.size == size[u]
        else:  # a balanced split into `fanout` parts
            assert children.size == fanout
            sizes = [1 if c < V else size[c - V] for c in children.tolist()]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == size[u]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fanout", [2, 3, 8])
def test_cluster_tree_is_deterministic_for_a_seed(method, fanout):
    X = np.random.default_rng(0).standard_normal((300, 5))
    a = builders.cluster_tree(X, fanout=fanout, method=method, seed=3)
    assert a == builders.cluster_tree(X, fanout=fanout, method=method, seed=3)
    assert a.max_depth == int(np.ceil(np.log(300) / np.log(fanout) - 1e-9))
    if method == "kmeans":  # k-means++ seeds differ; PCA converges to the same direction anyway
        assert any(a != builders.cluster_tree(X, fanout=fanout, method=method, seed=s) for s in range(4, 8))


@pytest.mark.parametrize("method", METHODS)
def test_cluster_tree_ignores_scale_and_uniform_counts(method):
    X = np.random.default_rng(1).standard_normal((200, 6))
    tree = builders.cluster_tree(X, fanout=3, method=method)
    assert tree == builders.cluster_tree(8.0 * X, fanout=3, method=method)  # a power of two: exact
    assert tree == builders.cluster_tree(X, np.ones(200), fanout=3, method=method)
    assert tree == builders.cluster_tree(X, np.full(200, 7), fanout=3, method=method)


def test_counts_move_the_pca_cut():
    # Two halves apart along x (variance 49); within each, 10 of 50 points spread along y
    # (variance 20 unweighted). With those 20 points weighted 1000 times, y dominates.
    x = np.repeat([-7.0, 7.0], 50)
    y = np.tile(np.repeat([-10.0, 10.0, 0.0], [5, 5, 40]), 2)
    X = np.stack([x, y], axis=1)
    halves = {frozenset(range(50)), frozenset(range(50, 100))}
    plain = builders.cluster_tree(X, fanout=2, method="pca")
    assert set(leaf_sets(plain)[1:3]) == halves
    weighted = builders.cluster_tree(X, np.where(y != 0, 1000, 1), fanout=2, method="pca")
    assert set(leaf_sets(weighted)[1:3]).isdisjoint(halves)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_blobs_at_fanout_8(seed):
    centres = 20.0 * np.random.default_rng(100 + seed).standard_normal((8, 16))
    X, blobs = shuffled_blobs(centres, per_blob=25, spread=1.0, seed=seed)
    tree = builders.cluster_tree(X, fanout=8, seed=seed)
    root_children = {leaf_sets(tree)[c - 200] for c in tree.children(0).tolist()}
    assert root_children == {frozenset(b) for b in blobs}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_splits_recover_a_planted_hierarchy(method, seed):
    # 8 blobs at the corners of a box with sides 40, 20, 10: the first split is along the
    # first axis, then the second, then the third; every blob is a subtree at depth 3.
    corners = np.array([[a, b, c] for a in (-20, 20) for b in (-10, 10) for c in (-5, 5)], dtype=float)
    centres = np.concatenate([corners, np.zeros((8, 3))], axis=1)
    X, blobs = shuffled_blobs(centres, per_blob=25, spread=0.5, seed=seed)
    tree = builders.cluster_tree(X, fanout=2, method=method, seed=seed)
    subtrees = set(leaf_sets(tree))
    for blob in blobs:
        assert frozenset(blob) in subtrees
    assert {frozenset(b) for b in blobs} == {leaf_sets(tree)[u] for u in np.flatnonzero(tree.node_depth == 3)}


def test_leaf_size_makes_flat_bottom_nodes():
    X = np.random.default_rng(2).standard_normal((1000, 8))
    tree = builders.cluster_tree(X, fanout=4, leaf_size=40)
    bottom = np.flatnonzero(tree.subtree_size <= 40)
    assert np.all(tree.fanout[bottom] == tree.subtree_size[bottom])
    assert tree.fanout.max() <= 40
    flat_root = builders.cluster_tree(X[:30], fanout=4, leaf_size=40)
    assert flat_root.num_internal == 1 and flat_root.fanout[0] == 30


def test_degenerate_embeddings_still_give_balanced_trees():
    for X in (np.zeros((37, 3)), np.ones((37, 1)) * 1e300, np.repeat([[0.0], [1.0]], [30, 7], axis=0)):
        X.flags.writeable = False  # and the input is left alone
        for method in METHODS:
            tree = builders.cluster_tree(X, fanout=3, method=method)
            assert tree.max_depth == 4  # ceil(log3(37))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embeddings": np.zeros(5)}, r"shape \(V, d\)"),
        ({"embeddings": np.zeros((1, 3))}, "V >= 2"),
        ({"embeddings": np.zeros((4, 0))}, "d >= 1"),
        ({"embeddings": [[0.0], [np.nan], [1.0]]}, "finite; the row of class 1"),
        ({"embeddings": [["a"], ["b"]]}, "array of numbers"),
        ({"counts": np.ones(3)}, r"counts must have shape \(4,\)"),
        ({"counts": [1, -1, 1, 1]}, "non-negative"),
        ({"fanout": 1}, "fanout must be an integer >= 2"),
        ({"method": "spectral"}, "method must be 'kmeans' or 'pca'"),
        ({"leaf_size": 0}, "leaf_size must be an integer >= 1"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
    ],
)
def test_cluster_tree_rejects_bad_inputs(kwargs, match):
    arguments = {"embeddings": np.arange(8.0).reshape(4, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        builders.cluster_tree(**arguments)


@pytest.mark.parametrize("method, parts", [("kmeans", 2), ("kmeans", 5), ("pca", 2)])
def test_order_groups_orders_each_group_as_order_group_does_alone(method, parts):
    """Groups split together (several of one size, others alone, one weightless) each get their own order."""
    rng = np.random.default_rng(7)
    V, d = 400, 6
    embeddings = rng.normal(size=(V, d))
    embeddings[:40] = embeddings[:40].round(1)  # ties between members
    counts = rng.zipf(1.6, V).astype(float)
    members = rng.permutation(V)
    sizes = [30, 30, 30, 17, 30, 3, 60, 17, 12]
    groups = np.split(members[: sum(sizes)], np.cumsum(sizes)[:-1])
    counts[groups[3]] = 0.0  # a weightless group: uniform weights
    orders = builders.order_groups(embeddings, groups, counts, method, parts,
                                   [np.random.default_rng([5, g]) for g in range(len(groups))])  # fmt: skip
    for g, group in enumerate(groups):
        alone = builders.order_group(embeddings[group], counts[group], method, parts, np.random.default_rng([5, g]))
        assert np.array_equal(orders[g], alone), (g, group.size)
    with pytest.raises(ValueError, match="one generator per group"):
        builders.order_groups(embeddings, groups, counts, method, parts, [rng])


def test_balanced_kmeans_runs_each_padded_group_to_its_fixed_point():
    """Lloyd iterations go on until each group's labels repeat; a group that repeats early leaves the batch unchanged.

    The fixed point is checked independently: for two clusters, each group's labels must be its optimal
    balanced split (points sorted by their squared distance to centre 0 minus centre 1, the first
    ``ceil(n / 2)`` to cluster 0) around the count-weighted means of its own labels.
    """
    from tree_search.builders.cluster import _balanced_kmeans_labels

    rng = np.random.default_rng(26)  # groups 1 and 2 repeat first, group 3 last
    sizes = np.array([40, 33, 25, 38])
    M, d = int(sizes.max()), 4
    points = np.zeros((sizes.size, M, d))
    weights = np.zeros((sizes.size, M))
    for g, n in enumerate(sizes):
        points[g, :n] = rng.normal(size=(n, d)) * np.array([3.0, 1.0, 1.0, 0.5])
        weights[g, :n] = rng.zipf(1.6, n)
    uniforms = rng.random((3, sizes.size))

    def is_fixed_point(g: int, labels: np.ndarray) -> bool:
        n, x, w = sizes[g], points[g, : sizes[g]], weights[g, : sizes[g]]
        centres = [np.average(x[labels[:n] == c], axis=0, weights=w[labels[:n] == c]) for c in (0, 1)]
        preference = ((x - centres[0]) ** 2).sum(axis=1) - ((x - centres[1]) ** 2).sum(axis=1)
        best = np.ones(n, dtype=np.int64)
        best[np.argsort(preference, kind="stable")[: (n + 1) // 2]] = 0
        return np.array_equal(best, labels[:n]) and np.all(labels[n:] == 2)

    one_step = _balanced_kmeans_labels(points, weights, sizes, 2, uniforms, iterations=1)
    assert not all(is_fixed_point(g, one_step[g]) for g in range(sizes.size))  # the data needs iterations
    together = _balanced_kmeans_labels(points, weights, sizes, 2, uniforms, iterations=100)
    assert all(is_fixed_point(g, together[g]) for g in range(sizes.size))
    for g in range(sizes.size):  # each group as the only one of its batch, padded alike
        alone = _balanced_kmeans_labels(points[g : g + 1], weights[g : g + 1], sizes[g : g + 1], 2,
                                        uniforms[:, g : g + 1], iterations=100)  # fmt: skip
        assert np.array_equal(alone[0], together[g])
