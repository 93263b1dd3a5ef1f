"""The split grammar: how a group of classes splits under a rule, and trees built from plans of rules.

One place for what the split environment (`tree_search.envs.split`) and the dynamic-programming
searcher (`tree_search.agents.dp_search`) share. A *rule* orders a group's classes (by
descending frequency, along the top principal direction of the class embeddings, or by
balanced k-means clusters) and cuts the order into parts (equal counts, equal token mass,
or head-and-tail as in adaptive softmax: the most frequent classes as leaves, the tail cut
in frequency order by mass or clustered by k-means or PCA; or cut at given frequency ranks,
as the adaptive softmax's cutoffs are), or makes every member a leaf ("flat"), optionally
behind a projection of the features to fewer dimensions (the adaptive softmax's tail
clusters). A *plan*
is a rule for a group plus, optionally, plans for some of its parts; a part without a plan
inherits its parent's rule, recursively, until groups of at most ``leaf_size`` classes (or
at most the rule's fanout) become flat nodes. A Huffman rule (`huffman_rule`) completes a
group at once with the k-ary Huffman tree of its counts (the cheapest subtree in expected
cost; it takes no plans for parts).

A split depends only on the group's content (its members) and the seed: k-means and PCA
draw from a generator seeded by the group's members, never by where the group sits in a
tree. So a group's subtree under a given plan is the same in every tree that contains it,
which is what makes its node losses reusable (the node bank) and the best plan findable by
dynamic programming.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from tree_search.builders import (
    ADAPTIVE_SHAPES,
    CUTOFF_SHAPES,
    HEAD_MASS,
    classic_trees,
    from_children,
    huffman,
    order_groups,
)
from tree_search.tree import Tree

__all__ = [
    "CUTS",
    "FLAT",
    "HEAD_MASS",
    "HUFFMAN_FANOUTS",
    "ORDERS",
    "Plan",
    "SplitCache",
    "SplitRule",
    "group_rng",
    "huffman_graft",
    "huffman_rule",
    "normalise_embeddings",
    "partition_group",
    "partition_groups",
    "plan_head",
    "plan_tree",
    "projected_flat",
    "rank_cutoffs",
    "split_group",
    "split_groups",
    "split_rules",
]

ORDERS = ("frequency", "pca", "kmeans")
CUTS = ("count", "mass")


@dataclass(frozen=True)
class SplitRule:
    """How one group is split: an ordering of its classes, a cut rule and a fanout (or flat)."""

    order: str  # "frequency", "pca", "kmeans" (or "flat")
    cut: str  # "count", "mass", "headtail", "cutoffs", "huffman" (or "flat")
    fanout: int  # parts (head-and-tail and cutoffs: tail clusters + 1); 0 for flat
    projection: int = 0  # flat: the node scores its members on the features projected to this many dims (0: none)
    cuts: tuple[int, ...] = ()  # cutoffs: frequency ranks where the group is cut (the first ends the head)

    @property
    def flat(self) -> bool:
        """All members become leaves of the node."""
        return self.cut == "flat"

    def __str__(self) -> str:
        if self.flat:
            return f"flat, projected to {self.projection} dims" if self.projection else "flat"
        if self.cut == "cutoffs":
            return f"head of {self.cuts[0]} + tail clusters cut at ranks {', '.join(map(str, self.cuts[1:])) or '-'}"
        if self.cut == "huffman":
            return f"{self.fanout}-ary Huffman subtree"
        if self.cut == "headtail":
            return f"head+{self.fanout - 1} tail clusters ({self.order} order)"
        return f"{self.order} order, equal-{self.cut} cut, fanout {self.fanout}"


FLAT = SplitRule("flat", "flat", 0)


def split_rules(fanouts: tuple[int, ...]) -> tuple[SplitRule, ...]:
    """Every rule, in the split environment's action order: ``(order, cut, fanout)``, head-and-tail by order, flat."""
    rules = [SplitRule(o, c, k) for o in ORDERS for c in CUTS for k in fanouts]
    rules += [SplitRule(o, "headtail", k) for o in ORDERS for k in fanouts]
    return (*rules, FLAT)


def huffman_rule(fanout: int) -> SplitRule:
    """The rule that completes a group with its k-ary Huffman tree."""
    return SplitRule("frequency", "huffman", int(fanout))


