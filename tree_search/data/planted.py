"""A synthetic task with a planted hierarchy: the Bayes-optimal head is a tree softmax over a known tree.

The generative story, for a random *oracle* tree (a balanced tree of the configured
fanout over a random order of the classes) with a score vector ``w_e`` and a bias
``b_e`` for every child entry ``e`` of every internal node:

1. draw features ``h ~ N(0, I_d)``;
2. walk down from the root: at internal node ``n``, take child ``c`` with probability
   ``softmax_c(w_{n,c} . h + b_{n,c})``, until a class (leaf) is reached.

So ``p_true(y | h)`` is exactly the product of the per-node softmaxes along the path of
``y``, the factorization a `Tree` head with this tree computes (see docs/architecture.md, "Maths
the heads share"), and the Bayes loss ``-log p_true(y | h)`` of every sample is known.

Class frequencies: the target is a Zipf prior over a random class order. Biases equal
to the log ratios of subtree masses, ``log(mass(c) / mass(n))``, would make frequencies
much flatter than the prior, since noisy logits flatten a softmax on average; instead
the biases are calibrated top-down on shared draws of ``h`` so that each node passes on
those ratios of the probability that reaches it. Marginal frequencies then match the
prior up to Monte Carlo error (total variation about 0.03 to 0.05 in the tests).
Classes are then renumbered by descending training count (ties by the prior's order),
so class 0 is the most frequent and the counts read like a `Vocab`.

Everything is numpy and seeded: the same `PlantedConfig` gives identical data. Each
split draws from its own stream, so e.g. the test split does not change with
``num_train`` (class ids do, since they follow the training counts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from tree_search.builders import balanced
from tree_search.data.cache import content_key
from tree_search.data.code_corpus import SPLITS
from tree_search.data.features import FeatureDataset
from tree_search.data.vocab import DataError, Vocab
from tree_search.tree import Tree

__all__ = ["COMMAND_LINE_PLANTED", "PlantedConfig", "PlantedData", "make_planted"]


@dataclass(frozen=True)
class PlantedConfig:
    """The size and difficulty of a planted-hierarchy task (see the module docstring)."""

    num_classes: int = 1000  # V, the number of classes
    dim: int = 32  # d, the feature dimension
    fanout: int = 4  # fanout of the oracle tree: balanced over a random order of the classes
    zipf: float = 1.1  # exponent s of the target class prior p(y) ~ (rank + 1)^-s; 0 is uniform
    signal: float = 2.0  # std of every child logit w . h: how informative features are (0: not at all)
    num_train: int = 100_000  # samples in the training split (its counts order the classes)
    num_valid: int = 10_000  # samples in the validation split
    num_test: int = 10_000  # samples in the test split
    seed: int = 0  # seeds the tree, the parameters and every split

    def __post_init__(self) -> None:
        integers = {
            "num_classes": 2,
            "dim": 1,
            "fanout": 2,
            "num_train": 1,
            "num_valid": 1,
            "num_test": 1,
            "seed": 0,
        }
        for name, low in integers.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DataError(f"PlantedConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("zipf", "signal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise DataError(f"PlantedConfig.{name} must be a finite number >= 0, got {value!r}")

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of samples per split, in `SPLITS` order."""
        return {"train": self.num_train, "valid": self.num_valid, "test": self.num_test}


# `tree-search search --dataset planted`: a quick task (its --planted-classes sets num_classes)
COMMAND_LINE_PLANTED = PlantedConfig(num_classes=64, dim=16, signal=3.0, num_train=8000, num_valid=2000, num_test=2000)


