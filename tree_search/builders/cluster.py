"""Trees from class embeddings: recursive balanced k-means or PCA splits, and the orderings they use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tree_search.builders.common import as_counts, check_arity, top_down
from tree_search.tree import Tree

__all__ = ["cluster_tree", "order_group", "order_groups"]

_CHUNK_NUMBERS = 1 << 18  # embedding numbers per batch of `order_groups` (2 MB: the k-means passes stay in cache)


def _part_capacities(sizes: np.ndarray, parts: int) -> np.ndarray:
    """(G, parts) sizes of the parts a group is cut into, as in `balanced`: larger parts first."""
    base, extra = sizes // parts, sizes % parts
    return base[:, None] + (np.arange(parts)[None, :] < extra[:, None])


def _pca_scores(points: np.ndarray, weights: np.ndarray, start: np.ndarray, iterations: int) -> np.ndarray:
    """(G, M) projection of each point on its group's top weighted principal direction.

    ``points`` (G, M, d) are the groups padded with zero rows of zero weight. The
    direction comes from ``iterations`` power iterations of the weighted covariance,
    started from ``start`` (G, d), all groups at once with batched matrix products.
    """
    total = weights.sum(axis=1, keepdims=True)  # (G, 1), > 0
    mean = np.matmul(weights[:, None, :], points)[:, 0, :] / total  # (G, d)
    centered = points - mean[:, None, :]  # (G, M, d)
    direction = np.array(start, dtype=np.float64)  # (G, d)
    for _ in range(iterations):
        projection = np.matmul(centered, direction[:, :, None])[:, :, 0]  # (G, M)
        direction = np.matmul((weights * projection)[:, None, :], centered)[:, 0, :]  # (G, d) = C v
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        direction /= np.where(norm > 0, norm, 1.0)
    return np.matmul(centered, direction[:, :, None])[:, :, 0]


def _kmeans_plus_plus(
    points: np.ndarray, weights: np.ndarray, sizes: np.ndarray, parts: int, uniforms: np.ndarray
) -> np.ndarray:
    """(G, parts, d) initial centres per group by weighted k-means++ (D² sampling).

    ``uniforms`` (2 * parts - 1, G) are the draws in [0, 1) in the order they are used: the
    first centre, then for each further centre its D² draw and its fallback's draw.
    """
    G, M, _ = points.shape
    rows = np.arange(G)
    valid = np.arange(M)[None, :] < sizes[:, None]
    pick = np.minimum((uniforms[0] * sizes).astype(np.int64), sizes - 1)
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
        target = uniforms[2 * c - 1] * total
        pick = np.minimum((cumulative <= target[:, None]).sum(axis=1), sizes - 1)
        # All mass on existing centres (duplicates, zero weights): any member will do.
        uniform = np.minimum((uniforms[2 * c] * sizes).astype(np.int64), sizes - 1)
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
    uniforms: np.ndarray,
    iterations: int,
) -> np.ndarray:
    """(G, M) balanced k-means cluster of each point of each padded group (pads: ``parts``).

    ``uniforms``: the k-means++ draws (`_kmeans_plus_plus`). A group whose labels repeat has
    reached a fixed point (the same labels give the same centres), so it leaves the batch
    there, and each group gets the labels it would get alone: every product and sum is taken
    per group, never across groups.
    """
    M = points.shape[1]
    valid = np.arange(M)[None, :] < sizes[:, None]
    capacity = _part_capacities(sizes, parts)
    centres = _kmeans_plus_plus(points, weights, sizes, parts, uniforms)
    labels = np.full((points.shape[0], M), parts, dtype=np.int64)
    active = np.arange(points.shape[0])  # groups still moving, and their points, weights and centres
    for iteration in range(iterations):
        # Squared distance up to the per-point constant |x|², which no assignment depends on.
        cost = (centres**2).sum(axis=2)[:, None, :] - 2.0 * np.matmul(points, centres.transpose(0, 2, 1))
        new_labels = _balanced_assignment(cost, valid[active], capacity[active])
        moving = np.ones(active.size, dtype=bool) if iteration == 0 else (new_labels != labels[active]).any(axis=1)
        labels[active] = new_labels
        if not moving.all():
            active, new_labels = active[moving], new_labels[moving]
            points, weights = points[moving], weights[moving]
        if active.size == 0 or iteration == iterations - 1:
            break
        member_of = new_labels[:, :, None] == np.arange(parts)[None, None, :]  # (G, M, parts)
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
        weights = as_counts(counts)
    fanout = check_arity(fanout, "fanout")
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
    return top_down(np.arange(V, dtype=np.int64), lambda sizes: np.where(sizes > flat_limit, fanout, sizes), reorder)


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
    points = X[members]  # (G, M, d), a copy
    points[~valid] = 0.0
    group_weights = np.where(valid, weights[members], 0.0)
    weightless = group_weights.sum(axis=1) <= 0
    group_weights[weightless] = valid[weightless]
    G = sizes.size
    if method == "pca":
        start = rng.standard_normal((G, X.shape[1]))
        key = np.where(valid, _pca_scores(points, group_weights, start, iterations), np.inf)
    else:
        key = _balanced_kmeans_labels(points, group_weights, sizes, parts, rng.random((2 * parts - 1, G)), iterations)
    local = np.argsort(key, axis=1, kind="stable")  # pads sort last in both cases
    order[position[valid]] = np.take_along_axis(members, local, axis=1)[valid]


def _order_stacked(
    X: np.ndarray, w: np.ndarray, method: str, parts: int, rngs: Sequence[np.random.Generator], iterations: int
) -> np.ndarray:
    """(G, M) `order_group` of G groups of one size M, stacked: ``X`` (G, M, d), ``w`` (G, M), one generator each.

    Each group's draws come from its own generator, in the order `order_group` makes them, and
    no group is padded, so each row is the permutation that group would get alone.
    """
    G, M, d = X.shape
    w = np.where((w.sum(axis=1) <= 0)[:, None], 1.0, w)  # all weights zero: uniform
    if method == "pca":
        start = np.stack([rng.standard_normal(d) for rng in rngs])
        key = _pca_scores(X, w, start, iterations)
    else:
        k = min(parts, M)
        uniforms = np.stack([rng.random(2 * k - 1) for rng in rngs], axis=1)
        key = _balanced_kmeans_labels(X, w, np.full(G, M), k, uniforms, iterations)
    return np.argsort(key, axis=1, kind="stable")


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
    return _order_stacked(X, w, method, parts, [rng], iterations)[0]


def order_groups(
    embeddings: np.ndarray,
    groups: Sequence[np.ndarray],
    counts: np.ndarray,
    method: str,
    parts: int,
    rngs: Sequence[np.random.Generator],
    iterations: int = 10,
) -> list[np.ndarray]:
    """`order_group` of many groups at once, each the permutation `order_group` gives it alone.

    Groups of one size are split together by batched numpy (a search splits some 10^5 small
    groups at V = 100k, one numpy call each before); groups of different sizes are never
    padded together, as padding would change the sums' rounding and so some splits.

    Args:
        embeddings: (V, d) class embeddings, scaled and centred.
        groups: each group's class ids.
        counts: (V,) non-negative class weights.
        method: ``"kmeans"`` or ``"pca"``, as for `order_group`.
        parts: clusters for ``"kmeans"`` (at most a group's size).
        rngs: one generator per group, as `order_group`'s ``rng``.
        iterations: Lloyd or power iterations.
    """
    if method not in ("kmeans", "pca"):
        raise ValueError(f"method must be 'kmeans' or 'pca', got {method!r}")
    if len(rngs) != len(groups):
        raise ValueError(f"order_groups needs one generator per group: {len(groups)} groups, {len(rngs)} generators")
    embeddings = np.asarray(embeddings, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    by_size: dict[int, list[int]] = {}
    for index, members in enumerate(groups):
        by_size.setdefault(len(members), []).append(index)
    orders: list[np.ndarray] = [np.empty(0, np.int64)] * len(groups)
    chunks = []
    for size, indices in by_size.items():
        step = max(1, _CHUNK_NUMBERS // max(1, size * embeddings.shape[1]))
        chunks.extend(indices[start : start + step] for start in range(0, len(indices), step))
    for indices in chunks:
        members = np.stack([np.asarray(groups[i], dtype=np.int64) for i in indices])  # (G, M)
        ordered = _order_stacked(embeddings[members], counts[members], method, parts, [rngs[i] for i in indices],
                                 iterations)  # fmt: skip
        for row, index in enumerate(indices):
            orders[index] = ordered[row]
    return orders
