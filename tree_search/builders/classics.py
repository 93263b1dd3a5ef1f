"""The one registry of classic trees every search is compared with, and the grammar of their names."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tree_search.builders.cluster import cluster_tree
from tree_search.builders.common import class_weights
from tree_search.builders.frequency import cutoffs_by_mass, frequency_cutoffs, grave_cutoffs, huffman, projected_cutoffs
from tree_search.builders.structure import balanced, from_children, random_tree
from tree_search.tree import Tree

__all__ = [
    "ADAPTIVE_SHAPES",
    "CUTOFF_SHAPES",
    "CLASSIC_NAMES",
    "CLASSIC_SETS",
    "ClassicTree",
    "baseline_names",
    "HEAD_MASS",
    "classic_names",
    "classic_trees",
    "too_large",
]


@dataclass(frozen=True)
class ClassicTree:
    """A classic tree, the per-node projection sizes of its head, and how it was built."""

    name: str
    tree: Tree
    projections: dict[int, int] = field(default_factory=dict)  # internal node -> projected dim (adaptive shapes)
    builder: str = ""
    params: dict[str, Any] = field(default_factory=dict)


CLASSIC_SETS: dict[str, tuple[str, ...]] = {
    # what a run compares with by default: cheap and strong trees of several costs
    "core": ("huffman-2", "huffman-4", "balanced-2", "adaptive", "kmeans-4", "kmeans-16"),
    # one of each family
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
    ),  # fmt: skip
    # the classic Pareto front: every family at many costs
    "front": (
        "huffman-2",
        "huffman-3",
        "huffman-4",
        "huffman-6",
        "huffman-8",
        "huffman-12",
        "huffman-16",
        "huffman-32",
        "balanced-2",
        "balanced-16",
        "cutoffs-80",
        "cutoffs",
        "cutoffs-95",
        "adaptive-50",
        "adaptive",
        "adaptive-10",
        "grave-2",
        "grave-3",
        "grave-4",
        "pca-2",
        "pca-4",
        "pca-16",
        "kmeans-2",
        "kmeans-3",
        "kmeans-4",
        "kmeans-8",
        "kmeans-16",
        "kmeans-32",
        "headtail-kmeans-4",
        "headtail-kmeans-16",
        "headtail-pca-4",
        "two-level",
    ),  # fmt: skip
}
# PyTorch's `AdaptiveLogSoftmaxWithLoss` shapes (its usual cutoffs, and Grave et al.'s cost-optimal ones): the
# report compares the searched trees with them at equal time, and dp's grammar can build each of them
ADAPTIVE_SHAPES = ("adaptive", "adaptive-50", "adaptive-10", "grave-2", "grave-3", "grave-4")
# frequency cutoffs with unprojected tails: cheap to decode (a wide head prunes the tails), so dp's grammar has their
# root splits too
CUTOFF_SHAPES = ("cutoffs-80", "cutoffs", "cutoffs-95")
CLASSIC_NAMES = (
    "huffman-K, balanced-K, pca-K, kmeans-K (fanout K >= 2), cutoffs (head and first tail at 90% and 99% of "
    "the mass), cutoffs-P (head at P% of the mass), adaptive (PyTorch's cutoffs V/25, V/5 and div_value 4), "
    "adaptive-D (cutoffs V/D and 5V/D), grave-J (the J tail-cluster cutoffs of least cost, Grave et al. 2017's dynamic "
    "program; div_value 4), headtail-kmeans-K / headtail-pca-K (a frequency-ordered top level: the "
    "classes holding half the mass as leaves of the root, the rest clustered), two-level, random; "
    f"or a set: {', '.join(CLASSIC_SETS)}"
)


_CLASSIC_GRAMMAR = re.compile(
    r"(huffman|balanced|pca|kmeans)-([2-9]|[1-9]\d+)|cutoffs(-[1-9]\d?)?|adaptive(-([2-9]|[1-9]\d+))?"
    r"|headtail-(pca|kmeans)-([2-9]|[1-9]\d+)|grave-([1-9]\d*)|two-level|random"
)


def baseline_names(arities: Sequence[int] = (4, 16), clustered: bool = False) -> tuple[str, ...]:
    """The trees ``tree-search baseline`` builds by default, duplicates dropped.

    Huffman and balanced of fanout 2 and each arity, frequency cutoffs, and with class
    embeddings (``clustered``) PCA, k-means and the adaptive shape.

    Raises:
        ValueError: an arity that is not an integer of at least 2.
    """
    for arity in arities:
        if isinstance(arity, bool) or not isinstance(arity, (int, np.integer)) or arity < 2:
            raise ValueError(f"arity must be an integer >= 2, got {arity!r}")
    names = ["huffman-2", *(f"huffman-{k}" for k in arities), "balanced-2", *(f"balanced-{k}" for k in arities),
             "cutoffs", *(("pca-2", "kmeans-4", "kmeans-16", "adaptive") if clustered else ())]  # fmt: skip
    return tuple(dict.fromkeys(names))


# "two-level" splits all V classes into sqrt(V) clusters by one balanced k-means, whose (V, sqrt(V)) float64 costs
# take 8 GB at V = 1M (and its greedy assignment up to sqrt(V) rounds over them): past this size it is not built
TWO_LEVEL_MAX_CLASSES = 250_000


def too_large(name: str, num_classes: int) -> str | None:
    """Why the classic tree ``name`` is not built at ``num_classes`` classes (None: it is)."""
    if name == "two-level" and num_classes > TWO_LEVEL_MAX_CLASSES:
        clusters = max(2, round(math.sqrt(num_classes)))
        gigabytes = 8 * num_classes * clusters / 1e9
        return (f"two-level is not built above {TWO_LEVEL_MAX_CLASSES:,} classes: its balanced k-means over "
                f"{clusters:,} clusters would hold {gigabytes:.1f} GB of distances at {num_classes:,}")  # fmt: skip
    return None


def classic_names(names: Sequence[str] | str) -> tuple[str, ...]:
    """``names`` as a tuple of classic tree names: a set of `CLASSIC_SETS`, a comma-separated string or a list.

    Raises:
        ValueError: a name that is not a classic tree, quoting it and the known names.
    """
    if isinstance(names, str):
        names = CLASSIC_SETS.get(names) or [n.strip() for n in names.split(",") if n.strip()]
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not _CLASSIC_GRAMMAR.fullmatch(name):
            raise ValueError(f"unknown classic tree {name!r}; known: {CLASSIC_NAMES}")
    if not out:
        raise ValueError(f"no classic tree named; known: {CLASSIC_NAMES}")
    return out


def _projected_cutoffs(counts: np.ndarray, cuts: list[int], dim: int, div_value: float) -> tuple[Tree, dict[int, int]]:
    """`frequency_cutoffs` with tail cluster i projected to ``dim // div_value**(i+1)`` dimensions (PyTorch's rule)."""
    return projected_cutoffs(counts, cuts, [max(1, int(dim // div_value ** (i + 1))) for i in range(len(cuts))], dim)


def _adaptive(counts: np.ndarray, dim: int, divisor: int) -> tuple[Tree, dict[int, int], list[int]]:
    """The adaptive-softmax shape with cutoffs V/divisor and 5V/divisor, projections dim/4 and dim/16."""
    V = counts.size
    cuts = sorted({c for c in (V // divisor, 5 * V // divisor) if 1 <= c <= V - 1})
    return (*_projected_cutoffs(counts, cuts, dim, 4.0), cuts)


HEAD_MASS = 0.5  # a head-and-tail split keeps the most frequent classes up to this share of the mass as leaves


def _head_and_tail(counts: np.ndarray, embeddings: np.ndarray, fanout: int, method: str, seed: int) -> Tree:
    """A frequency-ordered top level: the classes holding `HEAD_MASS` of the mass as leaves of the root.

    The rest is clustered (`cluster_tree`, fanout ``fanout`` at every level) and its top-level
    clusters hang under the root. (The split grammar's head-and-tail rule differs: its head
    holds at most ``head_max`` classes, its tail has ``fanout - 1`` clusters, and each cluster
    inherits the head-and-tail rule unless planned otherwise.)
    """
    V = counts.size
    ranked = np.lexsort((np.arange(V), -counts))
    cumulative = np.cumsum(counts[ranked]) / max(counts.sum(), 1e-300)
    head_size = int(np.clip(np.searchsorted(cumulative, HEAD_MASS) + 1, 1, V - 2))
    head, tail = ranked[:head_size], np.sort(ranked[head_size:])
    sub = cluster_tree(embeddings[tail], counts[tail], fanout, method=method, seed=seed)
    T = tail.size  # unified ids: sub's leaves are tail[i]; its internal node j becomes V + j
    children = [[int(tail[c]) if c < T else V + c - T for c in kids] for kids in sub.children_lists()]
    children[0] = [*map(int, head), *children[0]]
    return from_children(V, children)


def classic_trees(
    counts: Sequence[float] | np.ndarray,
    names: Sequence[str] | str = "core",
    *,
    embeddings: np.ndarray | None = None,
    dim: int | None = None,
    seed: int = 0,
    cutoffs: Sequence[int] | None = None,
) -> dict[str, ClassicTree]:
    """The one registry of classic trees, by name (see `CLASSIC_NAMES` and `CLASSIC_SETS`).

    Args:
        counts: (V,) class counts (all zero: uniform).
        names: tree names, or the name of a set in `CLASSIC_SETS`.
        embeddings: (V, d) class embeddings, needed by the clustered trees.
        dim: the features' dimension, needed by the adaptive shapes (their projections).
        seed: seed of the clustered and random trees.
        cutoffs: explicit cutoffs for ``cutoffs`` (default: `cutoffs_by_mass`).

    Returns:
        ``{name: ClassicTree}`` in the order of ``names``.

    Raises:
        ValueError: an unknown name, or a tree whose inputs (embeddings, dim) are missing.
    """
    weights = class_weights(counts)
    V = weights.size
    names = classic_names(names)
    by_count = np.lexsort((np.arange(V), -weights))
    out: dict[str, ClassicTree] = {}

    def needs(what: str, value: Any, name: str) -> None:
        if value is None:
            raise ValueError(f"classic tree {name!r} needs the class {what}; none were given")

    for name in names:
        if (reason := too_large(name, V)) is not None:
            raise ValueError(reason)
        kind, _, arg = name.partition("-")
        family, _, sub_arg = arg.partition("-")
        number = int(arg) if arg.isdigit() else None
        if kind == "huffman":
            built = ClassicTree(name, huffman(weights, number), {}, "huffman", {"arity": number})
        elif kind == "balanced":
            tree = balanced(V, number, order=by_count)
            built = ClassicTree(name, tree, {}, "balanced", {"arity": number, "order": "descending count"})
        elif kind == "cutoffs":
            if arg:
                head = number / 100
                cuts = cutoffs_by_mass(weights, (head, 1 - (1 - head) / 10))
            else:
                cuts = list(cutoffs) if cutoffs is not None else cutoffs_by_mass(weights)
            built = ClassicTree(name, frequency_cutoffs(weights, cuts), {}, "frequency_cutoffs", {"cutoffs": cuts})
        elif kind == "grave":
            needs("features' dimension (dim)", dim, name)
            cuts = grave_cutoffs(weights, int(dim), number)
            tree, projections = _projected_cutoffs(weights, cuts, int(dim), 4.0)
            built = ClassicTree(name, tree, projections, "grave_cutoffs",
                                {"cutoffs": cuts, "div_value": 4, "clusters": number})  # fmt: skip
        elif kind == "adaptive":
            needs("features' dimension (dim)", dim, name)
            tree, projections, cuts = _adaptive(weights, int(dim), number or 25)
            built = ClassicTree(name, tree, projections, "frequency_cutoffs",
                                {"cutoffs": cuts, "div_value": 4})  # fmt: skip
        elif kind in ("pca", "kmeans"):
            needs("embeddings", embeddings, name)
            tree = cluster_tree(embeddings, weights, number, method=kind, seed=seed)
            built = ClassicTree(name, tree, {}, "cluster_tree", {"method": kind, "fanout": number})
        elif kind == "headtail":
            needs("embeddings", embeddings, name)
            tree = _head_and_tail(weights, np.asarray(embeddings), int(sub_arg), family, seed)
            built = ClassicTree(name, tree, {}, "head_and_tail",
                                {"head_mass": HEAD_MASS, "method": family, "fanout": int(sub_arg)})  # fmt: skip
        elif name == "two-level":
            needs("embeddings", embeddings, name)
            clusters = max(2, round(math.sqrt(V)))
            leaf = math.ceil(V / clusters)
            tree = cluster_tree(embeddings, weights, clusters, leaf_size=leaf, seed=seed)
            built = ClassicTree(name, tree, {}, "cluster_tree", {"method": "kmeans", "fanout": clusters,
                                                                 "leaf_size": leaf})  # fmt: skip
        else:  # "random", the only name left by the grammar
            built = ClassicTree(name, random_tree(V, seed), {}, "random_tree", {"seed": seed})
        out[name] = built
    return out
