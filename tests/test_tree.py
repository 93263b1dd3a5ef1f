import pickle

import numpy as np
import pytest

from tree_search import builders
from tree_search.tree import Tree, TreeError


def small_tree() -> Tree:
    # root(0) -> [class 0, node 1, class 3]; node 1 -> [class 1, node 2]; node 2 -> [class 2, class 4]
    return Tree(5, [[0, 6, 3], [1, 7], [2, 4]])


def test_derived_arrays_of_a_hand_built_tree():
    tree = small_tree()
    assert tree.num_classes == 5 and tree.num_internal == 3
    assert tree.fanout.tolist() == [3, 2, 2]
    assert tree.node_parent.tolist() == [-1, 0, 1]
    assert tree.node_child_index.tolist() == [-1, 1, 1]
    assert tree.leaf_parent.tolist() == [0, 1, 2, 0, 2]
    assert tree.leaf_child_index.tolist() == [0, 0, 0, 2, 1]
    assert tree.node_depth.tolist() == [0, 1, 2]
    assert tree.depth.tolist() == [1, 2, 3, 1, 3]
    assert tree.max_depth == 3
    assert tree.subtree_size.tolist() == [5, 3, 2]
    nodes, codes, lengths = tree.paths()
    assert nodes.tolist() == [[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, -1, -1], [0, 1, 2]]
    assert codes.tolist() == [[0, -1, -1], [1, 0, -1], [1, 1, 0], [2, -1, -1], [1, 1, 1]]
    assert lengths.tolist() == [1, 2, 3, 1, 3]
    assert tree.path(4) == [(0, 1), (1, 1), (2, 1)]
    assert tree.depth_histogram().tolist() == [0, 2, 1, 2]


def test_arrays_are_read_only():
    tree = small_tree()
    for array in (tree.child_ids, tree.child_ptr, tree.depth, tree.fanout, tree.paths()[0]):
        with pytest.raises(ValueError):
            array[0] = 1


