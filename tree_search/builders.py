"""Pure functions that build a `Tree`: classic trees and trees from descriptions.

Every builder takes plain arrays and returns a validated `Tree`; none does I/O.

- `huffman`: binary or n-ary Huffman tree of class counts (optimal expected depth).
- `balanced`: complete, evenly split tree of fanout k over classes in a given order.
- `random_tree`: a seeded random tree.
- `frequency_cutoffs`: the adaptive-softmax shape (head of frequent classes + tail clusters).
- `cluster_tree`: recursive balanced k-means or PCA splits of class embeddings.
- `classic_trees`: the one registry of the classic trees every search is compared with.
- `from_merges`: bottom-up construction from a sequence of merges (word2vec's numbering).
- `from_nested`, `from_children`, `from_parents`: from hand-written descriptions.
- `from_taxonomy`, `from_categories`: from a parent relation or class categories, with node names.
"""

from __future__ import annotations

import heapq
import math
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tree_search.tree import Tree, TreeError

__all__ = [
    "ADAPTIVE_SHAPES",
    "CLASSIC_NAMES",
    "CLASSIC_SETS",
    "ClassicTree",
    "TaxonomyError",
    "UNKNOWN_MODES",
    "balanced",
    "binarized",
    "classic_names",
    "classic_trees",
    "cluster_tree",
    "cutoffs_by_mass",
    "frequency_cutoffs",
    "grave_cutoffs",
    "from_categories",
    "from_children",
    "from_merges",
    "from_nested",
    "from_parents",
    "from_taxonomy",
    "huffman",
    "order_group",
    "projected_cutoffs",
    "random_tree",
]


def _as_counts(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"counts must be a 1-D sequence, got shape {array.shape}")
    if array.size < 2:
        raise ValueError(f"a tree needs at least 2 classes, got {array.size} counts")
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        raise ValueError(f"counts must be finite and non-negative; class {bad[0]} has {array[bad[0]]}")
    return array


def _check_arity(arity: int, name: str = "arity") -> int:
    if isinstance(arity, bool) or not isinstance(arity, (int, np.integer)) or arity < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {arity!r}")
    return int(arity)


# ---------------------------------------------------------------------- bottom-up


def _tree_from_merge_arrays(num_classes: int, members: np.ndarray, ptr: np.ndarray) -> Tree:
    """Tree from merges given as CSR arrays in word2vec numbering (no validation of order).

    Merge ``m`` groups ``members[ptr[m]:ptr[m+1]]`` (unified bottom-up ids: classes
    ``0..V-1``, the node of merge ``m'`` is ``V + m'``) under a new node. The last
    merge is the root, so internal id = ``M - 1 - m`` gives parents before children.
    """
    V, M = num_classes, ptr.size - 1
    sizes = np.diff(ptr)
    # Reverse the merge order; keep each merge's members in their given order.
    new_sizes = sizes[::-1]
    new_ptr = np.zeros(M + 1, dtype=np.int64)
    np.cumsum(new_sizes, out=new_ptr[1:])
    source_start = np.repeat(ptr[:-1][::-1], new_sizes)
    offset = np.arange(new_ptr[-1]) - np.repeat(new_ptr[:-1], new_sizes)
    ids = members[source_start + offset].astype(np.int64, copy=True)
    is_node = ids >= V
    ids[is_node] = V + (M - 1 - (ids[is_node] - V))
    return Tree.from_csr(V, new_ptr, ids)


def from_merges(num_classes: int, merges: Sequence[Sequence[int]]) -> Tree:
    """Build a tree bottom-up from a sequence of merges (what the merge environment does).

    Numbering follows word2vec: classes are ``0..V-1`` and the node created by merge
    ``m`` is ``V + m``. Each merge lists two or more current roots (classes or earlier
    merges not yet merged); after the last merge exactly one root must remain.

    Args:
        num_classes: V.
        merges: the merges in order, each a sequence of node ids.

    Returns:
        The tree; the node of merge ``m`` gets internal id ``len(merges) - 1 - m``.

    Raises:
        TreeError: naming the merge, for an unknown or already merged node, a merge of
            fewer than two nodes, or more than one root left at the end.

    Example:
        >>> from_merges(3, [[1, 2], [0, 3]]).children_lists()
        [[0, 4], [1, 2]]
    """
    V = int(num_classes)
    if V < 2:
        raise TreeError(f"a tree needs at least 2 classes, got num_classes={V}")
    if len(merges) == 0:
        raise TreeError("no merges given: at least one is needed to join the classes")
    sizes = np.fromiter((len(m) for m in merges), dtype=np.int64, count=len(merges))
    small = np.flatnonzero(sizes < 2)
    if small.size:
        raise TreeError(f"merge {small[0]} joins {sizes[small[0]]} node(s); a merge needs at least 2")
    ptr = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=ptr[1:])
    flat = [x for m in merges for x in m]
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in flat):
        raise TreeError("merges must list integer node ids")
    try:
        members = np.asarray(flat, dtype=np.int64)
    except OverflowError as err:
        raise TreeError(f"merges must list node ids that fit in 64 bits: {err}") from None
    step = np.repeat(np.arange(sizes.size), sizes)
    bad = np.flatnonzero((members < 0) | (members >= V + step))
    if bad.size:
        k = int(bad[0])
        raise TreeError(
            f"merge {step[k]} refers to node {members[k]}, which does not exist yet "
            f"(classes are 0..{V - 1}; merge m creates node {V}+m)"
        )
    distinct, times = np.unique(members, return_counts=True)  # memory bounded by the merges, whatever V is
    if np.any(times > 1):
        node = int(distinct[times > 1][0])
        first, second = step[members == node][:2]
        raise TreeError(f"merge {second} uses node {node}, which merge {first} already merged")
    num_roots = V + sizes.size - distinct.size
    if num_roots != 1:
        shown = ""
        if V + sizes.size <= 10**8:  # name a few (a bitmap of every node is cheap at this size)
            unused = np.ones(V + sizes.size, dtype=bool)
            unused[distinct] = False
            roots = np.flatnonzero(unused)
            shown = " (" + ", ".join(map(str, roots[:10])) + (" ..." if roots.size > 10 else "") + ")"
        raise TreeError(
            f"after {sizes.size} merges, {num_roots} roots remain{shown}; the merges must join everything into one tree"
        )
    return _tree_from_merge_arrays(V, members, ptr)


