import math

import numpy as np
import pytest
import torch
from quick_settings import SMALL_PLANTED
from torch import nn

from tree_search import builders
from tree_search.data import make_planted
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit
from tree_search.hierarchy.levels import (
    LevelWeightedHead,
    LevelWeights,
    class_vertices,
    greedy_descent,
    level_accuracy,
    level_loss,
)
from tree_search.tree import Tree

torch.set_num_threads(1)

SHAPES = {
    "binary huffman": (lambda: builders.huffman(np.random.default_rng(0).zipf(1.5, 40).astype(float)), {}),
    "adaptive projected": (lambda: builders.frequency_cutoffs(np.arange(60, 0, -1), [8, 30]), {1: 4, 2: 2}),
    "random 5-ary": (lambda: builders.random_tree(45, seed=3, max_arity=5), {}),
    "depth 1": (lambda: Tree(7, [list(range(7))]), {}),
}


def make_head(name: str, seed: int = 0, dim: int = 8, **settings) -> TreeSoftmaxHead:
    build, projections = SHAPES[name]
    torch.manual_seed(seed)
    head = TreeSoftmaxHead(build(), dim, projections=projections, **settings)
    for p in head.parameters():  # larger weights than the initialisation: confident, varied decisions
        nn.init.normal_(p, std=0.7)
    return head


def subtree_classes(tree: Tree, unified: int) -> list[int]:
    V = tree.num_classes
    if unified < V:
        return [unified]
    return [y for y in range(V) if any(node == unified - V for node, _ in tree.path(y))]


def brute_child_log_probs(tree: Tree, all_lp: torch.Tensor, node: int) -> dict[int, float]:
    """log p(child | node) of every child, from the class distribution (one input)."""
    below = torch.logsumexp(all_lp[subtree_classes(tree, tree.num_classes + node)], 0)
    return {
        int(c): float(torch.logsumexp(all_lp[subtree_classes(tree, int(c))], 0) - below) for c in tree.children(node)
    }


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_unit_weights_equal_the_plain_nll_exactly(name):
    head = make_head(name)
    h = torch.randn(33, 8)
    y = torch.randint(0, head.num_classes, (33,))
    for reduction in ("mean", "sum", "none"):
        head.reduction = reduction
        assert torch.equal(level_loss(head, h, y, LevelWeights()), head(h, y).loss)
    head.reduction = "mean"
    y[::3] = head.ignore_index  # ignored targets: left out of both
    assert torch.equal(level_loss(head, h, y, LevelWeights()), head(h, y).loss)
    output, loss = LevelWeightedHead(head, LevelWeights())(h, y)
    assert torch.equal(output, head(h, y).output) and torch.equal(loss, head(h, y).loss)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_weighted_loss_matches_node_cross_entropies_computed_from_the_class_distribution(name):
    head = make_head(name, seed=1)
    tree = head.tree
    h = torch.randn(6, 8)
    y = torch.randint(0, head.num_classes, (6,))
    weights = LevelWeights(depth=(2.5, 0.5), nodes={tree.num_internal - 1: 3.0}, default=1.25)
    node_w = weights.node_weights(tree)
    all_lp = head.log_probs_all(h).detach()
    expected = []
    for i in range(6):
        total = 0.0
        for node, _ in tree.path(int(y[i])):
            step = [c for c in tree.children(node) if int(y[i]) in subtree_classes(tree, int(c))][0]
            total -= node_w[node] * brute_child_log_probs(tree, all_lp[i], node)[int(step)]
        expected.append(total)
    got = level_loss(head, h, y, weights, reduction="none")
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    # the per-depth rule: the root at depth[0], depth-1 nodes at depth[1], deeper ones at default
    for node in range(tree.num_internal - 1):
        depth = int(tree.node_depth[node])
        assert node_w[node] == (2.5, 0.5, 1.25)[min(depth, 2)]


def test_weights_change_the_gradient_and_zero_weight_removes_a_nodes_term():
    head = make_head("binary huffman", seed=2)
    h = torch.randn(20, 8, requires_grad=True)
    y = torch.randint(0, head.num_classes, (20,))
    plain = level_loss(head, h, y, LevelWeights(), reduction="none")
    no_root = level_loss(head, h, y, LevelWeights(depth=(0.0,)), reduction="none")
    double_root = level_loss(head, h, y, LevelWeights(depth=(2.0,)), reduction="none")
    root_ce = plain - no_root  # the root's cross-entropy, > 0 for every input
    assert bool((root_ce > 0).all())
    torch.testing.assert_close(double_root, plain + root_ce)
    (grad_plain,) = torch.autograd.grad(plain.sum(), h)
    (grad_double,) = torch.autograd.grad(double_root.sum(), h)
    assert not torch.allclose(grad_plain, grad_double)


