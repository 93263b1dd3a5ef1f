"""The `Tree` value: an immutable, validated rooted tree over the classes ``0..V-1``.

Node ids
--------
Leaves are the class ids ``0..V-1``. Internal nodes have their own ids ``0..I-1`` in
topological order: the root is ``0`` and every parent comes before its children.

Where leaves and internal nodes appear in one list (the children of a node, a parent
array), they share one *unified* id space, the one word2vec and fastText use: ids below
``V`` are classes, and ``V + u`` is internal node ``u``.

Everything derived from the structure (paths, depths, fanouts, subtree sizes, the
canonical hash) is computed with vectorized numpy and cached; building and validating
a tree of a million classes takes well under a second. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property

import numpy as np

__all__ = ["Tree", "TreeError"]


class TreeError(ValueError):
    """A tree description breaks a structural rule; the message names the node."""


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _ancestor_sums(parent: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each node and all its ancestors (pointer doubling).

    ``parent[u] < 0`` marks the root. Runs in O(n log depth) numpy work, so a chain
    of a million nodes costs twenty passes instead of a million Python steps.
    """
    total = values.astype(np.int64, copy=True)
    ancestor = parent.astype(np.int64, copy=True)
    while True:
        active = ancestor >= 0
        if not active.any():
            return total
        up = ancestor[active]
        new_total = total.copy()
        new_total[active] += total[up]
        new_ancestor = ancestor.copy()
        new_ancestor[active] = ancestor[up]
        total, ancestor = new_total, new_ancestor