def huffman(counts: Sequence[float] | np.ndarray, arity: int = 2) -> Tree:
    """Huffman tree of fanout ``arity``: the tree of minimum expected depth under ``counts``.

    n-ary trees are padded with zero-weight dummy leaves so that every merge takes
    exactly ``arity`` nodes (the classic construction that keeps n-ary Huffman optimal);
    the dummies all land in the first merge and are then dropped, so that node has
    fewer children. Ties are broken deterministically: by class id, and leaves before
    merged nodes of equal weight (which also minimises the variance of the depths).
    Runs in O(V log V): one sort, then the linear two-queue merge.

    Args:
        counts: (V,) non-negative class counts or frequencies.
        arity: the fanout, at least 2.

    Returns:
        The Huffman tree, built by `from_merges` (the same merge order a merge environment
        replaying the lowest-mass merges produces).
    """
    weights = _as_counts(counts)
    arity = _check_arity(arity)
    V = weights.size
    padding = (-(V - 1)) % (arity - 1)
    order = np.argsort(weights, kind="stable")
    leaf_weight = weights[order].tolist()
    leaf_id = order.tolist()
    num_merges = (V + padding - 1) // (arity - 1)
    merged_weight = [0.0] * num_merges
    members = np.empty(V + num_merges - 1, dtype=np.int64)
    ptr = np.zeros(num_merges + 1, dtype=np.int64)
    i = j = write = 0  # next leaf, next merged node, next free slot in members
    for m in range(num_merges):
        take = arity - padding if m == 0 else arity
        total = 0.0
        for _ in range(take):
            if i < V and (j >= m or leaf_weight[i] <= merged_weight[j]):
                total += leaf_weight[i]
                members[write] = leaf_id[i]
                i += 1
            else:
                total += merged_weight[j]
                members[write] = V + j
                j += 1
            write += 1
        merged_weight[m] = total
        ptr[m + 1] = write
    return _tree_from_merge_arrays(V, members, ptr)


# ---------------------------------------------------------------------- top-down


def _top_down(
    order: np.ndarray,
    parts_of: Callable[[np.ndarray], np.ndarray],
    reorder: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> Tree:
    """Build a tree top-down, one level at a time, every node owning a contiguous run of ``order``.

    Each node's run is cut into ``parts_of(sizes)`` parts of sizes differing by at most one
    (larger parts first); a part of one class is a leaf, a larger part a new internal node
    (ids assigned breadth-first, hence topological). ``reorder(order, starts, sizes)``, if
    given, may permute ``order`` in place within each run before it is cut.
    """
    V = order.size
    starts, sizes = np.array([0]), np.array([V])
    next_id = 1
    ptr_parts, id_parts = [np.array([0])], []
    offset = 0
    while starts.size:
        if reorder is not None:
            reorder(order, starts, sizes)
        parts = parts_of(sizes)
        owner = np.repeat(np.arange(starts.size), parts)
        j = np.arange(parts.sum()) - np.repeat(np.cumsum(parts) - parts, parts)
        base, extra = sizes // parts, sizes % parts
        part_size = base[owner] + (j < extra[owner])
        part_start = starts[owner] + j * base[owner] + np.minimum(j, extra[owner])
        is_leaf = part_size == 1
        ids = np.empty(part_size.size, dtype=np.int64)
        ids[is_leaf] = order[part_start[is_leaf]]
        num_new = int((~is_leaf).sum())
        ids[~is_leaf] = V + next_id + np.arange(num_new)
        next_id += num_new
        id_parts.append(ids)
        ptr_parts.append(offset + np.cumsum(parts))
        offset += int(parts.sum())
        starts, sizes = part_start[~is_leaf], part_size[~is_leaf]
    return Tree.from_csr(V, np.concatenate(ptr_parts), np.concatenate(id_parts))


def balanced(num_classes: int, arity: int = 2, order: Sequence[int] | np.ndarray | None = None) -> Tree:
    """Complete tree of fanout ``arity`` whose leaves read ``order`` from left to right.

    Each node splits its run of classes into ``arity`` parts of sizes differing by at
    most one (fewer parts when the run is shorter), so every class has depth
    ``floor`` or ``ceil`` of ``log_arity(V)``.

    Args:
        num_classes: V.
        arity: the fanout, at least 2.
        order: a permutation of ``0..V-1`` (default: class id order, which for a
            frequency-sorted vocabulary puts frequent classes first).
    """
    V = int(num_classes)
    if V < 2:
        raise ValueError(f"a tree needs at least 2 classes, got num_classes={V}")
    arity = _check_arity(arity)
    if order is None:
        sequence = np.arange(V, dtype=np.int64)
    else:
        sequence = np.asarray(order)
        if sequence.dtype.kind not in "iu":
            raise ValueError(f"order must be a permutation of 0..{V - 1} (integers), got dtype {sequence.dtype}")
        sequence = sequence.astype(np.int64)
        if sequence.shape != (V,) or not np.array_equal(np.sort(sequence), np.arange(V)):
            raise ValueError(f"order must be a permutation of 0..{V - 1}")
    return _top_down(sequence, lambda sizes: np.minimum(arity, sizes))


def frequency_cutoffs(counts: Sequence[float] | np.ndarray, cutoffs: Sequence[int]) -> Tree:
    """The adaptive-softmax shape: a root of frequent classes plus one node per tail cluster.

    Classes are ranked by descending count (ties by class id, so a frequency-sorted
    vocabulary keeps its ids, as `torch.nn.AdaptiveLogSoftmaxWithLoss` assumes). With
    ``cutoffs = [c1, ..., cn]`` the root holds the classes of rank ``0..c1-1`` as leaves
    and one child node per cluster ``[c1, c2), ..., [cn, V)`` whose children are that
    cluster's classes in rank order. A cluster of a single class is equivalent to a leaf
    at the root and is placed there. Empty ``cutoffs`` gives the flat tree (full softmax).

    Raises:
        ValueError: if cutoffs are not unique increasing integers in ``1..V-1`` (the rule
            PyTorch's ``cutoffs`` follow).
    """
    weights = _as_counts(counts)
    V = weights.size
    cuts = list(cutoffs)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cuts) or (
        cuts != sorted(set(cuts)) or (cuts and (cuts[0] <= 0 or cuts[-1] > V - 1))
    ):
        raise ValueError(
            "cutoffs should be a sequence of unique, positive integers sorted in an "
            f"increasing order, where each value is between 1 and num_classes-1={V - 1}; got {cuts}"
        )
    ranked = np.lexsort((np.arange(V), -weights))
    bounds = [*map(int, cuts), V]
    head = ranked[: bounds[0]].tolist()
    children: list[list[int]] = [head]
    root = children[0]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        cluster = ranked[start:end].tolist()
        if len(cluster) == 1:
            root.append(cluster[0])
        else:
            root.append(V + len(children))
            children.append(cluster)
    return Tree(V, children)


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


def projected_cutoffs(
    counts: np.ndarray, cuts: Sequence[int], sizes: Sequence[int], dim: int
) -> tuple[Tree, dict[int, int]]:
    """`frequency_cutoffs` with tail cluster i projected to ``sizes[i]`` dimensions (none when ``sizes[i] >= dim``).

    Returns the tree and its ``{node: projected size}``; a cluster of one class is a leaf of
    the root, not a node, and takes no projection.
    """
    counts = np.asarray(counts)
    if len(sizes) != len(cuts) or any(int(size) < 1 for size in sizes):
        raise ValueError(f"projected_cutoffs needs one size >= 1 per cutoff: cutoffs {list(cuts)}, sizes {list(sizes)}")
    tree = frequency_cutoffs(counts, list(cuts))
    bounds, projections, node = [*cuts, counts.size], {}, 1  # frequency_cutoffs numbers the clusters 1, 2, ...
    for i, size in enumerate(sizes):
        if bounds[i + 1] - bounds[i] > 1:
            if size < dim:
                projections[node] = int(size)
            node += 1
    return tree, projections