def test_level_weights_reject_bad_values_with_a_named_field():
    assert hash(LevelWeights(nodes={1: 2.0})) == hash(LevelWeights(nodes={1: 2}))
    with pytest.raises(ValueError, match=r"depth\[1\]"):
        LevelWeights(depth=(1.0, -1.0))
    with pytest.raises(ValueError, match="default"):
        LevelWeights(default=math.nan)
    with pytest.raises(ValueError, match=r"nodes names \[9\]"):
        LevelWeights(nodes={9: 1.0}).node_weights(Tree(3, [[0, 4], [1, 2]]))
    head = make_head("depth 1")
    with pytest.raises(ValueError, match="shape"):
        level_loss(head, torch.randn(2, 8), torch.tensor([0, 1]), torch.ones(5))
    with pytest.raises(ValueError, match=r"class ids in 0\.\.6"):
        level_loss(head, torch.randn(2, 8), torch.tensor([0, 7]), LevelWeights())
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        greedy_descent(head, torch.randn(2, 5))
    with pytest.raises(ValueError, match="NaN or infinite"):
        greedy_descent(head, torch.tensor([[float("nan")] * 8]))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_greedy_descent_takes_the_most_probable_child_at_every_node(name):
    head = make_head(name, seed=3)
    tree, V = head.tree, head.num_classes
    h = torch.randn(10, 8)
    descent = greedy_descent(head, h)
    all_lp = head.log_probs_all(h).detach()
    for i in range(10):
        node, k = 0, 0
        while True:
            child_lp = brute_child_log_probs(tree, all_lp[i], node)
            ranked = sorted(child_lp, key=child_lp.get, reverse=True)
            assert int(descent.nodes[i, k]) == node
            assert int(descent.chosen[i, k]) == ranked[0] and int(descent.runner_up[i, k]) == ranked[1]
            assert float(descent.chosen_log_prob[i, k]) == pytest.approx(child_lp[ranked[0]], abs=1e-4)
            assert float(descent.runner_up_log_prob[i, k]) == pytest.approx(child_lp[ranked[1]], abs=1e-4)
            k += 1
            if ranked[0] < V:
                assert int(descent.answer[i]) == ranked[0] and int(descent.length[i]) == k
                break
            node = ranked[0] - V
        assert bool((descent.nodes[i, k:] == -1).all())
    assert bool(descent.is_leaf.all())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_greedy_predictions_are_consistent_with_the_hierarchy(name):
    """The predicted leaf's ancestors are exactly the nodes the greedy descent chose, level by level."""
    head = make_head(name, seed=4)
    descent = greedy_descent(head, torch.randn(50, 8))
    V, D = head.num_classes, head.tree.max_depth
    ancestors = class_vertices(head.tree, descent.answer, D)
    taken = torch.cat([torch.full((50, 1), V), descent.chosen], 1)
    assert torch.equal(ancestors, taken)
    # and each decision's node is the previous decision's chosen child
    inner = descent.nodes[:, 1:] >= 0
    assert torch.equal(descent.nodes[:, 1:][inner] + V, descent.chosen[:, :-1][inner])


def test_class_vertices_are_the_paths():
    tree = builders.random_tree(30, seed=1, max_arity=4)
    y = torch.arange(30)
    table = class_vertices(tree, y)
    for label in range(30):
        steps = tree.path(label)
        expected = [30 + node for node, _ in steps] + [label]
        assert table[label, : len(expected)].tolist() == expected
        assert bool((table[label, len(expected) :] == -1).all())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_level_accuracy_matches_a_brute_force_count(name):
    head = make_head(name, seed=5)
    tree, V = head.tree, head.num_classes
    h = torch.randn(40, 8)
    y = torch.randint(0, V, (40,))
    result = level_accuracy(head, h, y, chunk=16)  # chunks must not change the counts
    all_lp = head.log_probs_all(h).detach()
    D = tree.max_depth
    inputs, greedy, argmax = np.zeros(D + 1), np.zeros(D + 1), np.zeros(D + 1)
    for i in range(40):
        truth = [V + n for n, _ in tree.path(int(y[i]))] + [int(y[i])]
        best = int(all_lp[i].argmax())
        best_path = [V + n for n, _ in tree.path(best)] + [best]
        node, greedy_path = 0, [V]
        while True:
            child_lp = brute_child_log_probs(tree, all_lp[i], node)
            pick = max(child_lp, key=child_lp.get)
            greedy_path.append(pick)
            if pick < V:
                break
            node = pick - V
        for d in range(1, len(truth)):
            inputs[d] += 1
            greedy[d] += d < len(greedy_path) and greedy_path[d] == truth[d]
            argmax[d] += d < len(best_path) and best_path[d] == truth[d]
    assert result.inputs.tolist() == inputs[1:].astype(int).tolist()
    np.testing.assert_allclose(result.greedy, greedy[1:] / inputs[1:])
    np.testing.assert_allclose(result.argmax, argmax[1:] / inputs[1:])
    assert result.top1_argmax == pytest.approx(float((all_lp.argmax(1) == y).float().mean()))
    assert "depth" in result.table()


def test_fit_trains_a_level_weighted_head_and_it_learns_the_top_level():
    data = make_planted(SMALL_PLANTED)
    dataset = data.to_dataset()
    head = TreeSoftmaxHead(data.tree, 8)
    model = LevelWeightedHead(head, LevelWeights(depth=(2.0,)))
    before = level_accuracy(head, torch.tensor(data.features["valid"]), torch.tensor(data.labels["valid"]))
    result = fit(model, dataset, TrainConfig(epochs=2, batch_size=128, lr=0.03), device="cpu")
    after = level_accuracy(head, torch.tensor(data.features["valid"]), torch.tensor(data.labels["valid"]))
    assert math.isfinite(result.best_valid_nll)
    assert after.greedy[0] > before.greedy[0] + 0.2  # the root's decision was learned


@pytest.mark.parametrize("module", ["levels", "explain", "early"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(f"tree_search.hierarchy.{module}"))
    assert tried > 0 and failures == 0
