"""The decoding replay: the certified beam search on given class distributions scores what a head scores."""

import math

import numpy as np
import pytest
import torch

from tree_search import builders
from tree_search.heads.centroid import centroid_head, unit_class_embeddings
from tree_search.heads.decode_replay import DecodeReplay, centroid_log_probs
from tree_search.heads.tree_head import TreeSoftmaxHead


def test_which_nodes_a_top_k_search_scores_by_hand():
    # root -> (class 0, A, B); A -> (1, 2); B -> (3, 4); masses 0.6, 0.3 + 0.05 = 0.35, 0.03 + 0.02 = 0.05
    tree = builders.from_children(5, [[0, 6, 7], [1, 2], [3, 4]])
    log_probs = torch.tensor([[0.6, 0.3, 0.05, 0.03, 0.02]]).log()
    a, b = (tree.children(0)[1] - 5, tree.children(0)[2] - 5)
    # top-1: class 0 (0.6) beats A (0.35) and B (0.05) once the root is scored: nothing else is scored
    replay = DecodeReplay(tree, log_probs)
    classes, _ = replay.predict(replay._log_mass, 1)
    assert classes.tolist() == [[0]]
    assert replay.scored.tolist() == [1, 0, 0]
    # top-2: after the root only one class is known, so A and B are both scored (in one level)
    replay = DecodeReplay(tree, log_probs)
    classes, lp = replay.predict(replay._log_mass, 2)
    assert classes.tolist() == [[0, 1]] and lp.exp()[0].tolist() == pytest.approx([0.6, 0.3], rel=1e-6)
    expected = np.zeros(3)
    expected[[0, a, b]] = 1
    assert replay.scored.tolist() == expected.tolist()
    assert replay.passes == 2  # two levels, one group each


@pytest.mark.parametrize("name", ["huffman-2", "huffman-8", "kmeans-16", "headtail-kmeans-16", "adaptive", "grave-2"])
def test_replay_on_a_heads_own_distributions_scores_exactly_its_pairs(name):
    V, d = 1500, 32
    counts = 1.0 / np.arange(1, V + 1)
    E = unit_class_embeddings(V, d, seed=1)
    classic = builders.classic_trees(counts, [name], embeddings=E, dim=d)[name]
    head = centroid_head(classic.tree, E, counts, projections=classic.projections, temperature=12.0)
    rng = np.random.default_rng(0)
    y = rng.choice(V, 40, p=counts / counts.sum())
    h = torch.from_numpy(E[y] + rng.standard_normal((40, d)).astype(np.float32) / math.sqrt(d))
    head_pairs = np.zeros(classic.tree.num_internal)
    original = TreeSoftmaxHead._pair_scores

    def counting(self, x, rows, nodes):  # what the head's own search asks to score
        np.add.at(head_pairs, nodes.numpy(), 1)
        yield from original(self, x, rows, nodes)

    with torch.no_grad():
        own = head.log_probs_all(h).float()
        TreeSoftmaxHead._pair_scores = counting
        try:
            classes, _ = head.predict(h, 5)
        finally:
            TreeSoftmaxHead._pair_scores = original
    replayed = DecodeReplay(classic.tree, own).replay(5, 40)
    assert head_pairs.sum() > 0
    assert np.array_equal(replayed.scored * 40, head_pairs)
    replay = DecodeReplay(classic.tree, own)
    assert torch.equal(replay.predict(replay._log_mass, 5)[0], classes)
    assert torch.equal(classes, own.topk(5, dim=1).indices)  # and both are the exact top-5


def test_centroid_log_probs_pick_the_temperature_with_the_best_likelihood():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((20, 8)).astype(np.float32)
    y = rng.integers(0, 20, 300)
    queries = means[y] + 0.7 * rng.standard_normal((300, 8)).astype(np.float32)
    counts = np.ones(20)
    fitted = centroid_log_probs(means, counts, queries, y)
    assert torch.allclose(fitted.exp().sum(1), torch.ones(300), atol=1e-5)
    nll = float(-fitted[np.arange(300), y].mean())
    # independently: the same classifier at a few other temperatures is no better
    base = torch.from_numpy(queries @ means.T - 0.5 * (means * means).sum(1))
    for t in (0.01, 0.1, 1.0, 10.0, 100.0):
        other = torch.log_softmax(base * t, 1)
        assert nll <= float(-other[np.arange(300), y].mean()) + 1e-3


def test_the_datasets_replay_is_remembered_per_tree_within_a_bound():
    from quick_settings import ENV

    from tree_search.envs import load_env_dataset
    from tree_search.heads.decode_replay import decode_scores_for_dataset

    dataset = load_env_dataset(ENV)
    trees = [builders.huffman(dataset.class_weights, k) for k in (2, 3, 4)]
    sizes = [t.num_internal for t in trees]
    replay = decode_scores_for_dataset(dataset, memo_numbers=sizes[0] + sizes[1])
    first = replay(trees[0])
    assert replay(builders.huffman(dataset.class_weights, 2)) is first  # the same arrays: remembered
    second = replay(trees[1])
    assert replay(trees[0]) is first  # now the most recent
    replay(trees[2])  # over the bound: the least recently used (the 3-ary tree) goes
    assert replay(trees[0]) is first and replay(trees[1]) is not second
    assert np.array_equal(replay(trees[1]).scored, second.scored)  # recomputed alike