def projected_flat(size: int) -> SplitRule:
    """The rule that makes a group one flat node scoring its members on the features projected to ``size`` dims."""
    if int(size) < 1:
        raise ValueError(f"a projected flat node needs a projection of at least 1 dimension, got {size}")
    return SplitRule("flat", "flat", 0, projection=int(size))


def rank_cutoffs(cuts: tuple[int, ...] | list[int]) -> SplitRule:
    """The rule that cuts a group in frequency order at ranks ``cuts``: a head of ``cuts[0]`` leaves, then tail parts.

    At the root with the cutoffs of an adaptive softmax (`tree_search.builders.frequency_cutoffs`),
    and projected flat completions of its tail parts, this is the adaptive softmax's tree.
    """
    cuts = tuple(int(c) for c in cuts)
    if not cuts or any(c < 1 for c in cuts) or list(cuts) != sorted(set(cuts)):
        raise ValueError(f"cutoffs must be increasing distinct ranks >= 1, got {list(cuts)}")
    return SplitRule("frequency", "cutoffs", len(cuts) + 1, cuts=cuts)


CLASSIC_ROOTS = ADAPTIVE_SHAPES + CUTOFF_SHAPES  # the classic shapes whose root split the grammar holds
FLAT_PROJECTIONS = (4, 16, 64)  # projected flat nodes of d / 4, d / 16, d / 64 dimensions: the adaptive softmax's tails
HUFFMAN_FANOUTS = (2, 3, 4, 8, 16, 32)  # Huffman subtrees dp completes parts with (8-32 under a decoding cap)


def classic_root_rules(counts: np.ndarray, dim: int) -> dict[str, SplitRule]:
    """``{shape: its root rule}``: the `rank_cutoffs` root split of each shape of `CLASSIC_ROOTS` built on ``counts``.

    With flat tails, projected to ``dim // 4 ** (i + 1)`` for tail ``i`` (the adaptive shapes) or
    unprojected (`CUTOFF_SHAPES`), each gives that classic tree itself.
    """
    shapes = classic_trees(counts, CLASSIC_ROOTS, dim=dim)
    return {name: rank_cutoffs(shape.params["cutoffs"]) for name, shape in shapes.items()}