@dataclass(frozen=True, eq=False)
class PlantedData:
    """A generated planted-hierarchy task: the oracle tree, its parameters and the splits.

    Child entry ``e`` (an index into ``tree.child_ids``; the children of internal node
    ``n`` are entries ``tree.child_ptr[n]:tree.child_ptr[n + 1]``) has the score
    ``weights[e] . h + biases[e]``; ``p_true(y | h)`` is the product over the path of
    ``y`` of the softmax of the scores of each node's children.
    """

    config: PlantedConfig  # what was generated
    tree: Tree  # the oracle tree; classes numbered by descending training count
    counts: np.ndarray  # (V,) int64 training counts, non-increasing in class id
    features: Mapping[str, np.ndarray]  # split -> (N, d) float32 features h ~ N(0, I)
    labels: Mapping[str, np.ndarray]  # split -> (N,) int32 classes drawn from p_true(y | h)
    bayes_nll: Mapping[str, float]  # split -> mean -log p_true(y | h) in nats: the loss of the true model
    weights: np.ndarray  # (I+V-1, d) float64 score vector of every child entry
    biases: np.ndarray  # (I+V-1,) float64 bias of every child entry

    def to_dataset(self) -> FeatureDataset:
        """The task as a `FeatureDataset` (classes named "0".."V-1"), ready for `evaluate`."""
        vocab = Vocab(tuple(str(k) for k in range(self.tree.num_classes)), self.counts, source={"planted": True})
        key = "planted-" + content_key(asdict(self.config))
        info = {"planted": asdict(self.config), "bayes_nll": dict(self.bayes_nll)}
        return FeatureDataset(vocab, dict(self.features), dict(self.labels), None, key, info)

    def log_prob(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``log p_true(y | h)`` of each sample under the oracle.

        Args:
            features: (N, d) features.
            labels: (N,) class ids in ``0..V-1``.

        Returns:
            (N,) float64 log-probabilities in nats.
        """
        h = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        V, d = self.tree.num_classes, self.config.dim
        if h.ndim != 2 or h.shape[1] != d:
            raise ValueError(f"features must have shape (N, {d}), got {h.shape}")
        if y.shape != (h.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be {h.shape[0]} integer class ids, got shape {y.shape} of {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= V):
            raise ValueError(f"labels must be class ids in 0..{V - 1}, got values in {y.min()}..{y.max()}")
        return _path_log_prob(self.tree, _padded(self.tree, self.weights, self.biases), h, y)


def _padded(tree: Tree, weights: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-node child parameters padded to the largest fanout: (I, K, d) and (I, K) (pads: -inf)."""
    fanout = int(tree.fanout.max())
    owner = np.repeat(np.arange(tree.num_internal), tree.fanout)
    position = np.arange(tree.child_ids.size) - tree.child_ptr[owner]
    w = np.zeros((tree.num_internal, fanout, weights.shape[1]))
    b = np.full((tree.num_internal, fanout), -np.inf)
    w[owner, position] = weights
    b[owner, position] = biases
    return w, b


def _child_log_softmax(params: tuple[np.ndarray, np.ndarray], nodes: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(n, K) log-probabilities of the children of ``nodes`` (n,) given features ``h`` (n, d)."""
    w, b = params
    scores = b[nodes].copy()  # (n, K)
    for c in range(w.shape[1]):  # one (n, d) gather per child slot: K is small
        scores[:, c] += np.einsum("nd,nd->n", w[nodes, c], h)
    top = scores.max(axis=1, keepdims=True)
    return scores - (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True)))


def _sample_labels(
    tree: Tree, params: tuple[np.ndarray, np.ndarray], h: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(N,) classes drawn top-down from the oracle, all samples at once, one depth level per step."""
    V = tree.num_classes
    labels = np.empty(h.shape[0], dtype=np.int64)
    active = np.arange(h.shape[0])
    node = np.zeros(h.shape[0], dtype=np.int64)
    while active.size:
        probs = np.exp(_child_log_softmax(params, node, h[active]))  # (n, K), pads 0
        choice = (np.cumsum(probs, axis=1) < rng.random(active.size)[:, None]).sum(axis=1)
        choice = np.minimum(choice, tree.fanout[node] - 1)  # rounding at the top of the cumsum
        child = tree.child_ids[tree.child_ptr[node] + choice]
        leaf = child < V
        labels[active[leaf]] = child[leaf]
        active, node = active[~leaf], child[~leaf] - V
    return labels


def _path_log_prob(tree: Tree, params: tuple[np.ndarray, np.ndarray], h: np.ndarray, y: np.ndarray) -> np.ndarray:
    nodes, codes, lengths = tree.paths()
    total = np.zeros(y.size)
    for level in range(tree.max_depth):
        rows = np.flatnonzero(lengths[y] > level)
        at = nodes[y[rows], level].astype(np.int64)
        log_p = _child_log_softmax(params, at, h[rows])
        total[rows] += log_p[np.arange(rows.size), codes[y[rows], level]]
    return total


def _softmax_slots(logits: list[np.ndarray], b: np.ndarray) -> list[np.ndarray]:
    """Per child slot c, (n, S) ``softmax_c(logits + b)``; ``logits`` is K arrays (n, S), ``b`` is (K, n)."""
    scores = [logits[c] + b[c][:, None] for c in range(len(logits))]
    top = np.maximum.reduce(scores)
    exps = [np.exp(x - top) for x in scores]
    total = np.add.reduce(exps)
    return [e / total for e in exps]


def _calibrated_biases(
    tree: Tree,
    weights: np.ndarray,
    log_ratio: np.ndarray,
    rng: np.random.Generator,
    samples: int = 512,
    max_steps: int = 30,
    tolerance: float = 1e-2,
    chunk: int = 2048,
) -> np.ndarray:
    """(I+V-1,) biases under which each node passes on ``exp(log_ratio)`` of what reaches it.

    Noisy logits flatten a softmax on average, so biases equal to the log target ratios
    would give much flatter class frequencies than the prior. Instead, on ``samples``
    shared draws of ``h ~ N(0, I)``, nodes are calibrated top-down, level by level: each
    draw is weighted by the probability that it reaches the node (the product of the
    already calibrated softmaxes above), and a fixed-point iteration
    ``b += log(target) - log(weighted mean softmax)`` runs until no log-ratio is off by
    more than ``tolerance``. On those draws the marginal of every class is then exactly
    the prior; on fresh data it is close, up to the Monte Carlo error of ``samples``.
    All nodes of a level are done together, ``chunk`` at a time, with one (n, S) array
    per child slot so that reductions over the few children are elementwise.
    """
    w, target = _padded(tree, weights, log_ratio)  # (I, K, d), (I, K); pads: target -inf
    fanout, V = w.shape[1], tree.num_classes
    h = rng.standard_normal((w.shape[2], samples))  # (d, S)
    biases = target.copy()
    depth = tree.node_depth
    levels = [np.flatnonzero(depth == k) for k in range(int(depth.max()) + 1)]
    slot = np.empty(tree.num_internal, dtype=np.int64)  # position of a node within its level
    reach = np.full((1, samples), 1.0 / samples)  # per node of the level: normalized weights of the draws
    for k, nodes in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else np.empty(0, dtype=np.int64)
        slot[below] = np.arange(below.size)
        reach_below = np.empty((below.size, samples))
        for start in range(0, nodes.size, chunk):
            part, weight = nodes[start : start + chunk], reach[start : start + chunk]
            logits = [w[part, c] @ h for c in range(fanout)]  # K x (n, S)
            valid = np.isfinite(target[part]).T  # (K, n)
            goal = np.where(valid, target[part].T, 0.0)
            b = biases[part].T.copy()  # (K, n)
            active = np.arange(part.size)  # nodes not yet within tolerance
            for _ in range(max_steps):
                probs = _softmax_slots([x[active] for x in logits], b[:, active])
                mean = np.stack([(p * weight[active]).sum(axis=1) for p in probs])  # (K, active)
                ok = valid[:, active]
                error = np.where(ok, goal[:, active] - np.log(np.where(ok, np.maximum(mean, 1e-300), 1.0)), 0.0)
                b[:, active] += np.clip(error, -30.0, 30.0)
                active = active[np.abs(error).max(axis=0) >= tolerance]
                if not active.size:
                    break
            biases[part] = b.T
            probs = _softmax_slots(logits, b)
            for c in range(fanout):
                rows = np.flatnonzero(valid[c])
                child = tree.child_ids[tree.child_ptr[part[rows]] + c]
                inner = child >= V
                passed = weight[rows[inner]] * probs[c][rows[inner]]
                total = passed.sum(axis=1, keepdims=True)
                passed = np.where(total > 0, passed / np.where(total > 0, total, 1.0), 1.0 / samples)
                reach_below[slot[child[inner] - V]] = passed
        reach = reach_below
    return biases[np.isfinite(target)]  # row-major: entry order, as tree.child_ids


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def make_planted(config: PlantedConfig | None = None, **fields: Any) -> PlantedData:
    """Generate a planted-hierarchy task (see the module docstring for the model).

    Args:
        config: the task; default `PlantedConfig()`.
        **fields: `PlantedConfig` fields that override ``config``'s, e.g.
            ``make_planted(num_classes=200, num_train=5000, seed=3)``.

    Returns:
        The oracle tree, its parameters, and the train/valid/test splits with their
        training counts and Bayes losses.

    Raises:
        DataError: for invalid config values (naming the field).
        TypeError: for a keyword that is not a `PlantedConfig` field.
    """
    config = PlantedConfig(**fields) if config is None else replace(config, **fields)
    V, d = config.num_classes, config.dim
    rng = np.random.default_rng(config.seed)
    split_rngs = dict(zip(SPLITS, rng.spawn(len(SPLITS)), strict=True))

    # The oracle tree over prior ranks, and its parameters (one row per child entry).
    tree = balanced(V, config.fanout, order=rng.permutation(V))
    prior = (np.arange(V) + 1.0) ** -config.zipf
    prior /= prior.sum()
    node_mass = tree.subtree_sums(prior)
    entries = tree.child_ids
    child_mass = np.where(entries < V, prior[np.minimum(entries, V - 1)], node_mass[np.maximum(entries - V, 0)])
    owner = np.repeat(np.arange(tree.num_internal), tree.fanout)
    weights = rng.standard_normal((entries.size, d)) * (config.signal / math.sqrt(d))
    biases = _calibrated_biases(tree, weights, np.log(child_mass / node_mass[owner]), rng)
    params = _padded(tree, weights, biases)

    features, labels = {}, {}
    for split, size in config.split_sizes.items():
        features[split] = split_rngs[split].standard_normal((size, d)).astype(np.float32)
        labels[split] = _sample_labels(tree, params, features[split].astype(np.float64), split_rngs[split])

    # Renumber classes by descending training count, ties by prior rank (a Vocab's order).
    train_counts = np.bincount(labels["train"], minlength=V)
    by_count = np.lexsort((np.arange(V), -train_counts))
    new_id = np.empty(V, dtype=np.int64)
    new_id[by_count] = np.arange(V)
    renumbered = np.where(entries < V, new_id[np.minimum(entries, V - 1)], entries)
    tree = Tree.from_csr(V, tree.child_ptr, renumbered)  # same entries: weights and biases still line up
    labels = {split: new_id[y].astype(np.int32) for split, y in labels.items()}
    bayes_nll = {
        split: float(-_path_log_prob(tree, params, features[split].astype(np.float64), labels[split]).mean())
        for split in SPLITS
    }
    return PlantedData(
        config=config,
        tree=tree,
        counts=_frozen(train_counts[by_count].astype(np.int64)),
        features={split: _frozen(x) for split, x in features.items()},
        labels={split: _frozen(y) for split, y in labels.items()},
        bayes_nll=bayes_nll,
        weights=_frozen(weights),
        biases=_frozen(biases),
    )
