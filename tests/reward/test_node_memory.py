"""Held-out scoring of a group of nodes in bounded memory (`node_train._loss_sums`).

A group of thousands of nodes where one node holds many held-out tokens must not be padded to
(nodes x that node's count) at once: at V = 300k that padding took 12-19 GiB in a final scoring.
"""

import tracemalloc

import numpy as np
import torch

from tree_search.reward.node_train import _HeldOut, _loss_sums


def _lopsided(num_nodes: int, big: int, seed: int = 0):
    """Node 0 holds ``big`` tokens, every other node 1-3; rows and children at random."""
    rng = np.random.default_rng(seed)
    counts = np.concatenate([[big], rng.integers(1, 4, num_nodes - 1)])
    ptr = np.concatenate([[0], np.cumsum(counts)])
    rows = rng.integers(0, 1000, ptr[-1])
    child = rng.integers(0, 2, ptr[-1])
    return ptr, rows, child


def test_scoring_a_lopsided_group_stays_in_a_few_megabytes():
    num_nodes, big, d = 2000, 20_000, 8
    ptr, rows, child = _lopsided(num_nodes, big)
    features = torch.randn(1000, d)
    W = torch.randn(num_nodes, 1, 2, d)
    b = torch.zeros(num_nodes, 1, 2)
    mask = torch.zeros(num_nodes, 2)
    tracemalloc.start()
    try:
        _loss_sums([W, b], mask, features, _HeldOut(ptr, rows, child, np.arange(num_nodes)), torch.device("cpu"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a window holds about the scores' budget (8M numbers) / 8 tokens, in six int64 or bool arrays: about 50 MB;
    # the whole group padded at once would be 2,000 x 20,000 in each: 320 MB an int64 array
    assert peak < 100 << 20, f"numpy peaked at {peak / 2**20:.0f} MB"


def test_sums_match_each_nodes_cross_entropy_over_its_halves():
    num_nodes, d = 40, 6
    ptr, rows, child = _lopsided(num_nodes, 300, seed=1)
    features = torch.randn(1000, d, dtype=torch.float32)
    odd = np.random.default_rng(2).random(1000) < 0.5
    W = torch.randn(num_nodes, 3, 2, d)  # three snapshots
    b = torch.randn(num_nodes, 3, 2)
    mask = torch.zeros(num_nodes, 2)
    held_out = _HeldOut(ptr, rows, child, np.arange(num_nodes), odd)
    # a small budget: many node chunks and token windows
    got = _loss_sums([W, b], mask, features, held_out, torch.device("cpu"), budget=512)
    for g in range(num_nodes):
        r, c = rows[ptr[g] : ptr[g + 1]], torch.from_numpy(child[ptr[g] : ptr[g + 1]])
        for m in range(3):
            losses = torch.nn.functional.cross_entropy(
                features[r].double() @ W[g, m].double().T + b[g, m].double(), c, reduction="none"
            )
            for half, keep in enumerate([~odd[r], odd[r]]):
                expected = float(losses[torch.from_numpy(keep)].sum())
                assert abs(got[g, half * 3 + m] - expected) < 1e-4 * max(1.0, abs(expected)), (g, m, half)


def test_row_totals_add_each_tokens_loss_once():
    num_nodes, d = 30, 4
    ptr, rows, child = _lopsided(num_nodes, 200, seed=3)
    rows = np.arange(ptr[-1]) % 500  # rows shared by several nodes, as a token's path crosses several nodes
    features = torch.randn(500, d)
    W, b = torch.randn(num_nodes, 1, 2, d), torch.zeros(num_nodes, 1, 2)
    totals = torch.zeros(500, dtype=torch.float64)
    got = _loss_sums([W, b], torch.zeros(num_nodes, 2), features, _HeldOut(ptr, rows, child, np.arange(num_nodes)),
                     torch.device("cpu"), budget=256, row_totals=totals)  # fmt: skip
    expected = np.zeros(500)
    for g in range(num_nodes):
        r, c = rows[ptr[g] : ptr[g + 1]], torch.from_numpy(child[ptr[g] : ptr[g + 1]])
        losses = torch.nn.functional.cross_entropy(features[r] @ W[g, 0].T, c, reduction="none").double()
        np.add.at(expected, r, losses.numpy())
    np.testing.assert_allclose(totals.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 0].sum(), expected.sum(), rtol=1e-6)
