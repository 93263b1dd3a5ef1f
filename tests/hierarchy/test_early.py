import numpy as np
import pytest
import torch
from random_heads import SHAPES, make_head

from tree_search import builders
from tree_search.heads import TreeSoftmaxHead
from tree_search.hierarchy.early import answer_contains, bayes_thresholds, coverage_sweep, early_answer
from tree_search.hierarchy.levels import greedy_descent
from tree_search.tree import Tree

torch.set_num_threads(1)


@pytest.fixture(params=sorted(SHAPES))
def head(request) -> TreeSoftmaxHead:
    return make_head(request.param)


def test_threshold_zero_is_the_greedy_descent_at_every_input(head):
    h = torch.randn(64, 8)
    greedy, early = greedy_descent(head, h), early_answer(head, h, 0.0)
    assert torch.equal(early.answer, greedy.answer) and bool(early.is_leaf.all())
    assert torch.equal(early.nodes, greedy.nodes)


def test_threshold_above_one_answers_the_root_everywhere(head):
    early = early_answer(head, torch.randn(20, 8), 1.0001)
    assert early.answer.tolist() == [head.num_classes] * 20  # V + 0: the root
    assert not bool(early.is_leaf.any()) and early.length.tolist() == [0] * 20


def test_coverage_is_monotone_in_the_threshold(head):
    h = torch.randn(200, 8)
    coverage = [float(early_answer(head, h, t).is_leaf.float().mean()) for t in np.linspace(0, 1, 21)]
    assert all(a >= b for a, b in zip(coverage, coverage[1:], strict=False))
    assert coverage[0] == 1.0 and coverage[-1] < coverage[0]


def test_early_answers_follow_the_stopping_rule_on_the_greedy_path(head):
    """A coarse answer is the first node of the greedy path whose best branch is below its own threshold."""
    tree, V = head.tree, head.num_classes
    h = torch.randn(100, 8)
    thresholds = np.random.default_rng(1).uniform(0.3, 0.95, tree.num_internal)
    thresholds[0] = 0.2  # the root lets most inputs through, so that deeper stops and leaves occur
    greedy, early = greedy_descent(head, h), early_answer(head, h, thresholds)
    assert (~early.is_leaf).any() and early.is_leaf.any()  # both kinds occur, so both are checked
    for i in range(100):
        probs = greedy.chosen_log_prob[i, : greedy.length[i]].exp().tolist()
        nodes = greedy.nodes[i, : greedy.length[i]].tolist()
        failed = [k for k, (n, p) in enumerate(zip(nodes, probs, strict=True)) if p < np.float32(thresholds[n])]
        if failed:
            assert int(early.answer[i]) == V + nodes[failed[0]]  # on the greedy path, at the first failure
            assert int(early.length[i]) == failed[0]
        else:
            assert int(early.answer[i]) == int(greedy.answer[i])


def test_the_sweep_reads_the_same_answers_off_one_descent_and_counts_them_right(head):
    tree, V = head.tree, head.num_classes
    h = torch.randn(120, 8)
    y = torch.randint(0, V, (120,))
    y[:40] = greedy_descent(head, h[:40]).answer  # some leaf answers are right
    ratios = (0.0, 0.5, 1.0, 3.0, 9.0, 1e6)
    sweep = coverage_sweep(head, h, y, ratios, chunk=50)
    for ratio, row in zip(ratios, sweep.rows, strict=True):
        answer = early_answer(head, h, ratio / (1 + ratio)).answer
        leaf = answer < V
        holds = [int(y[i]) in _below(tree, int(answer[i])) for i in range(120)]
        holds = torch.tensor(holds)
        assert row.threshold == pytest.approx(ratio / (1 + ratio))
        assert row.coverage == pytest.approx(float(leaf.float().mean()))
        assert row.top1 == pytest.approx(float((holds & leaf).float().mean()))
        assert row.accuracy == pytest.approx(float(holds.float().mean()))
        if leaf.any():
            assert row.leaf_accuracy == pytest.approx(float(holds[leaf].float().mean()))
        if (~leaf).any():
            assert row.coarse_accuracy == pytest.approx(float(holds[~leaf].float().mean()))
        depth = [tree.depth[a] if a < V else tree.node_depth[a - V] for a in answer.tolist()]
        assert row.mean_depth == pytest.approx(np.mean(depth))
    assert sweep.rows[0].coverage == 1.0 and sweep.rows[-1].coverage < 0.2
    assert "c_wrong/c_stop" in sweep.table()


