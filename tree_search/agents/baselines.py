"""The classic trees every search is compared with, evaluated with exactly the same head training."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from tree_search.agents.base import Searcher
from tree_search.builders import balanced, cluster_tree, cutoffs_by_mass, frequency_cutoffs, huffman, random_tree
from tree_search.data.features import FeatureDataset
from tree_search.envs.reward import class_embeddings
from tree_search.heads.evaluator import Evaluation, Evaluator
from tree_search.tree import Tree

__all__ = ["BASELINE_SETS", "BaselineSearcher", "classic_baselines"]

Baseline = tuple[Tree, dict[int, int]]  # a tree and its head's per-node projections

BASELINE_SETS = {
    "core": ("huffman-2", "huffman-4", "balanced-2", "adaptive", "kmeans-4", "kmeans-16"),
    "all": (
        "huffman-2",
        "huffman-4",
        "huffman-16",
        "balanced-2",
        "balanced-16",
        "cutoffs",
        "adaptive",
        "pca-2",
        "kmeans-2",
        "kmeans-4",
        "kmeans-16",
        "two-level",
        "random",
    ),
}


def _adaptive(counts: np.ndarray, dim: int) -> Baseline:
    """PyTorch's usual adaptive softmax: cutoffs at V/25 and V/5, ``div_value`` 4."""
    V = counts.size
    cuts = sorted({c for c in (V // 25, V // 5) if 1 <= c <= V - 1})
    tree = frequency_cutoffs(counts, cuts)
    bounds, projections, node = [*cuts, V], {}, 1
    for i in range(len(cuts)):
        if bounds[i + 1] - bounds[i] > 1:
            projections[node] = max(1, int(dim // 4 ** (i + 1)))
            node += 1
    return tree, projections


def classic_baselines(
    dataset: FeatureDataset, names: tuple[str, ...] = BASELINE_SETS["all"], seed: int = 0
) -> dict[str, Baseline]:
    """``{name: (tree, projections)}`` for the named classic trees of ``dataset``.

    Names: ``huffman-k`` and ``balanced-k`` (descending-count order) for any k; ``cutoffs``
    (frequency cutoffs at 90% and 99% of the mass, full-dimension clusters); ``adaptive``
    (cutoffs V/25 and V/5 with projections dim/4 and dim/16: ``AdaptiveLogSoftmaxWithLoss``
    with ``div_value=4``); ``pca-k`` and ``kmeans-k`` (recursive splits of the class
    embeddings, `cluster_tree`); ``two-level`` (about sqrt(V) k-means clusters under the
    root, each a flat node); ``random`` (random binary merges).
    """
    counts = np.asarray(dataset.counts, dtype=np.float64)
    counts = counts if counts.sum() > 0 else np.ones(dataset.num_classes)
    V = counts.size
    by_count = np.lexsort((np.arange(V), -counts))
    out: dict[str, Baseline] = {}
    for name in names:
        kind, _, arg = name.partition("-")
        if kind == "huffman":
            out[name] = (huffman(counts, int(arg)), {})
        elif kind == "balanced":
            out[name] = (balanced(V, int(arg), order=by_count), {})
        elif name == "cutoffs":
            out[name] = (frequency_cutoffs(counts, cutoffs_by_mass(counts)), {})
        elif name == "adaptive":
            out[name] = _adaptive(counts, dataset.dim)
        elif kind in ("pca", "kmeans"):
            out[name] = (cluster_tree(class_embeddings(dataset), counts, int(arg), method=kind, seed=seed), {})
        elif name == "two-level":
            clusters = max(2, round(math.sqrt(V)))
            leaf = math.ceil(V / clusters)
            out[name] = (cluster_tree(class_embeddings(dataset), counts, clusters, leaf_size=leaf, seed=seed), {})
        elif name == "random":
            out[name] = (random_tree(V, seed), {})
        else:
            raise ValueError(
                f"unknown baseline {name!r}; known: {', '.join(BASELINE_SETS['all'])} (or huffman-k, balanced-k)"
            )
    return out


class BaselineSearcher(Searcher):
    """Evaluates the classic trees (not counted against a searcher's budget)."""

    name = "baseline"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        names: tuple[str, ...] = BASELINE_SETS["core"],
        seed: int = 0,
    ) -> None:
        """Args: evaluator: where trees are evaluated; dataset: whose counts and embeddings build them."""
        super().__init__(None, evaluator, seed=seed)  # builds trees directly, no environment
        self.dataset, self.names = dataset, names

    def search(self) -> Iterator[Evaluation]:
        """Evaluate each baseline once (known ones come from the run being resumed)."""
        for name, (tree, projections) in classic_baselines(self.dataset, self.names, self.seed).items():
            yield self.evaluator.evaluate(tree, projections, searcher=f"baseline:{name}", counted=False)