def _projected_cutoffs(counts: np.ndarray, cuts: list[int], dim: int, div_value: float) -> tuple[Tree, dict[int, int]]:
    """`frequency_cutoffs` with tail cluster i projected to ``dim // div_value**(i+1)`` dimensions (PyTorch's rule)."""
    return projected_cutoffs(counts, cuts, [max(1, int(dim // div_value ** (i + 1))) for i in range(len(cuts))], dim)


def _adaptive(counts: np.ndarray, dim: int, divisor: int) -> tuple[Tree, dict[int, int], list[int]]:
    """The adaptive-softmax shape with cutoffs V/divisor and 5V/divisor, projections dim/4 and dim/16."""
    V = counts.size
    cuts = sorted({c for c in (V // divisor, 5 * V // divisor) if 1 <= c <= V - 1})
    return (*_projected_cutoffs(counts, cuts, dim, 4.0), cuts)


def grave_cutoffs(
    counts: Sequence[float] | np.ndarray, dim: int, clusters: int, div_value: float = 4.0, candidates: int = 400
) -> list[int]:
    """Grave et al. (2017)'s dynamic program: the cutoffs of ``clusters`` tail clusters of least expected cost.

    "Efficient softmax approximation for GPUs" chooses the adaptive softmax's cutoffs for a
    given number of clusters by dynamic programming over the frequency-ranked classes, to
    minimise the cost of a forward pass (theirs: a GPU time model; here the multiply-adds
    per token the reward charges, `heads.reward.head_cost`): the head costs ``dim * (head +
    clusters)`` for every token; tail cluster i (projected to ``d_i = dim // div_value**(i+1)``)
    costs its mass times ``d_i * (dim + size_i)``; a cluster holds at least 2 classes (one
    class would be a leaf of the root). Cluster boundaries are chosen among ``candidates``
    log-spaced ranks; exact over them, O(clusters * candidates^2).

    Example:
        >>> grave_cutoffs(np.arange(1000, 0, -1) ** 2.0, dim=64, clusters=2)  # doctest: +SKIP
        [12, 98]
    """
    weights = _as_counts(counts)
    V = weights.size
    if not 1 <= clusters <= V - 1:
        raise ValueError(f"clusters must be in 1..{V - 1} (V - 1), got {clusters}")
    ranked = np.sort(weights)[::-1]
    mass = np.concatenate([[0.0], np.cumsum(ranked)]) / max(ranked.sum(), 1e-300)  # mass[r]: the r most frequent
    grid = np.unique(np.round(np.geomspace(1, V - 1, candidates)).astype(np.int64))
    grid = np.concatenate([grid, [V]])  # the last cluster ends at V
    G = grid.size
    best = dim * (grid[:-1].astype(np.float64) + clusters)  # (G-1,) a head of grid[a] classes
    back = []
    for i in range(1, clusters + 1):
        d = max(1, int(dim // div_value**i))
        start, end = grid[:-1, None], grid[None, :]  # a cluster [grid[a], grid[b])
        cost = (mass[end] - mass[start]) * d * (dim + (end - start))
        total = np.where(end - start >= 2, best[:, None] + cost, np.inf)  # (G-1, G); a cluster has 2+ classes
        if i < clusters:
            total = total[:, :-1]  # a middle cluster cannot end at V
        back.append(total.argmin(0))
        best = total.min(0)
    b = G - 1 if clusters else 0
    cuts = []
    for i in reversed(range(clusters)):
        a = int(back[i][b])
        cuts.append(int(grid[a]))
        b = a
    cuts = sorted(cuts)
    if len(set(cuts)) != len(cuts) or not np.isfinite(best[-1]):
        raise ValueError(f"no {clusters} distinct clusters fit among {G} candidate ranks; use fewer clusters")
    return cuts


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
    weights = _as_counts(counts)
    weights = weights if weights.sum() > 0 else np.ones(weights.size)
    V = weights.size
    names = classic_names(names)
    by_count = np.lexsort((np.arange(V), -weights))
    out: dict[str, ClassicTree] = {}

    def needs(what: str, value: Any, name: str) -> None:
        if value is None:
            raise ValueError(f"classic tree {name!r} needs the class {what}; none were given")

    for name in names:
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


def cutoffs_by_mass(counts: Sequence[float] | np.ndarray, masses: Sequence[float] = (0.9, 0.99)) -> list[int]:
    """Cutoffs for `frequency_cutoffs` where the classes ranked so far first reach ``masses``.

    With the default ``(0.9, 0.99)``, the head holds the most frequent classes that
    together cover 90% of the counts, the first tail cluster the next ones up to 99%,
    and the last cluster the rest. Duplicate or out-of-range cutoffs are dropped.
    """
    weights = _as_counts(counts)
    if any(not 0 < m < 1 for m in masses) or list(masses) != sorted(masses):
        raise ValueError(f"masses must be increasing fractions in (0, 1), got {list(masses)}")
    if weights.sum() <= 0:
        raise ValueError("counts must not all be zero")
    cumulative = np.cumsum(np.sort(weights)[::-1]) / weights.sum()
    ranks = np.searchsorted(cumulative, np.asarray(masses) - 1e-12) + 1
    return sorted({int(r) for r in ranks if 1 <= r <= weights.size - 1})


def random_tree(num_classes: int, seed: int | np.random.Generator = 0, max_arity: int = 2) -> Tree:
    """A random tree: repeatedly merge 2..``max_arity`` random current roots.

    Args:
        num_classes: V.
        seed: an integer seed or a numpy ``Generator``; the same seed gives the same tree.
        max_arity: the largest fanout; each merge draws its size uniformly in
            ``2..min(max_arity, roots left)``.
    """
    V = int(num_classes)
    if V < 2:
        raise ValueError(f"a tree needs at least 2 classes, got num_classes={V}")
    max_arity = _check_arity(max_arity, "max_arity")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    roots = list(range(V))
    merges: list[list[int]] = []
    while len(roots) > 1:
        size = int(rng.integers(2, min(max_arity, len(roots)) + 1))
        picked = []
        for _ in range(size):
            k = int(rng.integers(len(roots)))
            roots[k], roots[-1] = roots[-1], roots[k]
            picked.append(roots.pop())
        roots.append(V + len(merges))
        merges.append(picked)
    return from_merges(V, merges)


# ---------------------------------------------------------------------- descriptions


def from_children(num_classes: int, children: Sequence[Sequence[int]], renumber: bool = True) -> Tree:
    """Tree from children lists in unified ids, with internal nodes in any order.

    Args:
        num_classes: V.
        children: children lists as for `Tree`, but node 0 need only be the root, and
            internal ids need not be topological when ``renumber`` is set.
        renumber: renumber internal nodes breadth-first from node 0 (sibling order kept).
    """
    if not renumber:
        return Tree(num_classes, children)
    V, num_internal = int(num_classes), len(children)
    if num_internal == 0:
        raise TreeError("a tree needs at least one internal node (the root)")
    for u, row in enumerate(children):  # checked in the caller's numbering, before renumbering
        if len(row) < 2:
            raise TreeError(f"internal node {u} has {len(row)} child(ren); every internal node needs at least 2")
        for c in row:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < V + num_internal:
                raise TreeError(f"internal node {u} lists child {c!r}, not a node id in 0..{V + num_internal - 1}")
    new_id = {0: 0}
    queue, ordered = deque([0]), []
    while queue:
        u = queue.popleft()
        ordered.append(u)
        for c in children[u]:
            if isinstance(c, (int, np.integer)) and V <= c < V + num_internal:
                w = int(c) - V
                if w in new_id:
                    raise TreeError(
                        f"internal node {w} is reached twice (again as a child of {u}): "
                        "a cycle, or a node with two parents"
                    )
                new_id[w] = len(new_id)
                queue.append(w)
    if len(ordered) < num_internal:
        lost = sorted(set(range(num_internal)) - set(ordered))
        raise TreeError(f"internal node {lost[0]} is unreachable from the root (node 0)")
    relabeled = [
        [V + new_id[int(c) - V] if isinstance(c, (int, np.integer)) and c >= V else c for c in children[u]]
        for u in ordered
    ]
    return Tree(V, relabeled)


def from_parents(parent: Sequence[int] | np.ndarray, num_classes: int) -> Tree:
    """Tree from a parent array in unified ids (the fastText layout).

    ``parent[y]`` for ``y < V`` is the parent of class ``y``; ``parent[V + u]`` is the
    parent of internal node ``u``; the root's parent is ``-1``. Parents are unified ids
    of internal nodes (``>= V``). Siblings are ordered by unified id. Internal nodes
    are renumbered breadth-first from the root.

    Raises:
        TreeError: naming the node, for a class used as a parent, a parent out of range,
            no root or several roots, a cycle, or a node with fewer than two children.
    """
    V = int(num_classes)
    try:
        par = np.asarray(parent, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise TreeError(f"parent must be an array of integers: {err}") from None
    if par.ndim != 1 or par.size <= V:
        raise TreeError(f"parent must list {V} classes and at least one internal node, got {par.size} entries")
    n = par.size
    out_of_range = np.flatnonzero((par < -1) | (par >= n))
    if out_of_range.size:
        x = int(out_of_range[0])
        raise TreeError(f"node {x} has parent {par[x]}, outside -1..{n - 1}")
    leaf_parent = np.flatnonzero((par >= 0) & (par < V))
    if leaf_parent.size:
        x = int(leaf_parent[0])
        raise TreeError(f"node {x} has class {par[x]} as its parent: a class (leaf) cannot be a parent")
    roots = np.flatnonzero(par == -1)
    if roots.size != 1:
        raise TreeError(f"a tree has exactly one root (parent -1), found {roots.size}: {roots[:10].tolist()}")
    root = int(roots[0])
    if root < V:
        raise TreeError(f"class {root} has parent -1, but the root must be an internal node")
    fanout = np.bincount(par[par >= 0], minlength=n)[V:]
    if np.any(fanout < 2):
        x = V + int(np.argmax(fanout < 2))
        raise TreeError(f"node {x} has {fanout[x - V]} child(ren); every internal node needs at least 2")
    order = np.argsort(par, kind="stable")
    order = order[par[order] >= 0]
    counts = np.bincount(par[order], minlength=n)[V:]
    ptr = np.zeros(n - V + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    children = [order[ptr[u] : ptr[u + 1]].tolist() for u in range(n - V)]
    # Move the root to position 0 so that from_children can renumber from it.
    r = root - V
    if r != 0:
        swap = {V: V + r, V + r: V}
        children = [[swap.get(c, c) for c in cs] for cs in children]
        children[0], children[r] = children[r], children[0]
    return from_children(V, children, renumber=True)


def from_nested(nested: Sequence[Any]) -> Tree:
    """Tree from a nested-list description: ints are classes, lists are internal nodes.

    Example:
        >>> from_nested([0, [1, 2]]).children_lists()
        [[0, 4], [1, 2]]

    Raises:
        TreeError: naming the position (e.g. ``root[1][0]``) of a node with fewer than
            two children or an item that is neither a class id nor a list; or naming the
            class that is missing or repeated.
    """
    if isinstance(nested, (str, bytes)) or not isinstance(nested, Sequence):
        raise TreeError(f"root: expected a list of children, got {type(nested).__name__}")
    lists: list[Sequence[Any]] = [nested]
    names = ["root"]
    children: list[list[Any]] = []
    leaves: list[int] = []
    k = 0
    while k < len(lists):  # breadth-first, so ids come out topological
        node, name = lists[k], names[k]
        if len(node) < 2:
            raise TreeError(f"{name}: a node with {len(node)} child(ren); every internal node needs at least 2")
        row: list[Any] = []
        for i, item in enumerate(node):
            if isinstance(item, bool) or not isinstance(item, (int, np.integer, list, tuple)):
                raise TreeError(f"{name}[{i}]: expected a class id or a list, got {item!r}")
            if isinstance(item, (list, tuple)):
                row.append(("node", len(lists)))
                lists.append(item)
                names.append(f"{name}[{i}]")
            else:
                if item < 0:
                    raise TreeError(f"{name}[{i}]: class ids are non-negative, got {item}")
                row.append(int(item))
                leaves.append(int(item))
        children.append(row)
        k += 1
    V = len(leaves)
    if max(leaves) >= V:
        raise TreeError(f"class {max(leaves)} is out of range: with {V} leaves the classes are 0..{V - 1}")
    counts = np.bincount(np.asarray(leaves, dtype=np.int64), minlength=V)
    if counts.size > V or np.any(counts != 1):
        missing = np.flatnonzero(counts[:V] == 0)
        twice = np.flatnonzero(counts > 1)
        if twice.size:
            raise TreeError(f"class {twice[0]} appears {counts[twice[0]]} times")
        raise TreeError(f"with {V} leaves the classes must be 0..{V - 1}, but class {missing[0]} is missing")
    resolved = [[V + c[1] if isinstance(c, tuple) else c for c in row] for row in children]
    return Tree(V, resolved)


# ---------------------------------------------------------------------- clustering


def _part_capacities(sizes: np.ndarray, parts: int) -> np.ndarray:
    """(G, parts) sizes of the parts a group is cut into, as in `balanced`: larger parts first."""
    base, extra = sizes // parts, sizes % parts
    return base[:, None] + (np.arange(parts)[None, :] < extra[:, None])


def _pca_scores(points: np.ndarray, weights: np.ndarray, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """(G, M) projection of each point on its group's top weighted principal direction.

    ``points`` (G, M, d) are the groups padded with zero rows of zero weight. The
    direction comes from ``iterations`` power iterations of the weighted covariance,
    started from a random vector, all groups at once with batched matrix products.
    """
    total = weights.sum(axis=1, keepdims=True)  # (G, 1), > 0
    mean = np.matmul(weights[:, None, :], points)[:, 0, :] / total  # (G, d)
    centered = points - mean[:, None, :]  # (G, M, d)
    direction = rng.standard_normal(mean.shape)  # (G, d)
    for _ in range(iterations):
        projection = np.matmul(centered, direction[:, :, None])[:, :, 0]  # (G, M)
        direction = np.matmul((weights * projection)[:, None, :], centered)[:, 0, :]  # (G, d) = C v
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        direction /= np.where(norm > 0, norm, 1.0)
    return np.matmul(centered, direction[:, :, None])[:, :, 0]


def _kmeans_plus_plus(
    points: np.ndarray, weights: np.ndarray, sizes: np.ndarray, parts: int, rng: np.random.Generator
) -> np.ndarray:
    """(G, parts, d) initial centres per group by weighted k-means++ (D² sampling)."""
    G, M, _ = points.shape
    rows = np.arange(G)
    valid = np.arange(M)[None, :] < sizes[:, None]
    pick = np.minimum((rng.random(G) * sizes).astype(np.int64), sizes - 1)
    centres = np.empty((G, parts, points.shape[2]))
    centres[:, 0] = points[rows, pick]
    norms = (points**2).sum(axis=2)  # (G, M)

    def squared_distance(centre: np.ndarray) -> np.ndarray:  # (G, d) -> (G, M)
        dot = np.matmul(points, centre[:, :, None])[:, :, 0]
        return np.maximum(norms - 2.0 * dot + (centre**2).sum(axis=1)[:, None], 0.0)

    nearest = squared_distance(centres[:, 0])  # (G, M) squared distance to the closest centre
    for c in range(1, parts):
        mass = np.where(valid, nearest * weights, 0.0)
        cumulative = np.cumsum(mass, axis=1)
        total = cumulative[:, -1]
        target = rng.random(G) * total
        pick = np.minimum((cumulative <= target[:, None]).sum(axis=1), sizes - 1)
        # All mass on existing centres (duplicates, zero weights): any member will do.
        uniform = np.minimum((rng.random(G) * sizes).astype(np.int64), sizes - 1)
        pick = np.where(total > 0, pick, uniform)
        centres[:, c] = points[rows, pick]
        np.minimum(nearest, squared_distance(centres[:, c]), out=nearest)
    return centres


def _balanced_assignment(cost: np.ndarray, valid: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """(G, M) cluster of each point so that cluster c of group g gets exactly ``capacity[g, c]``.

    Capacity-constrained greedy in rounds, all groups at once: every unassigned point
    proposes to its cheapest cluster that still has room; each cluster accepts, up to
    its room, the proposers with the largest *regret* (cost of their second choice minus
    cost of the first), so points with a clear preference are placed first. A round
    either places every proposer of a group or fills at least one of its clusters, so
    there are at most ``parts`` rounds. With two clusters this is the optimal balanced
    split: sort by cost difference and cut. Pads (``~valid``) get label ``parts``.
    """
    G, M, parts = cost.shape
    if parts == 2:  # the same result in one sort per group
        preference = np.where(valid, cost[:, :, 0] - cost[:, :, 1], np.inf)
        rank = np.empty((G, M), dtype=np.int64)
        np.put_along_axis(rank, np.argsort(preference, axis=1, kind="stable"), np.arange(M)[None, :], axis=1)
        return np.where(valid, (rank >= capacity[:, :1]).astype(np.int64), parts)
    labels = np.full((G, M), parts, dtype=np.int64)
    room = capacity.astype(np.int64).ravel()  # (G * parts,)
    group, member = np.nonzero(valid)
    costs = cost[group, member]  # (P, parts)
    while group.size:
        is_open = room.reshape(G, parts)[group] > 0
        masked = np.where(is_open, costs, np.inf)
        best = masked.argmin(axis=1)
        if parts > 1:
            first_two = np.partition(masked, 1, axis=1)
            regret = first_two[:, 0] - first_two[:, 1]  # <= 0; -inf when one cluster is left
        else:
            regret = np.zeros(group.size)
        key = group * parts + best
        order = np.lexsort((regret, key))  # stable: ties keep (group, member) order
        sorted_key = key[order]
        rank = np.arange(order.size) - np.searchsorted(sorted_key, sorted_key, side="left")
        accepted = order[rank < room[sorted_key]]
        labels[group[accepted], member[accepted]] = best[accepted]
        room -= np.bincount(key[accepted], minlength=room.size)
        rejected = np.ones(group.size, dtype=bool)
        rejected[accepted] = False
        group, member, costs = group[rejected], member[rejected], costs[rejected]
    return labels


def _balanced_kmeans_labels(
    points: np.ndarray,
    weights: np.ndarray,
    sizes: np.ndarray,
    parts: int,
    rng: np.random.Generator,
    iterations: int,
) -> np.ndarray:
    """(G, M) balanced k-means cluster of each point of each padded group (pads: ``parts``)."""
    M = points.shape[1]
    valid = np.arange(M)[None, :] < sizes[:, None]
    capacity = _part_capacities(sizes, parts)
    centres = _kmeans_plus_plus(points, weights, sizes, parts, rng)
    labels = None
    for _ in range(iterations):
        # Squared distance up to the per-point constant |x|², which no assignment depends on.
        cost = (centres**2).sum(axis=2)[:, None, :] - 2.0 * np.matmul(points, centres.transpose(0, 2, 1))
        new_labels = _balanced_assignment(cost, valid, capacity)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        member_of = labels[:, :, None] == np.arange(parts)[None, None, :]  # (G, M, parts)
        weighted = member_of * weights[:, :, None]
        mass = weighted.sum(axis=1)  # (G, parts)
        sums = np.matmul(weighted.transpose(0, 2, 1), points)  # (G, parts, d)
        if np.any(mass <= 0):  # clusters of zero-count classes: use their plain mean
            plain = member_of.astype(np.float64)
            light = mass <= 0
            sums[light] = np.matmul(plain.transpose(0, 2, 1), points)[light]
            mass[light] = plain.sum(axis=1)[light]
        centres = sums / mass[:, :, None]
    return labels


def cluster_tree(
    embeddings: np.ndarray,
    counts: Sequence[float] | np.ndarray | None = None,
    fanout: int = 2,
    method: str = "kmeans",
    leaf_size: int | None = None,
    seed: int = 0,
    iterations: int = 10,
) -> Tree:
    """Tree by recursive top-down clustering of class embeddings.

    In the spirit of Mnih & Hinton's learned trees and PECOS's hierarchical k-means:
    the root holds every class; a group larger than ``max(fanout, leaf_size)`` is split
    into ``fanout`` clusters of sizes differing by at most one (larger clusters first),
    each of which becomes a child (a single class becomes a leaf directly); a smaller
    group becomes a flat node whose children are all its classes. All groups of one
    level are split together with batched numpy operations: since every split is
    balanced, the groups of a level differ in size by at most one, so they are padded
    into one (groups, size, d) array at almost no waste.

    Methods:
        ``"kmeans"``: balanced k-means. Centres start by weighted k-means++ (D²
        sampling); each Lloyd iteration assigns points by a capacity-constrained greedy
        (every unassigned point proposes to its nearest centre with room left; a centre
        takes the proposers that would lose most by going to their second choice; at
        most ``fanout`` rounds, and for ``fanout=2`` exactly the optimal cut of points
        sorted by their distance difference), then moves each centre to the
        count-weighted mean of its members. Stops early when assignments repeat.
        ``"pca"``: sort the group by its projection on the top principal direction of
        the count-weighted covariance (``iterations`` power iterations) and cut the
        sorted order into ``fanout`` equal-count parts.

    Embeddings are first scaled by their largest absolute value and centred, which
    changes neither method's clusters but keeps huge values from overflowing.

    Args:
        embeddings: (V, d) finite class embeddings; row ``y`` is class ``y``.
        counts: optional (V,) non-negative class counts that weight centres and
            covariances (uniform if None; a group or cluster whose classes all have
            count zero uses the plain mean).
        fanout: the number of clusters each group is split into, at least 2.
        method: ``"kmeans"`` or ``"pca"``.
        leaf_size: groups of at most ``max(fanout, leaf_size)`` classes become flat
            nodes (default ``fanout``); at least 1.
        seed: seed of the ``np.random.default_rng`` that draws k-means++ centres and
            power-iteration starts; the same seed gives the same tree.
        iterations: Lloyd iterations (``"kmeans"``) or power iterations (``"pca"``) per
            split, at least 1.

    Returns:
        The tree; children are listed cluster by cluster, internal nodes numbered level
        by level (breadth-first), as `balanced` does.

    Raises:
        ValueError: for embeddings that are not a 2-D finite array of at least 2 rows,
            counts of the wrong shape or negative or non-finite, a fanout below 2, an
            unknown method, or a leaf_size or iterations below 1.

    Example:
        >>> tree = cluster_tree(np.array([[0.0], [0.1], [5.0], [5.1]]), fanout=2)
        >>> sorted(tree.children_lists()[1:])  # the two close pairs
        [[0, 1], [2, 3]]
    """
    try:
        X = np.asarray(embeddings, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"embeddings must be a 2-D array of numbers: {err}") from None
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (V, d) with V >= 2 classes and d >= 1, got {X.shape}")
    if not np.all(np.isfinite(X)):
        row = int(np.flatnonzero(~np.all(np.isfinite(X), axis=1))[0])
        raise ValueError(f"embeddings must be finite; the row of class {row} is not")
    V = X.shape[0]
    if counts is None:
        weights = np.ones(V)
    else:
        shape = np.shape(counts)
        if shape != (V,):
            raise ValueError(f"counts must have shape ({V},) to match the {V} embeddings, got {shape}")
        weights = _as_counts(counts)
    fanout = _check_arity(fanout, "fanout")
    if method not in ("kmeans", "pca"):
        raise ValueError(f"method must be 'kmeans' or 'pca', got {method!r}")
    for name, value in (("leaf_size", 1 if leaf_size is None else leaf_size), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    flat_limit = max(fanout, leaf_size or fanout)
    rng = np.random.default_rng(seed)
    scale = np.abs(X).max()
    if scale > 0:
        X = X / scale
    X = X - X.mean(axis=0)  # never in place: X may still be the caller's array

    def reorder(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> None:
        split = sizes > flat_limit
        if split.any():
            _reorder_by_clusters(X, weights, order, starts[split], sizes[split], fanout, method, rng, iterations)

    # A group larger than flat_limit splits into `fanout` parts; a flat node into one part per class.
    return _top_down(np.arange(V, dtype=np.int64), lambda sizes: np.where(sizes > flat_limit, fanout, sizes), reorder)


def _reorder_by_clusters(
    X: np.ndarray,
    weights: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    parts: int,
    method: str,
    rng: np.random.Generator,
    iterations: int,
) -> None:
    """Reorder each run ``order[start:start+size]`` in place so its clusters are consecutive.

    Cluster ``c`` of a run takes exactly the positions `balanced` gives part ``c``.
    """
    M = int(sizes.max())
    valid = np.arange(M)[None, :] < sizes[:, None]  # (G, M), G = starts.size
    position = starts[:, None] + np.minimum(np.arange(M)[None, :], sizes[:, None] - 1)
    members = order[position]  # (G, M); pads repeat the last member
    points = np.where(valid[:, :, None], X[members], 0.0)  # (G, M, d)
    group_weights = np.where(valid, weights[members], 0.0)
    weightless = group_weights.sum(axis=1) <= 0
    group_weights[weightless] = valid[weightless]
    if method == "pca":
        key = np.where(valid, _pca_scores(points, group_weights, rng, iterations), np.inf)
    else:
        key = _balanced_kmeans_labels(points, group_weights, sizes, parts, rng, iterations)
    local = np.argsort(key, axis=1, kind="stable")  # pads sort last in both cases
    order[position[valid]] = np.take_along_axis(members, local, axis=1)[valid]


def order_group(
    points: np.ndarray,
    weights: np.ndarray,
    method: str,
    parts: int = 2,
    rng: np.random.Generator | None = None,
    iterations: int = 10,
) -> np.ndarray:
    """Order one group's members so that similar embeddings are adjacent (one step of `cluster_tree`).

    Args:
        points: (M, d) embeddings of the group's members (already scaled and centred, as
            `cluster_tree` does, for comparable results).
        weights: (M,) non-negative weights (counts); all zero means uniform.
        method: ``"pca"``: ascending projection on the weighted top principal direction;
            ``"kmeans"``: members of balanced k-means cluster 0 first, then cluster 1, ...
            (``parts`` clusters whose sizes differ by at most one, larger first).
        parts: clusters for ``"kmeans"``.
        rng: draws k-means++ centres and the power-iteration start (default seed 0).
        iterations: Lloyd or power iterations.

    Returns:
        (M,) a permutation of ``0..M-1``.
    """
    if method not in ("kmeans", "pca"):
        raise ValueError(f"method must be 'kmeans' or 'pca', got {method!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    X = np.asarray(points, dtype=np.float64)[None]  # (1, M, d)
    w = np.asarray(weights, dtype=np.float64)[None]
    if w.sum() <= 0:
        w = np.ones_like(w)
    M = X.shape[1]
    if method == "pca":
        key = _pca_scores(X, w, rng, iterations)[0]
    else:
        key = _balanced_kmeans_labels(X, w, np.array([M]), min(parts, M), rng, iterations)[0]
    return np.argsort(key, kind="stable")


def binarized(tree: Tree, counts: Sequence[float] | np.ndarray | None = None) -> Tree:
    """The binary tree that replaces every node of more than two children by a Huffman tree over them.

    Each wide node's children are merged two at a time, the two lightest first (by the
    subtree mass of ``counts``; by class count without them), so frequent children keep
    short paths. Classes keep their ids and their order of groups; a binary tree comes back
    unchanged. A model trained on the result is a different model (more, smaller decisions).
    """
    V = tree.num_classes
    weights = np.ones(V) if counts is None else np.asarray(counts, dtype=np.float64)
    if weights.shape != (V,):
        raise ValueError(f"counts must have {V} entries, one per class; got shape {weights.shape}")
    if np.all(tree.fanout == 2):
        return tree
    mass = tree.subtree_sums(weights)
    rows = tree.children_lists()
    children: list[list[int]] = [list(row) for row in rows]
    for u, row in enumerate(rows):
        if len(row) <= 2:
            continue
        heap = [(float(weights[c] if c < V else mass[c - V]), order, c) for order, c in enumerate(row)]
        heapq.heapify(heap)
        counter = len(row)
        while len(heap) > 2:
            (m1, _, a), (m2, _, b) = heapq.heappop(heap), heapq.heappop(heap)
            children.append([a, b])
            heapq.heappush(heap, (m1 + m2, counter, V + len(children) - 1))
            counter += 1
        children[u] = [heap[0][2], heap[1][2]] if heap[0][1] < heap[1][1] else [heap[1][2], heap[0][2]]
    return from_children(V, children, renumber=True)


# ---------------------------------------------------------------------- taxonomies and categories

UNKNOWN_MODES = ("error", "catch-all", "frequency")


class TaxonomyError(TreeError):
    """A parent relation that does not describe one tree over the vocabulary.

    ``entry`` is the index of the offending ``(child, parent)`` pair (None when the problem
    is not one pair's), so a file reader can name the line.
    """

    def __init__(self, message: str, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class _Named:
    """A node under construction: a name (or None) and children (class ids or `_Named`)."""

    __slots__ = ("name", "kids")

    def __init__(self, name: str | None, kids: list[int | _Named]) -> None:
        self.name, self.kids = name, kids


def _taxonomy_pairs(parents: Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    items = list(parents.items()) if isinstance(parents, Mapping) else list(parents)
    for k, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not all(isinstance(x, str) and x for x in item):
            raise TaxonomyError(f"entry {k}: expected a (child, parent) pair of non-empty strings, got {item!r}", k)
    return [(str(c), str(p)) for c, p in items]


def _graft_huffman(items: list[int | _Named], weights: np.ndarray, arity: int, name: str | None) -> int | _Named:
    """The items joined by the ``arity``-ary Huffman tree of their weights; its root gets ``name``."""
    if len(items) == 1:
        return items[0]
    sub = huffman(weights, arity)
    m = len(items)
    nodes = [_Named(None, []) for _ in range(sub.num_internal)]
    for u, row in enumerate(sub.children_lists()):
        nodes[u].kids = [items[c] if c < m else nodes[c - m] for c in row]
    nodes[0].name = name
    return nodes[0]


def _mass(item: int | _Named, weights: np.ndarray) -> float:
    total, stack = 0.0, [item]
    while stack:
        x = stack.pop()
        if isinstance(x, _Named):
            stack.extend(x.kids)
        else:
            total += float(weights[x])
    return total


def _flatten_named(num_classes: int, root: _Named) -> tuple[Tree, tuple[str | None, ...]]:
    """Number ``root``'s nodes breadth-first (parents before children) into a `Tree` and its node names."""
    order, k = [root], 0
    while k < len(order):
        order.extend(x for x in order[k].kids if isinstance(x, _Named))
        k += 1
    index = {id(node): u for u, node in enumerate(order)}
    children = [[num_classes + index[id(x)] if isinstance(x, _Named) else int(x) for x in n.kids] for n in order]
    return Tree(num_classes, children), tuple(n.name for n in order)


def from_taxonomy(
    parents: Mapping[str, str] | Sequence[tuple[str, str]],
    labels: Sequence[str],
    counts: Sequence[float] | np.ndarray | None = None,
    *,
    unknown: str = "catch-all",
    extra: str = "error",
    arity: int = 2,
    catch_all: str = "<other>",
) -> tuple[Tree, tuple[str | None, ...]]:
    """The tree of a parent relation (a taxonomy) over a vocabulary, and the names of its internal nodes.

    Every name that is someone's parent is a *category* (an internal node, named after it);
    every other child is a *class* and must be one of ``labels`` (class ``y`` is
    ``labels[y]``). Exactly one category has no parent: the root (several roots are an
    error naming them, so a misspelt parent is caught; add ``"A<TAB>root"`` lines to join
    them). Children keep the order of their pairs. Two rules make it a valid `Tree`:

    - a category with no class below it is dropped; a category with a single child is
      collapsed into that child: a single class moves up, a single category keeps its node
      under the joined name ``"parent/child"`` (so ``Literal -> Number -> {1, 2}`` with no
      other child of ``Literal`` gives one node ``"Literal/Number"``);
    - vocabulary classes absent from the taxonomy follow ``unknown``: ``"error"``;
      ``"catch-all"`` (default) puts them in one node ``catch_all`` under the root (inside
      it, the ``arity``-ary Huffman tree of their counts); ``"frequency"`` places them by
      frequency: the root's own children and the unknown classes (by mass) are merged by
      one ``arity``-ary Huffman tree, so a frequent unknown class sits near the root and
      rare ones deep, and the taxonomy's top categories keep their subtrees as they are.
      Nodes created by Huffman merges are unnamed (None).

    Args:
        parents: ``{child: parent}``, or ``(child, parent)`` pairs (then errors name the pair).
        labels: (V,) the class tokens, all distinct.
        counts: (V,) class counts (for ``unknown`` placement; uniform if None).
        unknown: ``"catch-all"``, ``"frequency"`` or ``"error"`` (see above).
        extra: a taxonomy class that is not in ``labels``: ``"error"``, or ``"ignore"`` (dropped).
        arity: fanout of the Huffman merges.
        catch_all: the catch-all node's name.

    Returns:
        ``(tree, node_names)``: ``node_names[u]`` names internal node ``u`` (None: a merge node).

    Raises:
        TaxonomyError: with ``entry`` the pair at fault where there is one: a child given twice,
            a cycle, several roots (or none), a class missing from ``labels``, a label that is
            a category, vocabulary classes absent with ``unknown="error"``.

    Example:
        >>> parents = {"if": "Keyword", "for": "Keyword", "x": "Name", "Keyword": "Token", "Name": "Token"}
        >>> tree, names = from_taxonomy(parents, ["if", "for", "x", "y"])  # "Name" has one class: collapsed
        >>> tree.children_lists(), names  # "y" is unknown: the catch-all of one class is that class
        ([[5, 2, 3], [0, 1]], ('Token', 'Keyword'))
    """
    if unknown not in UNKNOWN_MODES:
        raise ValueError(f"unknown must be one of {UNKNOWN_MODES}, got {unknown!r}")
    if extra not in ("error", "ignore"):
        raise ValueError(f"extra must be 'error' or 'ignore', got {extra!r}")
    arity = _check_arity(arity)
    pairs = _taxonomy_pairs(parents)
    V = len(labels)
    weights = np.ones(V) if counts is None else _as_counts(counts)
    if weights.size != V:
        raise ValueError(f"counts has {weights.size} entries but there are {V} labels")
    label_id: dict[str, int] = {}
    for y, token in enumerate(labels):
        if token in label_id:
            raise TaxonomyError(f"label {token!r} is given twice in the vocabulary (classes {label_id[token]} and {y})")
        label_id[token] = y
    parent_of: dict[str, str] = {}
    entry_of: dict[str, int] = {}
    kids_of: dict[str, list[str]] = {}
    for k, (child, parent) in enumerate(pairs):
        if child in parent_of:
            raise TaxonomyError(f"{child!r} is given twice: with parent {parent_of[child]!r} and with {parent!r}", k)
        if child == parent:
            raise TaxonomyError(f"{child!r} is its own parent (a cycle)", k)
        parent_of[child], entry_of[child] = parent, k
        kids_of.setdefault(parent, []).append(child)
    # cycles: follow parents from every name; a walk that meets itself is a cycle
    state: dict[str, int] = {}  # 1: on the current walk, 2: reaches a root
    for start in parent_of:
        walk, name = [], start
        while name in parent_of and state.get(name) is None:
            state[name] = 1
            walk.append(name)
            name = parent_of[name]
        if state.get(name) == 1:
            cycle = walk[walk.index(name) :] + [name]
            raise TaxonomyError("the parents form a cycle: " + " -> ".join(map(repr, cycle)), entry_of[cycle[0]])
        for visited in walk:
            state[visited] = 2
    roots = [p for p in kids_of if p not in parent_of]
    if len(roots) != 1:
        shown = ", ".join(repr(r) for r in roots[:10])
        second = min(entry_of[kids_of[r][0]] for r in roots[1:]) if len(roots) > 1 else None
        raise TaxonomyError(
            f"a taxonomy has exactly one root (a category without a parent), found {len(roots)}: {shown}; "
            "join them under one root with lines such as 'A<TAB>root'",
            second,
        )
    for category in kids_of:
        if category in label_id:
            raise TaxonomyError(
                f"{category!r} is a class of the vocabulary and also a category (it has children); rename the category",
                entry_of.get(kids_of[category][0]),
            )
    known = np.zeros(V, dtype=bool)
    for name, k in entry_of.items():
        if name in kids_of:
            continue
        y = label_id.get(name)
        if y is None:
            if extra == "error":
                raise TaxonomyError(
                    f"class {name!r} is not in the vocabulary ({V} labels); remove it or pass extra='ignore'", k
                )
            continue
        known[y] = True
    # post-order over the categories: each becomes a node, a class, or nothing
    built: dict[str, int | _Named | None] = {}
    stack: list[tuple[str, bool]] = [(roots[0], False)]
    while stack:
        name, ready = stack.pop()
        if not ready:
            stack.append((name, True))
            stack.extend((c, False) for c in kids_of[name] if c in kids_of)
            continue
        items: list[int | _Named] = []
        for c in kids_of[name]:
            item = built.pop(c) if c in kids_of else label_id.get(c)
            if item is not None:
                items.append(item)
        if not items:
            built[name] = None
        elif len(items) == 1:
            only = items[0]
            if isinstance(only, _Named):
                only.name = f"{name}/{only.name}" if only.name is not None else name
            built[name] = only
        else:
            built[name] = _Named(name, items)
    top = built[roots[0]]
    missing = np.flatnonzero(~known)
    if missing.size and unknown == "error":
        shown = ", ".join(repr(labels[y]) for y in missing[:5]) + (" ..." if missing.size > 5 else "")
        raise TaxonomyError(
            f"{missing.size} vocabulary class(es) are not in the taxonomy ({shown}); "
            "use unknown='catch-all' or 'frequency' to place them"
        )
    root_name = roots[0]
    if isinstance(top, _Named):
        root_name, root_kids = top.name, list(top.kids)
    else:
        root_kids = [] if top is None else [top]
    if missing.size and unknown == "catch-all":
        root_kids.append(_graft_huffman(missing.tolist(), weights[missing], arity, catch_all))
    elif missing.size:  # "frequency": one Huffman merge of the root's children and the unknown classes
        items = root_kids + missing.tolist()
        mass = np.array([_mass(x, weights) for x in items])
        merged = _graft_huffman(items, mass, arity, root_name)
        root_kids = list(merged.kids) if isinstance(merged, _Named) else [merged]
    if len(root_kids) == 1 and isinstance(root_kids[0], _Named):  # the root's one child is the tree
        only = root_kids[0]
        root_name, root_kids = (f"{root_name}/{only.name}" if only.name else root_name), list(only.kids)
    if len(root_kids) < 2:
        raise TaxonomyError(f"the taxonomy places fewer than 2 of the {V} classes; a tree needs at least 2")
    return _flatten_named(V, _Named(root_name, root_kids))


def from_categories(
    categories: Sequence[str | None] | Mapping[str, str],
    counts: Sequence[float] | np.ndarray,
    *,
    labels: Sequence[str] | None = None,
    fanout: int = 2,
    group_fanout: int = 2,
) -> tuple[Tree, tuple[str | None, ...]]:
    """Classes grouped by category, the groups merged by a Huffman tree of their masses.

    Inside each category the classes form the ``fanout``-ary Huffman tree of their counts,
    whose root is named after the category (a category of one class is just that class).
    The groups (and classes without a category, as groups of one) are then merged by the
    ``group_fanout``-ary Huffman tree of the groups' total counts, so frequent categories
    get short paths; those merge nodes are unnamed (None), except the root ("<root>").

    Args:
        categories: (V,) the category of each class (None: none), or ``{label: category}``
            with ``labels`` (labels not in it have none).
        counts: (V,) class counts.
        labels: (V,) class tokens, needed when ``categories`` is a mapping.
        fanout: fanout inside a category.
        group_fanout: fanout of the merges of groups.

    Returns:
        ``(tree, node_names)`` as `from_taxonomy`.

    Example:
        >>> tree, names = from_categories(["kw", "kw", "op", "op", None], [50, 30, 10, 5, 5])
        >>> sorted(n for n in names if n)
        ['<root>', 'kw', 'op']
    """
    weights = _as_counts(counts)
    V = weights.size
    if isinstance(categories, Mapping):
        if labels is None or len(labels) != V:
            raise ValueError(f"categories given as a mapping need labels: {V} strings, one per class")
        unknown_keys = set(categories) - set(labels)
        if unknown_keys:
            raise TaxonomyError(f"category given for {sorted(unknown_keys)[0]!r}, which is not one of the labels")
        per_class = [categories.get(t) for t in labels]
    else:
        per_class = list(categories)
    if len(per_class) != V:
        raise ValueError(f"categories has {len(per_class)} entries but counts has {V}")
    bad = next((y for y, c in enumerate(per_class) if c is not None and not (isinstance(c, str) and c)), None)
    if bad is not None:
        raise TaxonomyError(f"class {bad}: the category must be a non-empty string or None, got {per_class[bad]!r}")
    fanout, group_fanout = _check_arity(fanout, "fanout"), _check_arity(group_fanout, "group_fanout")
    members: dict[str, list[int]] = {}
    items: list[int | _Named] = []
    for y, c in enumerate(per_class):
        if c is None:
            items.append(y)
        else:
            members.setdefault(c, []).append(y)
    for c, ys in members.items():
        items.append(_graft_huffman(ys, weights[ys], fanout, c))
    mass = np.array([_mass(x, weights) for x in items])
    top = _graft_huffman(items, mass, group_fanout, None)
    if not isinstance(top, _Named):
        raise TaxonomyError("fewer than 2 classes")
    if top.name is None:
        top.name = "<root>"
    return _flatten_named(V, top)
