"""Growing a tree: new classes ``V, V+1, ...`` attached without rebuilding it, and where to attach them.

`grow_tree` adds the classes (as siblings under internal nodes, or splitting class leaves),
keeping every old id; `nearest_classes` and `place_by_frequency` choose where. Growing a
trained head with the tree is `tree_search.hierarchy.grow`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tree_search.tree import Tree

__all__ = ["ATTACH_MODES", "checked_ids", "grow_tree", "nearest_classes", "place_by_frequency"]

ATTACH_MODES = ("sibling", "split")


def checked_ids(values: Sequence[int] | np.ndarray, name: str, low: int, high: int, what: str) -> np.ndarray:
    """``values`` as int64 ids in ``low..high - 1``; a ValueError names ``name`` and the first bad entry."""
    ids = np.asarray(values)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of integer ids, got {values!r}")
    bad = np.flatnonzero((ids < low) | (ids >= high))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {ids[bad[0]]} is not {what} (expected {low}..{high - 1})")
    return ids.astype(np.int64)


def grow_tree(tree: Tree, targets: Sequence[int] | np.ndarray, attach: str = "sibling") -> Tree:
    """The tree with K new classes ``V..V+K-1``: new class ``V+k`` attached at ``targets[k]``.

    Args:
        tree: the tree to grow.
        targets: (K,) internal nodes to add a child to (``"sibling"``), or classes whose leaf
            each new class splits (``"split"``: the class and every new class aimed at it
            become the children of one new internal node, appended after the old ones).
        attach: ``"sibling"`` or ``"split"``.

    Returns:
        The grown tree; old internal nodes keep their ids, old classes their ids and positions.

    Example:
        >>> from tree_search.builders import from_nested
        >>> grow_tree(from_nested([0, [1, 2]]), [1]).children_lists()  # class 3 joins node 1
        [[0, 5], [1, 2, 3]]
        >>> grow_tree(from_nested([0, [1, 2]]), [0], attach="split").children_lists()  # class 3 splits class 0
        [[6, 5], [1, 2], [0, 3]]
    """
    if attach not in ATTACH_MODES:
        raise ValueError(f"attach must be one of {ATTACH_MODES}, got {attach!r}")
    V, I = tree.num_classes, tree.num_internal  # noqa: E741 (I is the paper's name)
    if attach == "sibling":
        targets = checked_ids(targets, "targets", 0, I, "an internal node")
    else:
        targets = checked_ids(targets, "targets", 0, V, "a class")
    K = targets.size
    ids = tree.child_ids.copy()
    ids[ids >= V] += K  # internal node u is now V + K + u
    rows = [list(r) for r in np.split(ids, tree.child_ptr[1:-1])]
    if attach == "sibling":
        for k, node in enumerate(targets.tolist()):
            rows[node].append(V + k)
        return Tree(V + K, rows)
    anchors, first = np.unique(targets, return_index=True)
    anchors = anchors[np.argsort(first)]  # new nodes in order of first use
    for j, anchor in enumerate(anchors.tolist()):
        parent, position = int(tree.leaf_parent[anchor]), int(tree.leaf_child_index[anchor])
        rows[parent][position] = V + K + I + j
        rows.append([anchor, *(V + k for k in np.flatnonzero(targets == anchor).tolist())])
    return Tree(V + K, rows)


def nearest_classes(class_vectors: np.ndarray, new_vectors: np.ndarray) -> np.ndarray:
    """(K,) the existing class nearest by cosine to each new class's vector.

    Args:
        class_vectors: (V, e) one vector per existing class.
        new_vectors: (K, e) one per new class.

    Example:
        >>> nearest_classes(np.eye(3), np.array([[0.1, 0.9, 0.0]])).tolist()
        [1]
    """
    X = np.asarray(class_vectors, dtype=np.float64)
    Q = np.asarray(new_vectors, dtype=np.float64)
    if X.ndim != 2 or Q.ndim != 2 or X.shape[1] != Q.shape[1]:
        raise ValueError(f"class_vectors (V, e) and new_vectors (K, e) must share e; got {X.shape} and {Q.shape}")
    for name, M in (("class_vectors", X), ("new_vectors", Q)):
        norms = np.linalg.norm(M, axis=1)
        if np.any(~np.isfinite(norms) | (norms == 0)):
            raise ValueError(
                f"{name}[{int(np.flatnonzero(~np.isfinite(norms) | (norms == 0))[0])}] is zero or not finite"
            )
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    return np.argmax(Q @ X.T, axis=1)


def place_by_frequency(tree: Tree, counts: np.ndarray, new_counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """(K,) the internal node whose mean child mass ``mass(n) / fanout(n)`` is nearest (in log) to each new count.

    ``counts`` and ``new_counts`` are in the same units (e.g. training counts). Ties go to
    the shallower node, then the smaller id.

    Example:
        >>> from tree_search.builders import huffman
        >>> tree = huffman([64, 32, 16, 8, 4, 4])  # node u's children weigh about 64 / 2**(u+1)
        >>> place_by_frequency(tree, np.array([64, 32, 16, 8, 4, 4]), [30, 3]).tolist()
        [1, 4]
    """
    weights = np.asarray(counts, dtype=np.float64)
    wanted = np.asarray(new_counts, dtype=np.float64)
    if weights.shape != (tree.num_classes,) or np.any(~np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"counts must be {tree.num_classes} finite non-negative numbers, one per class")
    if wanted.ndim != 1 or wanted.size == 0 or np.any(~np.isfinite(wanted)) or np.any(wanted <= 0):
        raise ValueError(f"new_counts must be a non-empty 1-D sequence of positive numbers, got {new_counts!r}")
    child_mass = tree.subtree_sums(weights) / tree.fanout  # (I,)
    gap = np.abs(np.log(np.maximum(child_mass, 1e-300))[None, :] - np.log(wanted)[:, None])  # (K, I)
    order = np.lexsort((np.arange(tree.num_internal), tree.node_depth))  # shallow first, then by id
    return order[np.argmin(gap[:, order], axis=1)]
