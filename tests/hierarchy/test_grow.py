"""Growing a tree and its trained head: new classes appended, other classes untouched, probabilities sum to one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.builders import grow_tree, nearest_classes, place_by_frequency
from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.hierarchy.grow import grow_by_embedding, grow_by_frequency, grow_head

torch.set_num_threads(1)
DIM = 6
COUNTS = np.array([400, 200, 120, 80, 60, 40, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2, 2, 1, 1, 1], dtype=float)


def random_head(kind: str) -> TreeSoftmaxHead:
    """A head with random (non-zero) weights and biases, on three layouts: packed, dense+projection, wide dense."""
    V = COUNTS.size
    if kind == "huffman":
        head = TreeSoftmaxHead(builders.huffman(COUNTS, 3), DIM)
    elif kind == "adaptive":  # root of frequent classes + tail clusters with projections (dense nodes)
        head = TreeSoftmaxHead(builders.frequency_cutoffs(COUNTS, [4, 10]), DIM, projections={1: 3, 2: 2})
    else:  # a wide node above dense_fanout next to packed ones
        head = TreeSoftmaxHead(builders.frequency_cutoffs(COUNTS, [12]), DIM, dense_fanout=4, top_columns=0)
    assert head.num_classes == V
    return randomized(head).double()


def randomized(head: TreeSoftmaxHead) -> TreeSoftmaxHead:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return head


def below(tree, node: int) -> np.ndarray:
    """(V,) bool: classes whose path passes through internal node ``node``."""
    nodes, _, _ = tree.paths()
    return (nodes == node).any(axis=1)


H = torch.randn(7, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["huffman", "adaptive", "wide"])
def test_sibling_growth_changes_only_the_classes_below_the_node(kind):
    head = random_head(kind)
    V = head.num_classes
    target = int(head.tree.leaf_parent[V - 1])  # the node of the rarest class (a tail cluster / deep node)
    before = head.log_probs_all(H)
    grown = grow_head(head, [target, target], prior=0.02)
    after = grown.log_probs_all(H)
    assert after.shape == (H.shape[0], V + 2)
    torch.testing.assert_close(torch.logsumexp(after, 1), torch.zeros(H.shape[0], dtype=torch.float64))
    inside = below(head.tree, target)
    assert 0 < inside.sum() < V
    torch.testing.assert_close(after[:, :V][:, ~inside], before[:, ~inside], rtol=0, atol=1e-12)
    # inside the node every old class loses the same share (the new children's probability)
    shift = after[:, :V][:, inside] - before[:, inside]
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
    assert bool((shift < 0).all())


@pytest.mark.parametrize("kind", ["huffman", "adaptive", "wide"])
def test_sibling_prior_holds_at_zero_input(kind):
    head = random_head(kind)
    V = head.num_classes
    target = int(head.tree.leaf_parent[V - 1])
    zero = torch.zeros(1, DIM, dtype=torch.float64)
    node_lp = torch.logsumexp(head.log_probs_all(zero)[0, torch.from_numpy(below(head.tree, target))], 0)
    grown = grow_head(head, [target, target], prior=0.02)
    new_lp = grown.log_probs_all(zero)[0, V:]
    torch.testing.assert_close(new_lp, (node_lp + math.log(0.02)).expand(2))


@pytest.mark.parametrize("kind", ["huffman", "adaptive", "wide"])
def test_split_changes_only_the_anchor_by_exactly_log_one_minus_prior(kind):
    head = random_head(kind)
    V, anchor, prior = head.num_classes, 5, 0.1
    before = head.log_probs_all(H)
    grown = grow_head(head, [anchor], attach="split", prior=prior)
    after = grown.log_probs_all(H)
    others = np.arange(V) != anchor
    torch.testing.assert_close(after[:, :V][:, others], before[:, others], rtol=0, atol=1e-12)
    torch.testing.assert_close(after[:, anchor], before[:, anchor] + math.log1p(-prior))
    torch.testing.assert_close(after[:, V], before[:, anchor] + math.log(prior))
    torch.testing.assert_close(torch.logsumexp(after, 1), torch.zeros(H.shape[0], dtype=torch.float64))
    assert grown.tree.num_internal == head.tree.num_internal + 1


def test_old_nodes_keep_their_weights_and_the_old_head_is_untouched():
    head = random_head("adaptive")
    state = {k: v.clone() for k, v in head.state_dict().items()}
    grown = grow_head(head, [1], prior=0.05)
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k])
    for node in range(head.tree.num_internal):
        w_old, b_old, p_old = head.node_parameters(node)
        w_new, b_new, p_new = grown.node_parameters(node)
        n = w_old.shape[0]
        torch.testing.assert_close(w_new[:n], w_old, rtol=0, atol=1e-14)
        torch.testing.assert_close(b_new[:n], b_old, rtol=0, atol=1e-14)
        assert (p_old is None) == (p_new is None)
        if p_old is not None:
            assert torch.equal(p_old, p_new)


@pytest.mark.parametrize("kind", ["huffman", "adaptive", "wide"])
@pytest.mark.parametrize("attach", ["sibling", "split"])
def test_float32_head_other_classes_within_1e6(kind, attach):
    head = random_head(kind).float()
    V, h = head.num_classes, H.float()
    target = int(head.tree.leaf_parent[V - 1]) if attach == "sibling" else 5
    grown = grow_head(head, [target], attach=attach)
    before, after = head.log_probs_all(h), grown.log_probs_all(h)[:, :V]
    outside = ~below(head.tree, target) if attach == "sibling" else np.arange(V) != target
    torch.testing.assert_close(after[:, outside], before[:, outside], rtol=0, atol=1e-6)
    assert next(grown.parameters()).dtype == torch.float32


def test_grow_by_embedding_copies_the_nearest_class_row():
    head = random_head("huffman")
    V = head.num_classes
    vectors = np.random.default_rng(0).normal(size=(V, 5))
    new = vectors[[7, 12]] * 3.0 + 0.01  # nearest by cosine: classes 7 and 12
    result = grow_by_embedding(head, vectors, new, prior=0.01)
    assert result.anchors.tolist() == [7, 12]
    assert result.targets.tolist() == head.tree.leaf_parent[[7, 12]].tolist()
    after = result.head.log_probs_all(H)
    for k, anchor in enumerate([7, 12]):  # same row: the log-ratio to the anchor is the same for every h
        ratio = after[:, V + k] - after[:, anchor]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    split = grow_by_embedding(head, vectors, new, attach="split")
    assert split.targets.tolist() == [7, 12] and split.head.tree.num_internal == head.tree.num_internal + 2


def test_grow_by_frequency_places_under_a_node_of_similar_child_mass_and_appends_labels_and_counts():
    tree = builders.huffman(COUNTS, 2)
    head = TreeSoftmaxHead(tree, DIM)
    head.labels, head.counts = [f"t{y}" for y in range(COUNTS.size)], COUNTS
    result = grow_by_frequency(head, COUNTS, [150.0, 1.0], labels=["new", "rare"])
    child_mass = tree.subtree_sums(COUNTS) / tree.fanout
    for k, c in enumerate([150.0, 1.0]):  # brute force: no node's children weigh closer to c
        best = np.min(np.abs(np.log(child_mass) - np.log(c)))
        assert abs(np.log(child_mass[result.targets[k]]) - np.log(c)) == best
    assert result.head.labels[-2:] == ["new", "rare"]
    assert result.head.counts.tolist()[-2:] == [150.0, 1.0]
    grown_tree = result.head.tree
    assert grown_tree.depth[COUNTS.size] < grown_tree.depth[COUNTS.size + 1]  # the frequent one is shallower


def test_grow_tree_keeps_old_ids_and_appends_new_classes():
    tree = builders.from_nested([0, [1, 2], [3, [4, 5]]])
    grown = grow_tree(tree, [2, 0], attach="sibling")
    V = tree.num_classes
    assert grown.num_classes == V + 2
    assert grown.children(2).tolist()[-1] == V + 0 and grown.children(0).tolist()[-1] == V + 1
    assert np.array_equal(grown.leaf_parent[:V], tree.leaf_parent)
    split = grow_tree(tree, [4, 4, 1], attach="split")
    assert split.num_internal == tree.num_internal + 2
    assert split.children(tree.num_internal).tolist() == [4, V, V + 1]
    assert split.children(tree.num_internal + 1).tolist() == [1, V + 2]


def test_nearest_classes_matches_brute_force():
    rng = np.random.default_rng(3)
    X, Q = rng.normal(size=(30, 4)), rng.normal(size=(9, 4))
    brute = [max(range(30), key=lambda y: X[y] @ q / np.linalg.norm(X[y]) / np.linalg.norm(q)) for q in Q]
    assert nearest_classes(X, Q).tolist() == brute
    assert place_by_frequency(builders.huffman([8, 4, 2, 2]), np.array([8, 4, 2, 2]), [2.0]).tolist() == [2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda h: grow_head(h, [99]), r"targets\[0\] = 99 is not an internal node"),
        (lambda h: grow_head(h, [0], prior=1.5), r"prior must be a number in \(0, 1\)"),
        (lambda h: grow_head(h, [0, 0, 0], prior=0.4), "3 new classes share one node"),
        (lambda h: grow_head(h, [0], attach="leaf"), "attach must be one of"),
        (lambda h: grow_head(h, [0], anchors=[19]), "anchors"),
        (lambda h: nearest_classes(np.ones((3, 2)), np.zeros((1, 2))), r"new_vectors\[0\] is zero"),
        (lambda h: grow_by_embedding(h, np.ones((3, 2)), np.ones((1, 2))), "class_vectors has 3 rows"),
    ],
)
def test_bad_input_gives_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(random_head("huffman"))


def test_head_without_biases_cannot_set_a_prior():
    head = TreeSoftmaxHead(builders.huffman(COUNTS), DIM, bias=False)
    with pytest.raises(ValueError, match="target node has none"):
        grow_head(head, [0])


def test_bias_free_nodes_stay_bias_free_and_cannot_be_grown():
    tree = builders.frequency_cutoffs(COUNTS, [4, 10])
    head = randomized(TreeSoftmaxHead(tree, DIM, bias_free_nodes=[1])).double()
    grown = grow_head(head, [2], prior=0.05)
    assert grown.node_parameters(1)[1] is None  # still bias-free
    outside = ~below(tree, 2)
    torch.testing.assert_close(
        grown.log_probs_all(H)[:, : COUNTS.size][:, outside], head.log_probs_all(H)[:, outside], rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError, match="target node has none"):
        grow_head(head, [1])