def test_statistics():
    tree = small_tree()
    counts = np.array([4, 3, 2, 1, 0])
    p = counts / counts.sum()
    assert tree.expected_path_length(counts) == pytest.approx(float(p @ [1, 2, 3, 1, 3]))
    assert tree.expected_path_length() == pytest.approx(2.0)
    assert list(tree.path_fanout_sum) == [3, 3 + 2, 3 + 2 + 2, 3, 3 + 2 + 2]  # the fanouts along each class's path
    assert tree.summary(counts) == {"num_classes": 5, "num_internal": 3, "max_fanout": 3, "max_depth": 3,
                                    "expected_depth": pytest.approx(float(p @ [1, 2, 3, 1, 3]))}  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        tree.expected_path_length([1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        tree.expected_path_length([1, -1, 0, 0, 0])


def test_subtree_sums_match_brute_force():
    tree = builders.random_tree(40, seed=3, max_arity=4)
    values = np.arange(40) ** 2
    sums = tree.subtree_sums(values)
    for u in range(tree.num_internal):
        below = [y for y in range(40) if u in tree.paths()[0][y]]
        assert sums[u] == values[below].sum()
    # the same over internal nodes: each node's value plus its descendants' (an ancestor on their paths)
    node_values = np.arange(tree.num_internal) ** 2 + 1
    node_sums = tree.node_subtree_sums(node_values)
    nodes, _, _ = tree.paths()
    for u in range(tree.num_internal):
        below = {int(n) for y in range(40) if u in nodes[y] for n in nodes[y][list(nodes[y]).index(u) :] if n >= 0}
        assert node_sums[u] == node_values[sorted(below)].sum()
    assert tree.min_leaf[0] == 0 and all(tree.min_leaf[u] == min(y for y in range(40) if u in nodes[y])
                                          for u in range(tree.num_internal))  # fmt: skip
    with pytest.raises(ValueError, match="node_values must have shape"):
        tree.node_subtree_sums(values)


@pytest.mark.parametrize(
    ("num_classes", "children", "message"),
    [
        (3, [[0, 1, 2, 0]], "class 0 appears 2 times"),
        (3, [[0, 1]], "class 2 is not a leaf"),
        (3, [[0, 4], [1]], "internal node 1 has 1 child"),
        (3, [[0, 4], [1, 2], [3]], "internal node 2 has 1 child"),
        (3, [[0, 9]], "outside 0..3"),
        (3, [[0, 4], [1, 2, 3]], "root .* is listed as a child"),
        (3, [[0, 4, 5], [1, 2], [5, 6]], "outside"),
        (4, [[0, 5], [1, 2, 3], [4, 6]], "root .* listed as a child"),
        (4, [[0, 1, 5], [2, 3], [6, 2]], "class 2 appears"),
        (3, [[0, 1, 2], [0, 1]], "class 0 appears"),
        (5, [[0, 1, 2], [3, 7], [4, 6]], "cycle"),
        (4, [[0, 6], [1, 2], [3, 5]], "smaller id"),
        (4, [[0, 5, 6], [1, 2], [3, 5]], "2 parents"),
        (4, [[0, 1, 2, 3], [0, 1]], "appears"),
        (1, [[0]], "at least 2 classes"),
        (3, [], "at least one internal node"),
        (3, [[0, "a", 2]], "integer"),
        (3, [[0, 1.5, 2]], "integer"),
    ],
)
def test_invalid_trees_name_the_problem(num_classes, children, message):
    with pytest.raises(TreeError, match=message):
        Tree(num_classes, children)


def test_unreachable_internal_node():
    with pytest.raises(TreeError, match="internal node 1 is unreachable"):
        Tree(4, [[0, 1], [2, 3]])


def test_canonical_hash_is_invariant_under_sibling_reordering():
    rng = np.random.default_rng(0)
    for seed in range(20):
        tree = builders.random_tree(30, seed=seed, max_arity=5)
        shuffled = [list(rng.permutation(c)) for c in tree.children_lists()]
        permuted = Tree(30, shuffled)
        assert permuted.canonical_hash == tree.canonical_hash
        assert permuted.same_structure(tree)
        assert permuted.canonical() == tree.canonical()
        # nor does the numbering of internal nodes
        n = tree.num_internal
        perm = np.concatenate([[0], 1 + rng.permutation(n - 1)])  # old id -> new id, root stays 0
        relabeled = [None] * n
        for old, row in enumerate(shuffled):
            relabeled[perm[old]] = [c if c < 30 else 30 + int(perm[c - 30]) for c in row]
        renumbered = builders.from_children(30, relabeled, renumber=True)
        assert renumbered.canonical_hash == tree.canonical_hash


def test_canonical_hash_differs_for_different_trees():
    hashes = {builders.random_tree(12, seed=s).canonical_hash for s in range(30)}
    assert len(hashes) > 25
    a = Tree(3, [[0, 4], [1, 2]])
    b = Tree(3, [[1, 4], [0, 2]])
    assert a.canonical_hash != b.canonical_hash


def test_equality_pickle_and_repr():
    tree = small_tree()
    assert tree == Tree(5, tree.children_lists())
    assert tree != Tree(5, [[3, 6, 0], [1, 7], [2, 4]])
    assert pickle.loads(pickle.dumps(tree)) == tree
    assert hash(tree) == hash(Tree(5, [[3, 6, 0], [7, 1], [4, 2]]))
    assert "num_classes=5" in repr(tree)
    assert Tree.from_csr(5, tree.child_ptr, tree.child_ids) == tree


def test_packed_paths_match_padded_paths():
    for tree in (small_tree(), builders.random_tree(60, seed=2, max_arity=5), builders.huffman(np.arange(1, 300))):
        ptr, nodes, codes = tree.packed_paths()
        padded_nodes, padded_codes, lengths = tree.paths()
        assert np.array_equal(np.diff(ptr), lengths)
        for y in range(tree.num_classes):
            assert nodes[ptr[y] : ptr[y + 1]].tolist() == padded_nodes[y, : lengths[y]].tolist()
            assert codes[ptr[y] : ptr[y + 1]].tolist() == padded_codes[y, : lengths[y]].tolist()
