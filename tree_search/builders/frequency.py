"""Trees from class frequencies: Huffman trees, frequency cutoffs (the adaptive-softmax shape), choosing cutoffs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tree_search.builders.common import as_counts, check_arity
from tree_search.builders.structure import tree_from_merge_arrays
from tree_search.tree import Tree

__all__ = ["cutoffs_by_mass", "frequency_cutoffs", "grave_cutoffs", "huffman", "projected_cutoffs"]


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
    weights = as_counts(counts)
    arity = check_arity(arity)
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
    return tree_from_merge_arrays(V, members, ptr)


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
    weights = as_counts(counts)
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


def grave_cutoffs(
    counts: Sequence[float] | np.ndarray, dim: int, clusters: int, div_value: float = 4.0, candidates: int = 400
) -> list[int]:
    """Grave et al. (2017)'s dynamic program: the cutoffs of ``clusters`` tail clusters of least expected cost.

    "Efficient softmax approximation for GPUs" chooses the adaptive softmax's cutoffs for a
    given number of clusters by dynamic programming over the frequency-ranked classes, to
    minimise the cost of a forward pass (theirs: a GPU time model; here the multiply-adds
    per token the reward charges, `reward.reward.head_cost`): the head costs ``dim * (head +
    clusters)`` for every token; tail cluster i (projected to ``d_i = dim // div_value**(i+1)``)
    costs its mass times ``d_i * (dim + size_i)``; a cluster holds at least 2 classes (one
    class would be a leaf of the root). Cluster boundaries are chosen among ``candidates``
    log-spaced ranks; exact over them, O(clusters * candidates^2).

    Example:
        >>> grave_cutoffs(np.arange(1000, 0, -1) ** 2.0, dim=64, clusters=2)  # doctest: +SKIP
        [12, 98]
    """
    weights = as_counts(counts)
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


def cutoffs_by_mass(counts: Sequence[float] | np.ndarray, masses: Sequence[float] = (0.9, 0.99)) -> list[int]:
    """Cutoffs for `frequency_cutoffs` where the classes ranked so far first reach ``masses``.

    With the default ``(0.9, 0.99)``, the head holds the most frequent classes that
    together cover 90% of the counts, the first tail cluster the next ones up to 99%,
    and the last cluster the rest. Duplicate or out-of-range cutoffs are dropped.
    """
    weights = as_counts(counts)
    if any(not 0 < m < 1 for m in masses) or list(masses) != sorted(masses):
        raise ValueError(f"masses must be increasing fractions in (0, 1), got {list(masses)}")
    if weights.sum() <= 0:
        raise ValueError("counts must not all be zero")
    cumulative = np.cumsum(np.sort(weights)[::-1]) / weights.sum()
    ranks = np.searchsorted(cumulative, np.asarray(masses) - 1e-12) + 1
    return sorted({int(r) for r in ranks if 1 <= r <= weights.size - 1})