def _below(tree: Tree, unified: int) -> set[int]:
    V = tree.num_classes
    if unified < V:
        return {unified}
    return {y for y in range(V) if any(n == unified - V for n, _ in tree.path(y))}


def test_answer_contains_matches_the_paths():
    tree = builders.random_tree(30, seed=2, max_arity=4)
    V = tree.num_classes
    answers = torch.tensor([u for u in range(V + tree.num_internal) for _ in range(V)])
    y = torch.arange(V).repeat(V + tree.num_internal)
    got = answer_contains(tree, answers, y)
    expected = [int(c) in _below(tree, int(u)) for u, c in zip(answers, y, strict=True)]
    assert got.tolist() == expected


def test_bayes_thresholds():
    tree = Tree(4, [[0, 5], [1, 6], [2, 3]])
    np.testing.assert_allclose(bayes_thresholds(tree, 3.0, 1.0), [0.75] * 3)
    per_node = bayes_thresholds(tree, c_wrong=np.array([1.0, 0.0, 9.0]), c_stop=np.array([1.0, 2.0, 1.0]))
    np.testing.assert_allclose(per_node, [0.5, 0.0, 0.9])
    with pytest.raises(ValueError, match="c_wrong must be a number or an array of shape \\(3,\\)"):
        bayes_thresholds(tree, np.ones(2))
    with pytest.raises(ValueError, match="c_stop must be finite and >= 0"):
        bayes_thresholds(tree, 1.0, -1.0)
    with pytest.raises(ValueError, match="c_wrong \\+ c_stop must be > 0"):
        bayes_thresholds(tree, 0.0, 0.0)


def test_a_larger_cost_of_wrong_answers_trades_coverage_for_accuracy_on_a_planted_task():
    from tree_search.data import PlantedConfig, make_planted

    data = make_planted(PlantedConfig(num_classes=27, dim=8, fanout=3, signal=2.0, num_valid=4000))
    head = TreeSoftmaxHead(data.tree, 8, fanout_scaled_steps=False, bias=True)
    for node in range(data.tree.num_internal):  # the oracle's own parameters: a calibrated head
        lo, hi = data.tree.child_ptr[node], data.tree.child_ptr[node + 1]
        head.set_node_parameters(node, torch.tensor(data.weights[lo:hi], dtype=torch.float32),
                                 torch.tensor(data.biases[lo:hi], dtype=torch.float32))  # fmt: skip
    h, y = torch.tensor(data.features["valid"]), torch.tensor(data.labels["valid"]).long()
    rows = coverage_sweep(head, h, y, ratios=(0.0, 1.0, 4.0, 19.0)).rows
    assert [r.coverage for r in rows] == sorted([r.coverage for r in rows], reverse=True)
    assert rows[-1].accuracy > rows[0].accuracy + 0.2  # a calibrated model's coarse answers are safer
    assert rows[-1].leaf_accuracy > rows[0].leaf_accuracy  # and the class answers it still gives more accurate


def test_plot_and_bad_input(tmp_path):
    head = make_head("binary huffman")
    sweep = coverage_sweep(head, torch.randn(30, 8), torch.randint(0, 40, (30,)))
    pytest.importorskip("matplotlib")
    sweep.plot(tmp_path / "early.png")
    assert (tmp_path / "early.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="ratios must be finite numbers >= 0"):
        coverage_sweep(head, torch.randn(3, 8), torch.tensor([0, 1, 2]), ratios=(-1.0,))
    with pytest.raises(ValueError, match="thresholds must be a number or \\(39,\\)"):
        early_answer(head, torch.randn(3, 8), np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        early_answer(head, torch.randn(3, 8), float("nan"))
