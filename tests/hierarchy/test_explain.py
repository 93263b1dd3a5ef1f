import numpy as np
import pytest
import torch
from random_heads import SHAPES, make_head

from tree_search.hierarchy.explain import describe, explain
from tree_search.hierarchy.levels import greedy_descent
from tree_search.tree import Tree

torch.set_num_threads(1)


def path_vertices(tree: Tree, label: int) -> list[int]:
    return [tree.num_classes + n for n, _ in tree.path(label)] + [label]


def child_probs(tree: Tree, all_lp: torch.Tensor, node: int) -> dict[int, float]:
    """p(child | node) of every child from the class distribution of one input."""
    V = tree.num_classes

    def mass(unified: int) -> float:
        below = [y for y in range(V) if unified in path_vertices(tree, y)]
        return float(all_lp[below].exp().sum())

    total = mass(V + node)
    return {int(c): mass(int(c)) / total for c in tree.children(node)}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("path", ["argmax", "greedy"])
def test_each_decision_matches_the_class_distribution(name, path):
    head = make_head(name)
    tree, V = head.tree, head.num_classes
    h = torch.randn(12, 8)
    audit = explain(head, h, path=path, chunk=5)  # chunks must not change anything
    all_lp = head.log_probs_all(h).detach()
    if path == "argmax":
        assert audit.classes.tolist() == all_lp.argmax(1).tolist()
    else:
        assert audit.classes.tolist() == greedy_descent(head, h).answer.tolist()
    for i in range(12):
        vertices = path_vertices(tree, int(audit.classes[i]))
        decisions = audit.decisions(i)
        assert len(decisions) == len(vertices) - 1 == audit.length[i]
        for k, d in enumerate(decisions):
            probs = child_probs(tree, all_lp[i], vertices[k] - V)
            assert d["node"] == vertices[k] - V and d["chosen"] == vertices[k + 1]
            assert d["chosen_prob"] == pytest.approx(probs[d["chosen"]], abs=1e-4)
            others = {c: p for c, p in probs.items() if c != d["chosen"]}
            assert d["runner_up"] == max(others, key=others.get)
            assert d["runner_up_prob"] == pytest.approx(max(others.values()), abs=1e-4)
            if path == "greedy":
                assert d["chosen_prob"] >= d["runner_up_prob"]
        branch = [d["chosen_prob"] for d in decisions]
        assert audit.path_prob[i] == pytest.approx(float(all_lp[i, audit.classes[i]].exp()), rel=1e-4)
        assert audit.path_prob[i] == pytest.approx(np.prod(branch), rel=1e-4)
        assert audit.min_prob[i] == pytest.approx(min(branch))
        assert np.isnan(audit.chosen_prob[i, len(decisions) :]).all()


def test_argmax_path_can_take_a_less_probable_branch_and_then_its_margin_is_negative():
    head = make_head("binary huffman", seed=7)
    audit = explain(head, torch.randn(300, 8))
    greedy = explain(head, torch.randn(300, 8), path="greedy")
    margins = audit.chosen_prob - audit.runner_up_prob
    assert (np.nan_to_num(greedy.chosen_prob - greedy.runner_up_prob, nan=0) >= 0).all()
    assert (margins[~np.isnan(margins)] < 0).any()  # with 300 random inputs at least one such path


def test_node_summary_counts_the_inputs_that_passed_and_averages_their_branches():
    head = make_head("random 5-ary", seed=1)
    tree, V = head.tree, head.num_classes
    audit = explain(head, torch.randn(60, 8))
    visits, probs, margins = {}, {}, {}
    for i in range(60):
        for d in audit.decisions(i):
            visits[d["node"]] = visits.get(d["node"], 0) + 1
            probs.setdefault(d["node"], []).append(d["chosen_prob"])
            margins.setdefault(d["node"], []).append(d["chosen_prob"] - d["runner_up_prob"])
    stats = audit.node_stats()
    assert stats.nodes.tolist() == sorted(visits)
    assert stats.inputs.tolist() == [visits[n] for n in sorted(visits)]
    np.testing.assert_allclose(stats.mean_prob, [np.mean(probs[n]) for n in sorted(visits)], rtol=1e-6)
    np.testing.assert_allclose(stats.mean_margin, [np.mean(margins[n]) for n in sorted(visits)], rtol=1e-5)
    assert visits[0] == 60  # every path starts at the root
    worst = audit.least_confident(top=4, min_inputs=3)
    assert len(worst.nodes) == 4 and (worst.inputs >= 3).all()
    eligible = sorted(np.mean(probs[n]) for n in visits if visits[n] >= 3)
    np.testing.assert_allclose(worst.mean_prob, eligible[:4], rtol=1e-6)
    assert "least confident nodes over 60 inputs" in audit.table(rows=1)
    assert describe(tree, V + int(worst.nodes[0]), head.labels) in audit.table(rows=0, top=4, min_inputs=3)
    assert "no node was passed by 61 inputs" in audit.table(rows=0, min_inputs=61)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_departures_name_the_deepest_shared_node_and_the_true_branch(name):
    head = make_head(name, seed=2)
    tree, V = head.tree, head.num_classes
    h = torch.randn(40, 8)
    all_lp = head.log_probs_all(h).detach()
    y = all_lp.argmax(1).clone()
    y[::2] = torch.randint(0, V, (20,))  # half the inputs get another true class (some by chance the same)
    audit = explain(head, h, y)
    for i in range(40):
        if int(y[i]) == int(audit.classes[i]):
            assert audit.left_node[i] == -1 and audit.left_depth[i] == -1 and np.isnan(audit.true_child_prob[i])
            continue
        truth, predicted = path_vertices(tree, int(y[i])), path_vertices(tree, int(audit.classes[i]))
        shared = 0
        while truth[shared + 1] == predicted[shared + 1]:
            shared += 1
        node = truth[shared] - V
        assert audit.left_node[i] == node and audit.left_depth[i] == shared
        assert audit.true_child[i] == truth[shared + 1]
        assert audit.chosen[i, shared] == predicted[shared + 1]
        probs = child_probs(tree, all_lp[i], node)
        assert audit.true_child_prob[i] == pytest.approx(probs[truth[shared + 1]], abs=1e-4)
    away = audit.departures()
    wrong = audit.left_node[audit.left_node >= 0]
    assert away.inputs.sum() == wrong.size and away.inputs[0] == np.bincount(wrong).max()
    assert "where the true path left the predicted one" in audit.table()


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    head = make_head("binary huffman")
    h = torch.randn(30, 8)
    audit = explain(head, h, torch.randint(0, head.num_classes, (30,)))
    audit.plot(tmp_path / "audit.png", top=8)
    data = (tmp_path / "audit.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bad_input_is_named():
    head = make_head("binary huffman")
    with pytest.raises(ValueError, match="path must be one of"):
        explain(head, torch.randn(3, 8), path="beam")
    with pytest.raises(ValueError, match="ignore_index"):
        explain(head, torch.randn(2, 8), torch.tensor([0, -100]))
    with pytest.raises(ValueError, match="at least one input"):
        explain(head, torch.randn(0, 8))
    with pytest.raises(ValueError, match="departures need the true classes"):
        explain(head, torch.randn(2, 8)).departures()
    with pytest.raises(TypeError, match="TreeSoftmaxHead"):
        explain(torch.nn.Linear(8, 3), torch.randn(2, 8))
