"""JTM-style re-assignment: the shape is kept, capacities hold, misplaced classes go back, the searcher's contract."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from quick_settings import PLANTED, QUICK

from tree_search.agents.jtm_search import JTMSearcher, _assign, reassign, slot_costs
from tree_search.builders import huffman
from tree_search.data.planted import make_planted
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.reward.node_train import split_sample
from tree_search.reward.reward import huffman_cost, node_weights
from tree_search.tree import Tree

CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, cost_cap=2.0)


@pytest.fixture(scope="module")
def dataset():
    return load_env_dataset(CONFIG)


def _train(dataset):
    sample = split_sample(dataset, "train", QUICK.train_tokens, QUICK.seed, torch.device("cpu"))
    return sample.features, sample.labels


def test_two_slots_are_filled_optimally_and_wider_nodes_respect_capacities():
    rng = np.random.default_rng(0)
    score = rng.normal(size=(7, 2))
    choice = _assign(np.zeros(7, np.int64), score, np.array([3, 4]), np.array([0]), np.array([2]))
    best = max(
        (c for c in itertools.product(range(2), repeat=7) if sum(c) == 4),  # 4 classes in slot 1, 3 in slot 0
        key=lambda c: score[np.arange(7), list(c)].sum(),
    )
    assert list(choice) == list(best)
    # two nodes of fanout 4 and 3 at once: every slot gets exactly its capacity
    owner = np.array([0] * 9 + [1] * 5)
    score = rng.normal(size=(14, 4))
    capacity = np.array([1, 3, 4, 1, 2, 2, 1])
    choice = _assign(owner, score, capacity, np.array([0, 4]), np.array([4, 3]))
    slots = np.array([0, 4])[owner] + choice
    assert (choice < np.array([4, 3])[owner]).all()
    assert np.bincount(slots, minlength=7).tolist() == capacity.tolist()


def test_slot_costs_are_the_cost_below_each_child():
    counts = np.array([8.0, 4, 2, 1, 1])
    tree = huffman(counts, 2)
    below = slot_costs(tree, counts - 0.5, dim=1)  # (its +0.5 makes the weights exactly `counts`)
    # the root's slots: the leaf costs nothing; the internal child costs its subtree's mean fanout sum
    root = slice(tree.child_ptr[0], tree.child_ptr[1])
    ids = tree.child_ids[root]
    assert below[root][ids < 5].tolist() == [0.0]
    mean_depth_below = (tree.depth[1:] - 1) @ counts[1:] / counts[1:].sum() * 2  # binary: 2 per level
    assert below[root][ids >= 5][0] == pytest.approx(mean_depth_below)


def test_with_a_large_stay_bonus_nothing_moves_and_the_shape_is_always_kept(dataset):
    tree = huffman(np.asarray(dataset.counts, float) + 1, 4)
    weights = node_weights(tree, dataset, QUICK, device="cpu")
    features, labels = _train(dataset)
    kept = reassign(tree, weights, features, labels, dataset.counts, dataset.dim, stay_bonus=1e9)
    assert kept.canonical_hash == tree.canonical_hash
    moved = reassign(tree, weights, features, labels, dataset.counts, dataset.dim, stay_bonus=0.0)
    assert moved.canonical_hash != tree.canonical_hash  # Huffman ignores the planted clusters: classes move
    assert (moved.fanout == tree.fanout).all() and (moved.child_ptr == tree.child_ptr).all()
    assert ((moved.child_ids >= dataset.num_classes) == (tree.child_ids >= dataset.num_classes)).all()


def test_classes_swapped_out_of_their_planted_clusters_are_moved_back(dataset):
    planted = make_planted(PLANTED).tree
    V = planted.num_classes
    # swap 4 pairs of classes between the planted tree's bottom groups
    bottoms = [n for n in range(planted.num_internal) if (planted.children(n) < V).all()]
    swapped_ids = planted.child_ids.copy()
    pairs = []
    for a, b in zip(bottoms[0:8:2], bottoms[1:8:2], strict=True):
        i, j = planted.child_ptr[a], planted.child_ptr[b]
        swapped_ids[i], swapped_ids[j] = swapped_ids[j], swapped_ids[i]
        pairs.append((int(swapped_ids[i]), int(swapped_ids[j])))
    swapped = Tree.from_csr(V, planted.child_ptr, swapped_ids)
    evaluator = LocalEvaluator(dataset, QUICK)
    before = evaluator.evaluate(swapped, searcher="test").valid_nll
    features, labels = _train(dataset)
    weights = node_weights(swapped, dataset, QUICK, device="cpu")
    fixed = reassign(swapped, weights, features, labels, dataset.counts, dataset.dim)
    after = evaluator.evaluate(fixed, searcher="test").valid_nll
    planted_nll = evaluator.evaluate(planted, searcher="test").valid_nll
    back = sum(fixed.leaf_parent[x] == planted.leaf_parent[x] for pair in pairs for x in pair)
    print(f"swapped {before:.4f}, re-assigned {after:.4f}, planted {planted_nll:.4f}; {back}/8 classes back")
    assert back >= 6
    assert after < before - 0.5 * (before - planted_nll)


def test_the_jtm_searcher_stays_within_budget_and_cap_and_improves_on_its_start(dataset):
    evaluator = LocalEvaluator(dataset, QUICK, budget=9)
    searcher = JTMSearcher(evaluator, dataset, CONFIG, device="cpu", score_tokens=10_000)
    yielded = list(searcher.search())
    assert len(yielded) == evaluator.used <= 9 and len({e.key for e in yielded}) == len(yielded)
    cap = CONFIG.cost_cap * huffman_cost(dataset)
    trees = {e.key: e for e in yielded}
    assert all(e.ok for e in yielded)
    assert searcher.rounds, "no re-assignment round was played"
    starts = yielded[: len(yielded) - len(searcher.rounds)]
    assert min(nll for _, _, nll in searcher.rounds) < min(e.valid_nll for e in starts)  # the rounds improved on it
    for e in trees.values():
        assert e.cost_ratio * dataset.num_classes * dataset.dim <= cap * (1 + 1e-9)


def test_projected_nodes_are_refused_with_a_clear_error(dataset):
    tree = huffman(np.asarray(dataset.counts, float) + 1, 4)
    weights = {n: (np.zeros((int(tree.fanout[n]), 4)), np.zeros(int(tree.fanout[n])), np.zeros((4, 16)))
               for n in range(tree.num_internal)}  # fmt: skip
    features, labels = _train(dataset)
    with pytest.raises(ValueError, match="without projections"):
        reassign(tree, weights, features, labels, dataset.counts, dataset.dim)


def test_under_a_decoding_cap_every_tree_jtm_evaluates_fits_it(dataset, tmp_path):
    import dataclasses

    from tree_search.cost import DECODE_FEATURES, FEATURES, CostProfile
    from tree_search.reward.decode_cap import decode_cap_for

    # training priced by multiply-adds; decoding by the pairs the beam search scores and the levels it runs
    training = {"dense_macs": 1e-9, "packed_macs": 1e-9, "top_macs": 1e-9}
    decoding = {"constant": 1e-6, "scored_pairs": 1e-6, "levels": 1e-5}
    profile = CostProfile(device="cpu: test", device_type="cpu", dim=PLANTED.dim, batch=256, precision="fp32",
                          sparse=True, num_classes=64, coefficients=tuple(training.get(n, 0.0) for n in FEATURES),
                          decode_coefficients=tuple(decoding.get(n, 0.0) for n in DECODE_FEATURES))  # fmt: skip
    profile.save(tmp_path / "p.json")
    free = dataclasses.replace(CONFIG, cost=f"measured:{tmp_path / 'p.json'}", cost_cap=3.0)
    ratio = decode_cap_for(free.cost, 1.0, dataset).ratio  # decoding time / binary Huffman's
    starts = JTMSearcher(LocalEvaluator(dataset, QUICK, budget=1), dataset, free, device="cpu").start_trees()
    cap = float(np.median([ratio(tree) for tree in starts]))
    capped = dataclasses.replace(free, decode_cap=cap)
    evaluator = LocalEvaluator(dataset, QUICK, budget=8)
    trees = {}
    evaluator.listeners.append(lambda evaluation, tree: trees.setdefault(evaluation.key, tree))
    searcher = JTMSearcher(evaluator, dataset, capped, device="cpu", score_tokens=10_000)
    kept = searcher.start_trees()
    assert 0 < len(kept) < len(starts)  # the decoding cap leaves some of the grammar's trees out
    assert {t.canonical_hash for t in kept} == {t.canonical_hash for t in starts if ratio(t) <= cap * (1 + 1e-9)}
    yielded = list(searcher.search())
    assert yielded and searcher.rounds  # start trees and re-assigned ones
    for evaluation in yielded:
        assert ratio(trees[evaluation.key]) <= cap * (1 + 1e-9)
    # a round from a tree over the decoding cap gives a tree within it, or none
    start = max(kept, key=ratio)
    tight = JTMSearcher(
        LocalEvaluator(dataset, QUICK, budget=2),
        dataset,
        dataclasses.replace(free, decode_cap=0.9 * ratio(start)),
        device="cpu",
        score_tokens=10_000,
    )
    LocalEvaluator(dataset, QUICK, budget=1).evaluate(start)  # its nodes trained (the bank), as the search would
    new = tight.refine(start)
    assert new is None or ratio(new) <= 0.9 * ratio(start) * (1 + 1e-9)
