"""`JTMSearcher`: alternating re-assignment of classes to a fixed tree shape, in the style of JTM.

Zhu et al. 2019 ("Joint Optimization of Tree-based Index and Deep Model", JTM) alternate
two steps: train the node classifiers on the current tree, then re-assign every item to a
leaf of the same, fixed tree shape by what the trained classifiers say, keeping the tree
balanced, top-down one level at a time. Here:

* the classifiers are the reward's own trained nodes (`tree_search.reward.reward.node_weights`,
  from the node bank), and the gains are measured on the reward's train sample, so
  selection stays on the validation split;
* at an internal node ``n`` with classes ``S_n`` (after the levels above were re-assigned),
  class ``y`` scores each child slot ``j`` by ``G[y, j] = sum over y's train tokens of
  log p(j | h, n)``; each slot keeps its capacity (1 for a leaf, the subtree's size for an
  internal child), so the shape, and with it every node's fanout, stays as it is;
* the assignment under capacities is a batched deferred acceptance: each class proposes to
  its best open slot, each slot keeps its proposers of largest margin (best minus second
  best open slot) up to its capacity, until all are placed (at most ``fanout + 1`` rounds);
* moving a frequent class deeper raises the cost per token, so the score carries a cost
  term ``- lam * n_y * below(j)`` (``below``: the slot's mean multiply-adds per token under
  it), with ``lam`` found by bisection so that the new tree stays within the cost cap.

`JTMSearcher` evaluates the homogeneous classic trees of the split grammar within the cap
(at most a third of its budget, the costliest first), then runs re-assignment rounds from
the best tree it knows, one counted evaluation per round; a round that does not improve the
validation NLL ends that chain, and the next round starts from the next-best tree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from tree_search.agents.base import Searcher
from tree_search.cost import head_cost
from tree_search.data.features import FeatureDataset, class_embeddings, default_device
from tree_search.envs.config import TreeEnvConfig
from tree_search.heads.timing import resolve_cost
from tree_search.reward.decode_cap import decode_cap_for
from tree_search.reward.evaluator import BudgetExhausted, Evaluation, Evaluator
from tree_search.reward.node_train import split_sample
from tree_search.reward.reward import huffman_cost
from tree_search.split_grammar import Plan, SplitCache, normalise_embeddings, plan_tree, split_rules
from tree_search.tree import Tree

__all__ = ["JTMSearcher", "reassign", "slot_costs"]

_CHUNK_FLOATS = 1 << 22  # gathered weights of one scoring chunk: 16 MB
STAY_BONUS = 3.0  # nats of evidence a class needs to leave its slot (classes with few tokens stay put)


def slot_costs(tree: Tree, counts: np.ndarray, dim: int) -> np.ndarray:
    """(V + I - 1,) per child slot (CSR order): the mean multiply-adds per token below it (0 for a leaf).

    A slot holding internal node ``m`` costs, per token of a class under ``m``, the fanouts of
    ``m`` and of the nodes below it on that class's path, times ``dim``; averaged by ``counts``.
    """
    weights = np.asarray(counts, np.float64) + 0.5  # every class some mass
    own = tree.fanout.astype(np.float64)  # fanouts summed from the root down to each node, inclusive
    for depth in range(1, int(tree.node_depth.max()) + 1 if tree.num_internal else 1):
        nodes = np.flatnonzero(tree.node_depth == depth)
        own[nodes] += own[tree.node_parent[nodes]]
    leaf_total = tree.path_fanout_sum  # (V,) fanouts summed along each class's path
    mass = tree.subtree_sums(weights)
    weighted = tree.subtree_sums(weights * leaf_total) / mass  # mean path fanout sum of the classes under each node
    above = np.where(tree.node_parent >= 0, own[np.maximum(tree.node_parent, 0)], 0.0)  # fanouts above the node
    ids = tree.child_ids
    out = np.zeros(ids.size)
    internal = ids >= tree.num_classes
    m = ids[internal] - tree.num_classes
    out[internal] = (weighted[m] - above[m]) * dim
    return out


def _level_scores(
    tree: Tree,
    weights: Mapping[int, tuple[np.ndarray, ...]],
    nodes: np.ndarray,
    node_of_class: np.ndarray,
    features: torch.Tensor,
    labels: np.ndarray,
) -> np.ndarray:
    """(V, max fanout) ``G[y, j]``: log-probabilities of child ``j`` of class ``y``'s node, summed over y's tokens."""
    V = tree.num_classes
    width = int(tree.fanout[nodes].max())
    G = torch.zeros(V, width, dtype=torch.float64)
    token_node = node_of_class[labels]  # (T,) the node each token sits at on this level (-1: placed above)
    keep = np.flatnonzero(token_node >= 0)
    fanouts = tree.fanout[nodes]
    for fanout in np.unique(fanouts):
        group = nodes[fanouts == fanout]
        W = torch.from_numpy(np.stack([np.asarray(weights[int(n)][0], np.float32) for n in group]))  # (k, F, d)
        b = torch.from_numpy(np.stack([np.asarray(weights[int(n)][1], np.float32) for n in group]))  # (k, F)
        local = np.full(tree.num_internal, -1)
        local[group] = np.arange(group.size)
        rows = keep[local[token_node[keep]] >= 0]
        step = max(1, _CHUNK_FLOATS // (int(fanout) * features.shape[1]))
        for lo in range(0, rows.size, step):
            chunk = rows[lo : lo + step]
            which = torch.from_numpy(local[token_node[chunk]])
            h = features[torch.from_numpy(chunk)].float()  # (t, d)
            scores = torch.einsum("td,tfd->tf", h, W[which]) + b[which]  # (t, F)
            G[:, : int(fanout)].index_add_(0, torch.from_numpy(labels[chunk]), scores.log_softmax(-1).double())
    return G.numpy()


def _assign(
    owner: np.ndarray, score: np.ndarray, capacity: np.ndarray, slot_base: np.ndarray, fanout: np.ndarray
) -> np.ndarray:
    """Each class's slot index (into its node's children) under the slots' capacities: batched deferred acceptance.

    Args:
        owner: (C,) the node of each class to place (an index into ``slot_base`` and ``fanout``).
        score: (C, F) each class's score for each child index of its node (higher is better).
        capacity: (S,) how many classes each slot takes; slots ``slot_base[n] .. + fanout[n]`` are node n's.
        slot_base: first slot of each node.
        fanout: each node's number of slots.
    """
    C, F = score.shape
    remaining = capacity.astype(np.int64).copy()
    choice = np.full(C, -1, dtype=np.int64)
    columns = np.arange(F)
    exists = columns[None, :] < fanout[owner][:, None]
    while (choice < 0).any():
        todo = np.flatnonzero(choice < 0)
        slots = slot_base[owner[todo]][:, None] + np.minimum(columns[None, :], fanout[owner[todo]][:, None] - 1)
        open_ = exists[todo] & (remaining[slots] > 0)
        value = np.where(open_, score[todo], -np.inf)
        order = np.argsort(-value, axis=1)
        best = order[:, 0]
        top = value[np.arange(todo.size), best]
        second = value[np.arange(todo.size), order[:, 1]] if F > 1 else np.full(todo.size, -np.inf)
        margin = np.where(np.isfinite(second), top - second, np.inf)
        if not np.isfinite(top).all():
            raise RuntimeError("capacities do not add up to the classes to place")  # cannot happen: sizes are kept
        slot = slot_base[owner[todo]] + best
        ranked = np.lexsort((-margin, slot))  # by slot, the largest margins first
        sorted_slots = slot[ranked]
        first = np.searchsorted(sorted_slots, sorted_slots, side="left")
        rank = np.arange(ranked.size) - first
        accepted = ranked[rank < remaining[sorted_slots]]
        choice[todo[accepted]] = best[accepted]
        np.subtract.at(remaining, slot[accepted], 1)
    return choice


def reassign(
    tree: Tree,
    weights: Mapping[int, tuple[np.ndarray, ...]],
    features: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    dim: int,
    *,
    cost_weight: float = 0.0,
    stay_bonus: float = STAY_BONUS,
) -> Tree:
    """One JTM re-assignment pass: the same shape, each class moved to the leaf slot the trained nodes prefer.

    Args:
        tree: the current tree (no projections).
        weights: ``{node: (W (fanout, d), b (fanout,))}``, its trained nodes (`node_weights`).
        features: (T, d) features of train tokens.
        labels: (T,) their classes.
        counts: (V,) class counts (for the cost term).
        dim: the feature dimension (for the cost term).
        cost_weight: nats per multiply-add per token: how much a slot's cost below counts against its score.
        stay_bonus: nats (summed over a class's tokens) its present slot gets: a class moves only on that much
            evidence, so that classes with few tokens keep the place their embedding gave them.

    Returns:
        A tree with the same children counts at every node, its classes re-assigned.

    Example:
        >>> new = reassign(tree, node_weights(tree, dataset), features, labels, dataset.counts, dataset.dim)
        >>> (new.fanout == tree.fanout).all()
        True
    """
    V = tree.num_classes
    projected = sorted(node for node, value in weights.items() if len(value) > 2)
    if projected:
        raise ValueError(
            f"reassign scores nodes without projections; nodes {projected[:5]} have one "
            "(re-assignment keeps a tree's shape; the adaptive shape is searched by its cutoffs)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    ids, ptr = tree.child_ids, tree.child_ptr
    capacity = np.where(ids >= V, tree.subtree_size[np.maximum(ids - V, 0)], 1)
    below = slot_costs(tree, counts, dim)
    expected = np.asarray(counts, np.float64) + 0.5
    expected = expected / expected.sum() * max(labels.size, 1)  # tokens a class would have in the sample
    path_nodes, path_child, _ = tree.paths()
    new_ids = ids.copy()
    node_of_class = np.zeros(V, dtype=np.int64)  # every class starts at the root
    for depth in range(int(tree.node_depth.max()) + 1):
        nodes = np.flatnonzero(tree.node_depth == depth)
        placed = np.flatnonzero(node_of_class >= 0)
        if placed.size == 0:
            break
        placed = placed[tree.node_depth[node_of_class[placed]] == depth]
        G = _level_scores(tree, weights, nodes, node_of_class, features, labels)[placed]
        owner = node_of_class[placed]
        F = G.shape[1]
        columns = np.arange(F)
        slots = ptr[owner][:, None] + np.minimum(columns[None, :], tree.fanout[owner][:, None] - 1)
        G = G - cost_weight * expected[placed][:, None] * below[slots]
        # the slot each class is in now: its original path's child at this node, when the node is on that path
        if depth < path_nodes.shape[1]:
            here = (path_nodes[placed, depth] == owner) & (path_child[placed, depth] >= 0)
            G[here, path_child[placed[here], depth]] += stay_bonus
        choice = _assign(owner, G, capacity, ptr[:-1].astype(np.int64), tree.fanout.astype(np.int64))
        slot = ptr[owner] + choice
        target = ids[slot]
        is_leaf = target < V
        new_ids[slot[is_leaf]] = placed[is_leaf]
        node_of_class[placed[is_leaf]] = -1
        node_of_class[placed[~is_leaf]] = target[~is_leaf] - V
    return Tree.from_csr(V, ptr, new_ids)


class JTMSearcher(Searcher):
    """Alternating re-assignment (JTM-style) from the split grammar's classic trees, under a cost cap."""

    name = "jtm"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        config: TreeEnvConfig,
        *,
        seconds: float | None = None,
        seed: int = 0,
        device: str | None = None,
        start_share: float = 1 / 3,
        score_tokens: int = 100_000,
    ) -> None:
        """Args: evaluator: rewards and budget; dataset: features; config: the split grammar and the cost cap."""
        super().__init__(None, evaluator, seconds=seconds, seed=seed)
        self.dataset, self.config, self.start_share = dataset, config, start_share
        self.score_tokens = score_tokens  # train tokens whose scores re-assign the classes
        self.device = default_device() if device is None else torch.device(device)
        self.counts = dataset.class_weights
        self.embeddings = normalise_embeddings(class_embeddings(dataset))
        self.cost_model = resolve_cost(config.cost, dim=dataset.dim, device_type=default_device().type, dataset=dataset)
        self.cap = config.cost_cap * huffman_cost(dataset, self.cost_model) if config.cost_mode == "cap" else math.inf
        self.decode_cap = decode_cap_for(config.cost, config.decode_cap, dataset)  # None: no cap on decoding time
        self._splits = SplitCache()
        self.rounds: list[tuple[int, int, float]] = []  # (chain, round, valid NLL) of every re-assignment round

    def _cost(self, tree: Tree) -> float:
        return head_cost(tree, self.counts, self.dataset.dim, model=self.cost_model)

    def _fits(self, tree: Tree) -> bool:
        """Whether ``tree`` is within the cost cap and, under a decoding cap, its predicted decoding time too."""
        return self._cost(tree) <= self.cap and (self.decode_cap is None or self.decode_cap.admits(tree))

    def start_trees(self) -> list[Tree]:
        """The split grammar's homogeneous (classic) trees within the cap(s), the costliest first."""
        trees: dict[str, tuple[float, Tree]] = {}
        for rule in split_rules(self.config.fanouts):
            if rule.flat:
                continue
            tree = plan_tree(self.counts, self.embeddings, Plan(rule), seed=self.config.seed, cache=self._splits,
                             leaf_size=self.config.split_leaf_size, head_max=self.config.split_head_max)  # fmt: skip
            if tree.num_internal > 1 and self._fits(tree):
                trees.setdefault(tree.canonical_hash, (self._cost(tree), tree))
        return [tree for _, tree in sorted(trees.values(), key=lambda item: -item[0])]

    def refine(self, tree: Tree, stay: float = STAY_BONUS) -> Tree | None:
        """One round: the tree's trained nodes re-assign its classes; the cost term keeps it within the cap.

        Under a decoding cap the new tree must fit it too (the cost term prices training cost only); a round
        whose every cost weight tried misses either cap ends the chain.
        """
        recipe = self.config.train
        weights = self.evaluator.node_weights(tree)  # the evaluator's recipe and node bank
        sample = split_sample(self.dataset, "train", recipe.train_tokens, recipe.seed, self.device)
        rows = min(self.score_tokens, sample.labels.size)  # the sample is in random order: its head is a sample
        features, labels = sample.features[:rows].float().cpu(), sample.labels[:rows]

        def attempt(lam: float) -> tuple[Tree, bool]:
            new = reassign(tree, weights, features, labels, self.counts, self.dataset.dim, cost_weight=lam,
                           stay_bonus=stay)  # fmt: skip
            return new, self._fits(new)

        new, fits = attempt(0.0)
        if fits:
            return new
        low, high = 0.0, 1e-6
        best, fits = attempt(high)  # the tree of the smallest cost weight known to fit
        while not fits:
            low, high = high, high * 8
            if high > 1.0:
                return None
            best, fits = attempt(high)
        for _ in range(5):  # bisection in log scale between a tree over the cap and one within it
            middle = math.sqrt(low * high) if low > 0 else high / 8
            new, fits = attempt(middle)
            if fits:
                high, best = middle, new
            else:
                low = middle
        return best

    def search(self) -> Iterator[Evaluation]:
        """Evaluate the starting trees, then re-assignment rounds; yield each counted evaluation."""
        known: dict[str, tuple[float, Tree]] = {}
        tried: set[str] = set()
        try:
            starts = self.start_trees()
            left = self.evaluator.remaining
            limit = max(1, int(left * self.start_share)) if left is not None else len(starts)
            for tree in starts[:limit]:
                if self.done:
                    return
                evaluation = self.evaluator.evaluate(tree, searcher=self.label)
                if evaluation.ok:
                    known[tree.canonical_hash] = (evaluation.valid_nll, tree)
                if evaluation.counted:
                    yield evaluation
            chain = 0
            while not self.done:
                fresh = [(nll, tree) for key, (nll, tree) in known.items() if key not in tried]
                if not fresh:
                    return
                nll, tree = min(fresh, key=lambda item: item[0])
                chain += 1
                for round_ in range(1, 1_000):
                    tried.add(tree.canonical_hash)
                    if self.done:
                        return
                    new = self.refine(tree)
                    if new is None or new.canonical_hash in known or new.canonical_hash in tried:
                        break
                    evaluation = self.evaluator.evaluate(new, searcher=self.label)
                    if evaluation.counted:
                        yield evaluation
                    if not evaluation.ok:
                        break
                    known[new.canonical_hash] = (evaluation.valid_nll, new)
                    self.rounds.append((chain, round_, evaluation.valid_nll))
                    if evaluation.valid_nll >= nll:
                        tried.add(new.canonical_hash)
                        break
                    nll, tree = evaluation.valid_nll, new
        except BudgetExhausted:
            return