def flat_projections(dim: int) -> tuple[SplitRule, ...]:
    """The projected flat rules of `FLAT_PROJECTIONS` at feature dimension ``dim`` (distinct, at least 1 dimension)."""
    return tuple(dict.fromkeys(projected_flat(max(1, int(dim) // k)) for k in FLAT_PROJECTIONS))


def normalise_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Class embeddings scaled by their largest absolute value and centred (as `cluster_tree` does)."""
    X = np.asarray(embeddings, dtype=np.float64)
    scale = np.abs(X).max()
    X = X / scale if scale > 0 else X
    return X - X.mean(axis=0)


def _content_key(members: np.ndarray) -> bytes:
    """128 bits of a group's content (its sorted members): a 32-bit checksum collides among a search's ~1e5 groups."""
    return hashlib.blake2b(np.sort(np.asarray(members, dtype=np.int64)).tobytes(), digest_size=16).digest()


def group_rng(members: np.ndarray, seed: int) -> np.random.Generator:
    """The generator of one group's split: seeded by the seed and the group's (sorted) members."""
    content = np.ascontiguousarray(np.sort(np.asarray(members, dtype=np.int64)))  # (already sorted by callers)
    return np.random.default_rng([int(seed), int(content.size), zlib.crc32(content.tobytes())])


def _mass_cuts(mass: np.ndarray, parts: int) -> np.ndarray:
    """Cut positions splitting ``mass`` (in order) into ``parts`` runs of about equal sum, none empty."""
    n = mass.size
    cumulative = np.cumsum(mass)
    total = cumulative[-1]
    if total <= 0:
        return np.array([round(j * n / parts) for j in range(1, parts)], dtype=np.int64)
    cuts = np.searchsorted(cumulative, total * np.arange(1, parts) / parts, side="left") + 1
    # Keep every run non-empty: at least one class before each cut and enough after it.
    for j in range(parts - 1):
        low = (cuts[j - 1] if j else 0) + 1
        cuts[j] = min(max(cuts[j], low), n - (parts - 1 - j))
    return cuts


def _split_at(values: np.ndarray, cuts) -> list[np.ndarray]:
    """``np.split(values, cuts)`` (sorted cuts), without its per-call overhead (a search splits 1e6 groups at 100k)."""
    edges = [0, *(int(c) for c in cuts), values.size]
    return [values[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _equal_parts(values: np.ndarray, parts: int) -> list[np.ndarray]:
    """``np.array_split(values, parts)``: sizes differ by at most one, the larger first."""
    base, extra = divmod(values.size, parts)
    return _split_at(values, np.cumsum([base + (j < extra) for j in range(parts - 1)]))


class _Ordering(NamedTuple):
    """A split waiting for a k-means or PCA ordering of ``group`` (sorted class ids) into ``parts``."""

    group: np.ndarray
    method: str
    parts: int
    finish: Callable[[np.ndarray], Any]  # the group in its new order -> the split (or another _Ordering)


def _cut(ordered: np.ndarray, rule: SplitRule, counts: np.ndarray, head_max: int):
    """The split of a group already in ``rule``'s order, or the `_Ordering` its clustered tail waits for."""
    if rule.cut == "count":
        return np.empty(0, np.int64), _equal_parts(ordered, rule.fanout)
    mass = counts[ordered]
    if rule.cut == "mass":
        return np.empty(0, np.int64), _split_at(ordered, _mass_cuts(mass, rule.fanout))
    tails = rule.fanout - 1
    cumulative = np.cumsum(mass)
    head = int(np.searchsorted(cumulative, HEAD_MASS * cumulative[-1])) + 1
    head = max(1, min(head, head_max, ordered.size - tails))
    tail = ordered[head:]
    if tails == 1:
        return ordered[:head], [tail]
    if rule.order == "frequency":  # the tail cut by equal mass in frequency order (adaptive softmax's clusters)
        return ordered[:head], _split_at(tail, _mass_cuts(counts[tail], tails))
    # the tail clustered (k-means or PCA order, equal counts), by its content alone
    head_leaves = ordered[:head]
    return _Ordering(np.sort(tail), rule.order, tails, lambda clustered: (head_leaves, _equal_parts(clustered, tails)))


def _split_or_order(members: np.ndarray, rule: SplitRule, counts: np.ndarray, head_max: int):
    """The split of ``members`` (sorted) by ``rule``, or the `_Ordering` it waits for."""
    size = members.size
    if rule.flat or (size <= rule.fanout and rule.cut != "cutoffs"):
        return members, []
    weights = counts[members]
    if rule.cut == "cutoffs":  # ranks past the group's size are dropped: a group smaller than the head is flat
        cuts = [c for c in rule.cuts if c < size]
        if not cuts:
            return members, []
        ordered = members[np.lexsort((members, -weights))]
        return ordered[: cuts[0]], _split_at(ordered[cuts[0] :], [c - cuts[0] for c in cuts[1:]])
    if rule.order == "frequency" or rule.cut == "headtail":  # head-and-tail: the head is always by frequency
        return _cut(members[np.lexsort((members, -weights))], rule, counts, head_max)
    return _Ordering(members, rule.order, rule.fanout, lambda ordered: _cut(ordered, rule, counts, head_max))


def partition_groups(
    requests: Sequence[tuple[np.ndarray, SplitRule]],
    counts: np.ndarray,
    embeddings: np.ndarray,
    *,
    seed: int = 0,
    head_max: int = 256,
    orderings: dict | None = None,
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """`partition_group` of each ``(members, rule)`` request, the k-means and PCA orderings of all at once.

    Each split is the one `partition_group` gives it alone (`order_groups` batches only
    groups of one size, each with its own generator), so trees do not depend on which
    groups were split together. A group's ordering depends on its method, parts and content
    only, so rules that order it alike (equal-count and equal-mass cuts, a clustered tail)
    share one: within the call, and across calls through ``orderings`` (a dict kept for one
    dataset and seed, such as the `SplitCache` of `split_groups`).
    """
    results = [_split_or_order(np.sort(np.asarray(members, dtype=np.int64)), rule, counts, head_max)
               for members, rule in requests]  # fmt: skip
    known = orderings if orderings is not None else {}
    while waiting := [i for i, result in enumerate(results) if isinstance(result, _Ordering)]:
        batches: dict[tuple[str, int], list[int]] = {}
        for i in waiting:
            batches.setdefault((results[i].method, results[i].parts), []).append(i)
        for (method, parts), indices in batches.items():
            keys = [("order", method, parts, _content_key(results[i].group)) for i in indices]
            ordered = {key: known[key][0] for key in keys if key in known}  # held here: ``known`` may evict
            todo = {key: results[i].group for key, i in zip(keys, indices, strict=True) if key not in ordered}
            groups = list(todo.values())
            orders = order_groups(embeddings, groups, counts, method, parts, [group_rng(g, seed) for g in groups])
            for key, group, order in zip(todo, groups, orders, strict=True):
                ordered[key] = group[order]
                known[key] = (ordered[key], [])  # a split's shape: `SplitCache` counts its ids
            for i, key in zip(indices, keys, strict=True):
                results[i] = results[i].finish(ordered[key])
    return results


def partition_group(
    members: np.ndarray,
    rule: SplitRule,
    counts: np.ndarray,
    embeddings: np.ndarray,
    *,
    seed: int = 0,
    head_max: int = 256,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(direct leaves, parts)`` of one split of ``members`` by ``rule``.

    Args:
        members: the group's class ids.
        rule: the rule; flat, or a group of at most ``rule.fanout`` classes, gives all leaves.
        counts: (V,) class counts.
        embeddings: (V, d) class embeddings, normalised (`normalise_embeddings`).
        seed: seeds k-means and PCA, together with the group's content (`group_rng`).
        head_max: most classes the head of a head-and-tail cut keeps as leaves.
    """
    return partition_groups([(members, rule)], counts, embeddings, seed=seed, head_max=head_max)[0]


class SplitCache(OrderedDict):
    """A `split_group` cache holding at most about ``budget`` class ids: the oldest splits go first.

    At V = 100k a search splits about 10^6 distinct groups (some 10 MB of ids per distinct tree);
    unbounded, the cache grew by gigabytes. Splits are pure functions of rule and content, so
    dropping one costs only its recomputation, never a different tree. An `OrderedDict`: a plain
    dict finds its oldest entry by scanning past every entry deleted before it, so a full cache
    spent seconds per new split at 100k (the search stalled).
    """

    def __init__(self, budget: int = 50_000_000) -> None:
        super().__init__()
        self.budget, self.held = budget, 0

    @staticmethod
    def _size(split: tuple[np.ndarray, list[np.ndarray]]) -> int:
        return int(split[0].size) + sum(int(part.size) for part in split[1])

    def __setitem__(self, key, split) -> None:
        if key in self:
            self.held -= self._size(self[key])
        super().__setitem__(key, split)
        self.held += self._size(split)
        while self.held > self.budget and len(self) > 1:
            self.held -= self._size(self.popitem(last=False)[1])


def split_groups(
    requests: Sequence[tuple[np.ndarray, SplitRule]],
    counts: np.ndarray,
    embeddings: np.ndarray,
    *,
    seed: int = 0,
    head_max: int = 256,
    cache: dict | None = None,
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """`partition_groups`, each split remembered in ``cache`` (a dict for one dataset and seed) by rule and content."""
    if cache is None:
        return partition_groups(requests, counts, embeddings, seed=seed, head_max=head_max)
    keys = [(rule, _content_key(members)) for members, rule in requests]
    splits = {key: cache[key] for key in keys if key in cache}  # held here: the cache may evict them below
    missing = {key: request for key, request in zip(keys, requests, strict=True) if key not in splits}
    if missing:
        computed = partition_groups(list(missing.values()), counts, embeddings, seed=seed, head_max=head_max,
                                    orderings=cache)  # fmt: skip
        for key, split in zip(missing, computed, strict=True):
            splits[key] = cache[key] = split
    return [splits[key] for key in keys]


def split_group(
    members: np.ndarray,
    rule: SplitRule,
    counts: np.ndarray,
    embeddings: np.ndarray,
    *,
    seed: int = 0,
    head_max: int = 256,
    cache: dict | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """`partition_group`, remembered in ``cache`` (a dict kept for one dataset and seed) by rule and content."""
    return split_groups([(members, rule)], counts, embeddings, seed=seed, head_max=head_max, cache=cache)[0]


@dataclass(frozen=True)
class Plan:
    """A rule for a group and, by part index, plans for some of its parts (the others inherit the rule)."""

    rule: SplitRule
    parts: dict[int, Plan] = field(default_factory=dict)


def huffman_graft(
    counts: np.ndarray, members: np.ndarray, fanout: int, node: int, next_node: int
) -> tuple[Tree, list[list[int]]]:
    """The k-ary Huffman tree of ``members`` (in their order) grafted at internal node ``node`` of a larger tree.

    Returns the subtree and its children lists in unified ids of the larger tree: row 0 is
    ``node``'s (the subtree's root, never a child), row j > 0 that of the new internal node
    ``next_node + j - 1``. `plan_head` and the split environment graft Huffman parts with it.
    """
    V = counts.size
    sub = huffman(counts[members], fanout)
    ids, size = sub.child_ids, members.size
    offset = next_node - 1  # the subtree's node j > 0 becomes node offset + j
    mapped = np.where(ids < size, members[np.minimum(ids, size - 1)], V + offset + ids - size).tolist()
    ptr = sub.child_ptr.tolist()
    return sub, [mapped[ptr[j] : ptr[j + 1]] for j in range(sub.num_internal)]


def plan_tree(
    counts: np.ndarray,
    embeddings: np.ndarray,
    plan: Plan,
    *,
    seed: int = 0,
    leaf_size: int = 8,
    head_max: int = 256,
    cache: dict | None = None,
) -> Tree:
    """The tree of a plan for the root group (all classes): `plan_head` without its projections."""
    return plan_head(counts, embeddings, plan, seed=seed, leaf_size=leaf_size, head_max=head_max, cache=cache)[0]


def plan_head(
    counts: np.ndarray,
    embeddings: np.ndarray,
    plan: Plan,
    *,
    seed: int = 0,
    leaf_size: int = 8,
    head_max: int = 256,
    cache: dict | None = None,
) -> tuple[Tree, dict[int, int]]:
    """The tree of a plan for the root group (all classes), and ``{internal node: projected dim}`` of its head.

    Part ``i`` of a split is the i-th part `partition_group` returns (parts of one class
    become leaves of the node and keep their index). A part with a plan splits by it; a
    part without one inherits its parent's rule, until groups of at most ``max(leaf_size,
    rule.fanout)`` classes become flat nodes. A group planned as a projected flat node
    (`projected_flat`) is one node whose projection the second value names.

    ``cache`` (a dict the caller keeps for one dataset and seed) remembers each group's
    split by (rule, content): trees that share groups (a search's trees do) split them once.
    """
    counts = np.asarray(counts, dtype=np.float64)
    V = counts.size
    children: list[list[int]] = []
    projected: list[tuple[int, int, int]] = []  # (smallest member, members, projected dim) of projected flat nodes
    # Breadth-first, a level at a time, so that one `split_groups` call splits all of a level's groups
    # together; a node lists its leaves, then its one-class parts, then its other parts in order.
    level: list[tuple[int, np.ndarray, SplitRule, Plan | None]] = [(-1, np.arange(V), plan.rule, plan)]
    while level:
        to_split: list[tuple[int, np.ndarray, SplitRule, Plan | None]] = []
        for parent, members, rule, own in level:
            node = len(children)
            children.append([])
            if parent >= 0:
                children[parent].append(V + node)
            if rule.cut == "huffman" and members.size > rule.fanout:  # the group's own Huffman subtree, grafted
                _, rows = huffman_graft(counts, members, rule.fanout, node, len(children))
                children[node].extend(rows[0])
                children.extend(rows[1:])
                continue
            if own is None and members.size <= max(leaf_size, rule.fanout):
                rule = FLAT
            if rule.flat and rule.projection:
                projected.append((int(members.min()), int(members.size), rule.projection))
            to_split.append((node, members, rule, own))
        splits = split_groups([(members, rule) for _, members, rule, _ in to_split], counts, embeddings, seed=seed,
                              head_max=head_max, cache=cache)  # fmt: skip
        level = []
        for (node, _, rule, own), (leaves, parts) in zip(to_split, splits, strict=True):
            children[node].extend(leaves.tolist())
            children[node].extend(int(p[0]) for p in parts if p.size == 1)
            for index, part in enumerate(parts):
                if part.size > 1:
                    sub = own.parts.get(index) if own is not None else None
                    level.append((node, part, sub.rule if sub is not None else rule, sub))
    tree = from_children(V, children)
    if not projected:
        return tree, {}
    # nodes are renumbered: find each projected one by its content (smallest member and size identify a subtree)
    by_content = {(int(tree.min_leaf[n]), int(tree.subtree_size[n])): n for n in range(tree.num_internal)}
    return tree, {by_content[smallest, size]: dim for smallest, size, dim in projected}