class Tree:
    """An immutable rooted tree whose leaves are the classes ``0..V-1``.

    Args:
        num_classes: V, the number of classes (leaves); at least 2.
        children: for each internal node ``u`` in ``0..I-1``, the list of its children
            in order, as unified ids (``y < V`` is class ``y``, ``V + w`` is internal
            node ``w``). Internal ids must be topological: every child internal node has
            a larger id than its parent, so node ``0`` is the root.

    Raises:
        TreeError: naming the offending node, for a node with fewer than two children, a
            class that is missing or appears twice, an internal node with no parent or two
            parents, the root used as a child, ids out of range, or ids that are not in
            topological order (cycles show up here).

    Example:
        >>> tree = Tree(3, [[0, 4], [1, 2]])  # root -> (class 0, node 1 -> (1, 2))
        >>> tree.depth.tolist()
        [1, 2, 2]
        >>> tree.paths()[0].tolist()  # internal nodes along each class's path, -1 padded
        [[0, -1], [0, 1], [0, 1]]
    """

    __slots__ = ("_num_classes", "_child_ptr", "_child_ids", "__dict__")

    def __init__(self, num_classes: int, children: Sequence[Sequence[int]]) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise TreeError(f"num_classes must be an integer, got {num_classes!r}")
        num_classes = int(num_classes)
        if num_classes < 2:
            raise TreeError(f"a tree needs at least 2 classes, got num_classes={num_classes}")
        if len(children) == 0:
            raise TreeError("a tree needs at least one internal node (the root)")
        lengths = np.fromiter((len(c) for c in children), dtype=np.int64, count=len(children))
        flat = [c for node in children for c in node]
        try:
            child_ids = np.asarray(flat, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as err:
            raise TreeError(f"children must be lists of integer node ids: {err}") from None
        if child_ids.ndim != 1 or (child_ids.size and not np.array_equal(child_ids, flat)):
            raise TreeError("children must be lists of integer node ids")
        ptr = np.zeros(len(children) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        self._init_csr(num_classes, ptr, child_ids)

    @classmethod
    def from_csr(cls, num_classes: int, child_ptr: np.ndarray, child_ids: np.ndarray) -> Tree:
        """Build from compressed children lists (what builders produce; no Python lists).

        Args:
            num_classes: V.
            child_ptr: (I+1,) offsets; the children of node ``u`` are
                ``child_ids[child_ptr[u]:child_ptr[u + 1]]``.
            child_ids: (I+V-1,) unified child ids.
        """
        tree = cls.__new__(cls)
        ptr = np.asarray(child_ptr, dtype=np.int64)
        ids = np.asarray(child_ids, dtype=np.int64)
        if ptr.ndim != 1 or ptr.size < 2 or ptr[0] != 0 or np.any(np.diff(ptr) < 0):
            raise TreeError("child_ptr must start at 0 and never decrease")
        if ids.ndim != 1 or ids.size != ptr[-1]:
            raise TreeError(f"child_ids has {ids.size} entries but child_ptr ends at {ptr[-1]}")
        tree._init_csr(int(num_classes), ptr, ids)
        return tree

    def _init_csr(self, num_classes: int, ptr: np.ndarray, ids: np.ndarray) -> None:
        self._num_classes = num_classes
        self._child_ptr = _frozen(ptr.copy())
        self._child_ids = _frozen(ids.copy())
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every structural rule; raise `TreeError` naming the first bad node."""
        V, I = self._num_classes, self.num_internal  # noqa: E741 (I is the paper's name)
        ptr, ids = self._child_ptr, self._child_ids
        fanout = np.diff(ptr)
        small = np.flatnonzero(fanout < 2)
        if small.size:
            u = int(small[0])
            raise TreeError(
                f"internal node {u} has {fanout[u]} child{'ren' if fanout[u] != 1 else ''}; "
                "every internal node needs at least 2"
            )
        owner = np.repeat(np.arange(I, dtype=np.int64), fanout)
        bad = np.flatnonzero((ids < 0) | (ids >= V + I))
        if bad.size:
            k = int(bad[0])
            raise TreeError(
                f"internal node {owner[k]} lists child id {ids[k]}, outside 0..{V + I - 1} "
                f"(classes are 0..{V - 1}, internal node u is {V}+u)"
            )
        # np.unique rather than bincount: memory bounded by the lists, whatever V claims to be.
        distinct, times = np.unique(ids, return_counts=True)
        leaves = distinct[distinct < V]
        if leaves.size < V:
            gaps = np.flatnonzero(leaves != np.arange(leaves.size))
            first = int(gaps[0]) if gaps.size else leaves.size
            raise TreeError(
                f"class {first} is not a leaf of the tree"
                + (f" ({V - leaves.size} classes are missing)" if V - leaves.size > 1 else "")
            )
        twice = distinct[(distinct < V) & (times > 1)]
        if twice.size:
            y = int(twice[0])
            where = owner[ids == y].tolist()
            raise TreeError(f"class {y} appears {len(where)} times (under internal nodes {where})")
        if V in distinct:
            raise TreeError(f"the root (internal node 0) is listed as a child of node {owner[ids == V][0]}")
        multi = distinct[(distinct > V) & (times > 1)]
        if multi.size:
            u = int(multi[0]) - V
            parents = owner[ids == V + u].tolist()
            raise TreeError(f"internal node {u} has {len(parents)} parents ({parents}); a tree node has exactly one")
        nodes = distinct[distinct > V] - V
        if nodes.size < I - 1:
            gaps = np.flatnonzero(nodes != np.arange(1, nodes.size + 1))
            u = int(gaps[0]) + 1 if gaps.size else nodes.size + 1
            raise TreeError(f"internal node {u} is unreachable: no node lists it as a child")
        is_node = ids >= V
        backwards = np.flatnonzero(is_node & (ids - V <= owner))
        if backwards.size:
            k = int(backwards[0])
            parent, child = int(owner[k]), int(ids[k] - V)
            cycle = self._find_cycle(child)
            if cycle:
                raise TreeError(
                    "internal nodes form a cycle, unreachable from the root: " + " -> ".join(map(str, cycle))
                )
            raise TreeError(
                f"internal node {child} is a child of node {parent} but has a smaller id; "
                "ids must be topological (parents before children). "
                "builders.from_children(..., renumber=True) renumbers for you"
            )

    def _find_cycle(self, start: int) -> list[int]:
        """Follow parents from ``start``; return the cycle it enters, or [] at the root."""
        V, ids = self._num_classes, self._child_ids
        owner = np.repeat(np.arange(self.num_internal), np.diff(self._child_ptr))
        parent = np.full(self.num_internal, -1, dtype=np.int64)
        node_children = ids >= V
        parent[ids[node_children] - V] = owner[node_children]
        order: dict[int, int] = {}
        u = start
        while u > 0 and u not in order:
            order[u] = len(order)
            u = int(parent[u])
        if u <= 0:
            return []
        path = list(order)[order[u] :]
        return [*path, u][::-1]

    # ------------------------------------------------------------------ basic shape
    @property
    def num_classes(self) -> int:
        """V, the number of classes (leaves)."""
        return self._num_classes

    @property
    def num_internal(self) -> int:
        """I, the number of internal nodes."""
        return self._child_ptr.size - 1

    @property
    def child_ptr(self) -> np.ndarray:
        """(I+1,) int64 CSR offsets into `child_ids`."""
        return self._child_ptr

    @property
    def child_ids(self) -> np.ndarray:
        """(I+V-1,) int64 unified child ids, node by node, in sibling order."""
        return self._child_ids

    def children(self, node: int) -> np.ndarray:
        """Unified ids of the children of internal node ``node``, in order."""
        return self._child_ids[self._child_ptr[node] : self._child_ptr[node + 1]]

    def children_lists(self) -> list[list[int]]:
        """The children of every internal node as Python lists (the constructor's input)."""
        flat, ptr = self._child_ids.tolist(), self._child_ptr.tolist()
        return [flat[ptr[u] : ptr[u + 1]] for u in range(self.num_internal)]

    @cached_property
    def fanout(self) -> np.ndarray:
        """(I,) number of children of each internal node."""
        return _frozen(np.diff(self._child_ptr))

    @cached_property
    def _owner(self) -> np.ndarray:
        """(I+V-1,) the internal node each entry of `child_ids` belongs to."""
        return _frozen(np.repeat(np.arange(self.num_internal, dtype=np.int64), self.fanout))

    @cached_property
    def _position(self) -> np.ndarray:
        """(I+V-1,) index of each entry of `child_ids` among its siblings."""
        return _frozen(np.arange(self._child_ids.size) - self._child_ptr[self._owner])

    @cached_property
    def node_parent(self) -> np.ndarray:
        """(I,) parent internal id of each internal node; -1 for the root."""
        parent = np.full(self.num_internal, -1, dtype=np.int64)
        mask = self._child_ids >= self._num_classes
        parent[self._child_ids[mask] - self._num_classes] = self._owner[mask]
        return _frozen(parent)

    @cached_property
    def node_child_index(self) -> np.ndarray:
        """(I,) position of each internal node among its siblings; -1 for the root."""
        index = np.full(self.num_internal, -1, dtype=np.int64)
        mask = self._child_ids >= self._num_classes
        index[self._child_ids[mask] - self._num_classes] = self._position[mask]
        return _frozen(index)

    @cached_property
    def leaf_parent(self) -> np.ndarray:
        """(V,) parent internal id of each class."""
        parent = np.empty(self._num_classes, dtype=np.int64)
        mask = self._child_ids < self._num_classes
        parent[self._child_ids[mask]] = self._owner[mask]
        return _frozen(parent)

    @cached_property
    def leaf_child_index(self) -> np.ndarray:
        """(V,) position of each class among its siblings."""
        index = np.empty(self._num_classes, dtype=np.int64)
        mask = self._child_ids < self._num_classes
        index[self._child_ids[mask]] = self._position[mask]
        return _frozen(index)

    @cached_property
    def node_depth(self) -> np.ndarray:
        """(I,) depth of each internal node; the root has depth 0."""
        ones = np.ones(self.num_internal, dtype=np.int64)
        return _frozen(_ancestor_sums(self.node_parent, ones) - 1)

    @cached_property
    def depth(self) -> np.ndarray:
        """(V,) depth of each class = the length of its path (number of decisions)."""
        return _frozen(self.node_depth[self.leaf_parent] + 1)

    @property
    def max_depth(self) -> int:
        """Length of the longest root-to-class path."""
        return int(self.depth.max())

    @cached_property
    def levels(self) -> tuple[np.ndarray, ...]:
        """Internal node ids grouped by depth, shallowest first (read-only): level-by-level sweeps go through them."""
        order = np.argsort(self.node_depth, kind="stable")
        bounds = np.searchsorted(self.node_depth[order], np.arange(self.node_depth.max() + 2))
        return tuple(_frozen(order[bounds[d] : bounds[d + 1]]) for d in range(len(bounds) - 1))

    def subtree_sums(self, leaf_values: np.ndarray) -> np.ndarray:
        """(I,) sum of ``leaf_values`` (V,) over the classes below each internal node."""
        values = np.asarray(leaf_values)
        if values.shape != (self._num_classes,):
            raise ValueError(f"leaf_values must have shape ({self._num_classes},), got {values.shape}")
        out = np.zeros(self.num_internal, dtype=np.result_type(values.dtype, np.int64))
        np.add.at(out, self.leaf_parent, values)
        return self._add_up(out)

    def node_subtree_sums(self, node_values: np.ndarray) -> np.ndarray:
        """(I,) sum of ``node_values`` (I,) over each internal node and the internal nodes below it."""
        values = np.asarray(node_values)
        if values.shape != (self.num_internal,):
            raise ValueError(f"node_values must have shape ({self.num_internal},), got {values.shape}")
        return self._add_up(values.astype(np.result_type(values.dtype, np.int64), copy=True))

    def _add_up(self, out: np.ndarray) -> np.ndarray:
        """Add each internal node's entry of ``out`` into its parent's, deepest level first (in place)."""
        for level in reversed(self.levels[1:]):
            np.add.at(out, self.node_parent[level], out[level])
        return out

    @cached_property
    def subtree_size(self) -> np.ndarray:
        """(I,) number of classes below each internal node (the root has V)."""
        return _frozen(self.subtree_sums(np.ones(self._num_classes, dtype=np.int64)))

    def paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class root-to-leaf paths, padded: what hierarchical-softmax kernels consume.

        Returns:
            ``(nodes, child_index, lengths)``: ``nodes`` (V, max_depth) int32 internal
            node ids from the root down, ``child_index`` (V, max_depth) the index of the
            child taken at each of them, both padded with -1; ``lengths`` (V,) = `depth`.
        """
        return self._padded_paths

    @cached_property
    def _padded_paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Scatter the packed paths into a (V, max depth) table padded with -1.
        ptr, packed_nodes, packed_codes = self.packed_paths()
        depth = self.depth
        rows = np.repeat(np.arange(self._num_classes), depth)
        columns = np.arange(packed_nodes.size) - np.repeat(ptr[:-1], depth)
        nodes = np.full((self._num_classes, self.max_depth), -1, dtype=np.int32)
        codes = np.full((self._num_classes, self.max_depth), -1, dtype=np.int32)
        nodes[rows, columns] = packed_nodes
        codes[rows, columns] = packed_codes
        return _frozen(nodes), _frozen(codes), self.depth

    @cached_property
    def _packed_paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        V, depth = self._num_classes, self.depth
        ptr = np.zeros(V + 1, dtype=np.int64)
        np.cumsum(depth, out=ptr[1:])
        nodes = np.empty(int(ptr[-1]), dtype=np.int32)
        codes = np.empty(int(ptr[-1]), dtype=np.int32)
        position = ptr[:-1] + depth - 1  # fill each path from its leaf end up to the root
        current, index = self.leaf_parent.copy(), self.leaf_child_index.copy()
        while position.size:
            nodes[position] = current
            codes[position] = index
            keep = current > 0
            position, index, current = position[keep] - 1, self.node_child_index[current[keep]], current[keep]
            current = self.node_parent[current]
        return _frozen(ptr), _frozen(nodes), _frozen(codes)

    def packed_paths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class root-to-leaf paths without padding (memory ~ sum of depths, not V x max depth).

        Returns:
            ``(ptr, nodes, child_index)``: the path of class ``y`` is
            ``nodes[ptr[y]:ptr[y + 1]]`` (int32 internal node ids from the root down), and
            ``child_index`` the child taken at each.
        """
        return self._packed_paths

    def path(self, label: int) -> list[tuple[int, int]]:
        """The ``(internal node, child index)`` decisions from the root down to ``label``."""
        if not 0 <= label < self._num_classes:
            raise IndexError(f"class {label} is outside 0..{self._num_classes - 1}")
        nodes, codes, lengths = self.paths()
        n = int(lengths[label])
        return list(zip(nodes[label, :n].tolist(), codes[label, :n].tolist(), strict=True))

    # ------------------------------------------------------------------ statistics
    def _probabilities(self, counts: np.ndarray | Sequence[float] | None) -> np.ndarray:
        V = self._num_classes
        if counts is None:
            return np.full(V, 1.0 / V)
        p = np.asarray(counts, dtype=np.float64)
        if p.shape != (V,):
            raise ValueError(f"counts must have shape ({V},), got {p.shape}")
        if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError("counts must be finite, non-negative and not all zero")
        return p / p.sum()

    def expected_path_length(self, counts: np.ndarray | Sequence[float] | None = None) -> float:
        """Expected depth of a token drawn from ``counts`` (uniform if None).

        For a binary tree this is the expected code length in bits.
        """
        return float(self._probabilities(counts) @ self.depth)

    @cached_property
    def path_fanout_sum(self) -> np.ndarray:
        """(V,) sum of the fanouts of the internal nodes on each class's path."""
        per_node = _ancestor_sums(self.node_parent, self.fanout)
        return _frozen(per_node[self.leaf_parent])

    def summary(self, counts: np.ndarray | Sequence[float] | None = None) -> dict[str, float]:
        """The headline structural statistics as a flat dict (what tables print beside a cost).

        The expected depth is under ``counts`` (uniform over classes if None). A head's cost
        per token is the cost model's, `tree_search.cost.head_cost` (with projections, or in time).
        """
        return {
            "num_classes": self._num_classes,
            "num_internal": self.num_internal,
            "max_fanout": int(self.fanout.max()),
            "max_depth": self.max_depth,
            "expected_depth": self.expected_path_length(counts),
        }

    def depth_histogram(self) -> np.ndarray:
        """(max_depth+1,) number of classes at each depth."""
        return np.bincount(self.depth, minlength=self.max_depth + 1)

    # ------------------------------------------------------------------ canonical form
    @cached_property
    def min_leaf(self) -> np.ndarray:
        """(I,) smallest class id below each internal node (the canonical sibling key)."""
        out = np.full(self.num_internal, self._num_classes, dtype=np.int64)
        np.minimum.at(out, self.leaf_parent, np.arange(self._num_classes))
        for level in reversed(self.levels[1:]):
            np.minimum.at(out, self.node_parent[level], out[level])
        return out

    def canonical(self) -> Tree:
        """The same tree with siblings sorted by their smallest class and nodes renumbered.

        Two trees that differ only in the order of siblings (and hence in internal ids)
        have identical canonical forms.
        """
        V, ids = self._num_classes, self._child_ids
        key_of_node = self.min_leaf
        # New internal ids: by (depth, smallest class below) — topological and canonical.
        new_order = np.lexsort((key_of_node, self.node_depth))
        new_id = np.empty_like(new_order)
        new_id[new_order] = np.arange(new_order.size)
        is_node = ids >= V
        child_key = np.where(is_node, key_of_node[np.where(is_node, ids - V, 0)], ids)
        entry_order = np.lexsort((child_key, new_id[self._owner]))
        new_ids = ids[entry_order]
        node_mask = new_ids >= V
        new_ids[node_mask] = V + new_id[new_ids[node_mask] - V]
        new_ptr = np.zeros_like(self._child_ptr)
        np.cumsum(self.fanout[new_order], out=new_ptr[1:])
        return Tree.from_csr(V, new_ptr, new_ids)

    @cached_property
    def canonical_hash(self) -> str:
        """Hex SHA-256 of the canonical form; equal for trees equal up to sibling order."""
        canon = self.canonical()
        digest = hashlib.sha256()
        digest.update(b"tree_search.tree/1")
        digest.update(np.int64(self._num_classes).astype("<i8").tobytes())
        digest.update(canon._child_ptr.astype("<i8").tobytes())
        digest.update(canon._child_ids.astype("<i8").tobytes())
        return digest.hexdigest()

    def same_structure(self, other: Tree) -> bool:
        """True if the trees are equal up to the order of siblings."""
        return self.canonical_hash == other.canonical_hash

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return (
            self._num_classes == other._num_classes
            and np.array_equal(self._child_ptr, other._child_ptr)
            and np.array_equal(self._child_ids, other._child_ids)
        )

    def __hash__(self) -> int:
        return hash(self.canonical_hash)

    def __reduce__(self):
        return (Tree.from_csr, (self._num_classes, self._child_ptr, self._child_ids))

    def __repr__(self) -> str:
        return (
            f"Tree(num_classes={self._num_classes}, num_internal={self.num_internal}, "
            f"max_depth={self.max_depth}, max_fanout={int(self.fanout.max())})"
        )
