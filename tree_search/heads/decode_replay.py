"""How often exact top-k decoding scores each node of a tree: the certified beam search replayed on class distributions.

`TreeSoftmaxHead.predict` (a `BeamDecoder`) visits nodes by their log-probabilities only: a
node's log-probability under the head is the log of the mass its classes get. So given each
query's distribution over classes, the nodes the search scores are fixed, whatever weights
produce that distribution. `DecodeReplay` runs the same search (the same code) on such
distributions, reading a node's children's scores from their log-masses, and counts the
pairs it scores; the decoding cost model (`tree_search.cost.DecodeCost`) prices those counts.

The distributions stand in for a trained head's: every head of the data estimates the same
conditional distribution of classes, so one set serves every tree. `centroid_log_probs`
makes them from the data without training (a nearest-class-mean classifier whose
temperature is fitted to the queries' classes); `decode_scores_for_dataset` binds them to
a dataset.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from tree_search.data.features import FeatureDataset, class_feature_means
from tree_search.heads.beam import BeamDecoder
from tree_search.heads.centroid import subtree_embedding_sums
from tree_search.tree import Tree

__all__ = ["DecodeReplay", "ReplayedDecoding", "centroid_log_probs", "decode_scores_for_dataset"]

TEMPERATURES = np.geomspace(1e-2, 1e3, 61)  # searched for the queries' best mean log-likelihood (x 1 / scale)


class DecodeReplay(BeamDecoder):
    """The certified beam search of `BeamDecoder` on fixed class distributions, counting the pairs it scores.

    Args:
        tree: the tree.
        log_probs: (Q, V) each query's log-probabilities of the classes (rows sum to one in probability).
    """

    def __init__(self, tree: Tree, log_probs: torch.Tensor) -> None:
        self.tree = tree
        inner = tree.num_internal
        # each query's mass below every internal node: its probabilities summed up the tree, as embeddings are
        mass, _ = subtree_embedding_sums(tree, log_probs.double().exp().numpy().T, np.ones(tree.num_classes))
        mass = torch.from_numpy(mass.T)  # (Q, I)
        # column c: the log-mass of child id c (classes first, then internal nodes), the scores `_beam` reads
        self._log_mass = torch.cat([log_probs.double(), mass.clamp_min(1e-300).log()], 1).float()
        self._child_ptr = torch.from_numpy(tree.child_ptr.astype(np.int64))
        self._child_ids = torch.from_numpy(tree.child_ids.astype(np.int64))
        self._fanout = torch.from_numpy(tree.fanout.astype(np.int64))
        self.scored = np.zeros(inner)  # pairs scored per node, summed over queries
        self.passes = 0  # levels run (each a call for every weight group), summed over batches

    @property
    def num_classes(self) -> int:
        """V."""
        return self.tree.num_classes

    def _widest_group(self) -> int:
        return int(self._fanout.max())

    def _beam_rows(self, k: int, width: int) -> int:
        return 1 << 30  # one pass over all rows: the counts do not depend on the chunking

    def _pair_scores(self, h: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor):
        """One group: every child's log-mass for the (row, node) pairs (``h`` holds `_log_mass` rows)."""
        self.scored += np.bincount(nodes.numpy(), minlength=self.scored.size)
        self.passes += 1
        fan = self._fanout[nodes]
        position = torch.arange(int(fan.max()))
        columns = self._child_ids[(self._child_ptr[nodes][:, None] + position).clamp(max=self._child_ids.numel() - 1)]
        yield torch.arange(nodes.numel()), h[rows[:, None], columns], position[None, :] < fan[:, None]

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """The classes' log-probabilities; as in the head, scoring every node once per row."""
        self.scored += h.shape[0]
        self.passes += 1
        return h[:, : self.num_classes]

    def replay(self, k: int, batch: int) -> ReplayedDecoding:
        """Decode every query in batches of ``batch``; the scored pairs and levels per query."""
        queries = self._log_mass.shape[0]
        for start in range(0, queries, batch):
            self.predict(self._log_mass[start : start + batch], k)
        batches = math.ceil(queries / batch)
        return ReplayedDecoding(self.scored / queries, self.passes / batches)


