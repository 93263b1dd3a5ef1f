"""Helpers every builder shares: class counts as weights, fanout checks, and top-down splitting."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from tree_search.tree import Tree

__all__ = ["as_counts", "check_arity", "top_down"]


def as_counts(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """``counts`` as a (V,) float64 array of finite non-negative weights; a clear error otherwise."""
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"counts must be a 1-D sequence, got shape {array.shape}")
    if array.size < 2:
        raise ValueError(f"a tree needs at least 2 classes, got {array.size} counts")
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        raise ValueError(f"counts must be finite and non-negative; class {bad[0]} has {array[bad[0]]}")
    return array


def class_weights(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """``counts`` as (V,) float64 weights for building and costing trees; all ones when none is positive.

    The one fallback for unknown counts (features from an .npz without counts, planted data).
    """
    weights = as_counts(counts)
    return weights if weights.sum() > 0 else np.ones(weights.size)


def check_arity(arity: int, name: str = "arity") -> int:
    """``arity`` as an int, checked to be an integer of at least 2."""
    if isinstance(arity, bool) or not isinstance(arity, (int, np.integer)) or arity < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {arity!r}")
    return int(arity)


def top_down(
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
