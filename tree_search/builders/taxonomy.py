"""Trees from a taxonomy (a parent relation) or from class categories, with node names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tree_search.builders.common import as_counts, check_arity
from tree_search.builders.frequency import huffman
from tree_search.tree import Tree, TreeError

__all__ = ["TaxonomyError", "UNKNOWN_MODES", "from_categories", "from_taxonomy"]


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
    arity = check_arity(arity)
    pairs = _taxonomy_pairs(parents)
    V = len(labels)
    weights = np.ones(V) if counts is None else as_counts(counts)
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
    leaves = [name for name in entry_of if name not in kids_of]
    missing = [name for name in leaves if name not in label_id]
    if missing and (extra == "error" or len(missing) == len(leaves)):
        shown = ", ".join(repr(name) for name in missing[:8]) + (", ..." if len(missing) > 8 else "")
        if len(missing) == len(leaves):
            problem = f"none of its {len(leaves)} classes is a token of the vocabulary ({V} labels): {shown}"
            hint = "is it the taxonomy of another vocabulary?"
        else:
            problem = f"class {missing[0]!r} is not in the vocabulary ({V} labels)"
            if len(missing) > 1:
                problem = f"{len(missing)} of its {len(leaves)} classes are not in the vocabulary ({V} labels): {shown}"
            hint = "remove those lines (in Python, extra='ignore' skips them)"
        raise TaxonomyError(f"{problem}; {hint}", entry_of[missing[0]])
    for name in leaves:
        if name in label_id:
            known[label_id[name]] = True
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
    weights = as_counts(counts)
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
    fanout, group_fanout = check_arity(fanout, "fanout"), check_arity(group_fanout, "group_fanout")
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
