"""Trees from structure alone: merges, children or parents, nested lists, balanced and random trees, binarizing."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from tree_search.builders.common import check_arity, top_down
from tree_search.tree import Tree, TreeError

__all__ = [
    "balanced",
    "binarized",
    "from_children",
    "from_merges",
    "from_nested",
    "from_parents",
    "random_tree",
    "tree_from_merge_arrays",
]


def tree_from_merge_arrays(num_classes: int, members: np.ndarray, ptr: np.ndarray) -> Tree:
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
    return tree_from_merge_arrays(V, members, ptr)


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
    arity = check_arity(arity)
    if order is None:
        sequence = np.arange(V, dtype=np.int64)
    else:
        sequence = np.asarray(order)
        if sequence.dtype.kind not in "iu":
            raise ValueError(f"order must be a permutation of 0..{V - 1} (integers), got dtype {sequence.dtype}")
        sequence = sequence.astype(np.int64)
        if sequence.shape != (V,) or not np.array_equal(np.sort(sequence), np.arange(V)):
            raise ValueError(f"order must be a permutation of 0..{V - 1}")
    return top_down(sequence, lambda sizes: np.minimum(arity, sizes))


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
    max_arity = check_arity(max_arity, "max_arity")
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
    tree = _renumbered(V, children)
    return tree if tree is not None else _renumbered_checked(V, children)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[k] .. starts[k] + lengths[k] - 1`` for every k, concatenated."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if ends.size else 0)


def _renumbered(V: int, children: Sequence[Sequence[int]]) -> Tree | None:
    """`from_children`'s tree in batched numpy, or None when the lists break a rule (then the checked path names it).

    Breadth-first order is level by level: a level's nodes in their parents' order, siblings in order.
    """
    num_internal = len(children)
    lengths = np.fromiter(map(len, children), dtype=np.int64, count=num_internal)
    flat = [c for row in children for c in row]
    if lengths.min() < 2 or not {type(c) for c in flat} <= _INTEGER_TYPES:
        return None
    ids = np.asarray(flat, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= V + num_internal:
        return None
    internal = ids[ids >= V] - V
    if internal.size != num_internal - 1 or np.any(np.bincount(internal, minlength=num_internal) != (
            np.arange(num_internal) > 0)):  # fmt: skip
        return None  # the root as a child, or a node listed twice or never
    ptr = np.zeros(num_internal + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    levels, frontier = [], np.zeros(1, dtype=np.int64)
    while frontier.size:
        levels.append(frontier)
        kids = ids[_ranges(ptr[frontier], lengths[frontier])]
        frontier = kids[kids >= V] - V
    ordered = np.concatenate(levels)
    if ordered.size < num_internal:
        return None  # a cycle away from the root
    new_id = np.empty(num_internal, dtype=np.int64)
    new_id[ordered] = np.arange(num_internal)
    relabeled = np.where(ids >= V, V + new_id[np.maximum(ids - V, 0)], ids)
    new_lengths = lengths[ordered]
    new_ptr = np.zeros(num_internal + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=new_ptr[1:])
    return Tree.from_csr(V, new_ptr, relabeled[_ranges(ptr[ordered], new_lengths)])


_INTEGER_TYPES = {int, np.int64, np.int32, np.intp, np.int16, np.int8, np.uint8, np.uint16, np.uint32, np.uint64}


def _renumbered_checked(V: int, children: Sequence[Sequence[int]]) -> Tree:
    """`from_children` one node at a time: slow, and its errors name the first node that breaks a rule."""
    num_internal = len(children)
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