class ReplayedDecoding(NamedTuple):
    """What a replayed decoding did, per query of a batch."""

    scored: np.ndarray  # (I,) pairs scored per query at each internal node
    levels: float  # levels run per batch (each one call for every weight group)


def centroid_log_probs(
    means: np.ndarray, counts: np.ndarray, queries: np.ndarray, targets: np.ndarray | None = None
) -> torch.Tensor:
    """(Q, V) log-probabilities of a nearest-class-mean classifier: ``T (h . mu_c - |mu_c|^2 / 2) + log prior_c``.

    ``T`` is the temperature with the best mean log-likelihood of ``targets`` (searched over
    `TEMPERATURES` divided by the scores' spread); without targets, that spread's inverse.
    """
    mu = torch.from_numpy(np.asarray(means, np.float32))
    h = torch.from_numpy(np.asarray(queries, np.float32))
    prior = torch.from_numpy(np.log(np.maximum(np.asarray(counts, np.float64), 1e-12) / np.sum(counts))).float()
    base = h @ mu.T - 0.5 * (mu * mu).sum(1)
    scale = float(base.std()) or 1.0
    if targets is None:
        return torch.log_softmax(base / scale + prior, 1)
    y = torch.from_numpy(np.asarray(targets, np.int64))
    nll = [float(-torch.log_softmax(base * (t / scale) + prior, 1).gather(1, y[:, None]).mean()) for t in TEMPERATURES]
    return torch.log_softmax(base * (TEMPERATURES[int(np.argmin(nll))] / scale) + prior, 1)


def decode_scores_for_dataset(
    dataset: FeatureDataset,
    *,
    queries: int = 256,
    k: int = 5,
    batch: int = 256,
    seed: int = 0,
    memo_numbers: int = 1 << 24,
):
    """A function ``tree -> ReplayedDecoding`` on ``queries`` validation rows of ``dataset``, remembered per tree.

    The rows' class distributions are `centroid_log_probs` of the dataset's mean training
    feature per class, fitted to the rows' own classes. A replay holds ``queries x (V + I)``
    float64 numbers while it runs (about 400 MB for a binary tree at V = 100,000) and takes
    30-120 ms per tree at V = 10,000 on 2 cores. The results (I numbers per tree) are kept for
    the trees asked most recently, ``memo_numbers`` numbers in all (128 MB by default): a
    search asks for the same tree's costs many times.
    """
    split = "valid" if "valid" in dataset.labels and len(dataset.labels["valid"]) else "train"
    n = int(dataset.labels[split].shape[0])
    rows = np.sort(np.random.default_rng([seed, 2]).permutation(n)[:queries])
    h = np.asarray(dataset.features[split][rows], np.float32)
    log_probs = centroid_log_probs(class_feature_means(dataset), dataset.class_weights, h,
                                   np.asarray(dataset.labels[split])[rows])  # fmt: skip
    return _Memo(lambda tree: DecodeReplay(tree, log_probs).replay(k, batch), memo_numbers)


class _Memo:
    """A function of a tree remembered by the tree's exact arrays (node ids included), least recently used out first.

    It keeps at most ``numbers`` numbers of results (always the latest one).
    """

    def __init__(self, fn, numbers: int) -> None:
        self.fn, self.numbers, self.known, self.held = fn, numbers, OrderedDict(), 0

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None):
        key = hashlib.sha1(tree.child_ptr.tobytes() + tree.child_ids.tobytes()).hexdigest()
        if key in self.known:
            self.known.move_to_end(key)
            return self.known[key]
        found = self.known[key] = self.fn(tree)
        self.held += found.scored.size
        while self.held > self.numbers and len(self.known) > 1:
            _, old = self.known.popitem(last=False)
            self.held -= old.scored.size
        return found
