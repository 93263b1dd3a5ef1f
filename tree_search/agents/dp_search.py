"""`DPSearcher`: the best tree of the split grammar under a cost cap, by dynamic programming over node losses.

The node-exact reward makes a tree's validation NLL a sum over its nodes, and the split
grammar (`tree_search.split_grammar`) makes a group's subtree depend only on the group and
its rule. So for a root split ``r`` into parts ``P_1..P_k``, the loss and the cost of a tree
that completes each part ``P_i`` by its own rule ``c_i`` are

    NLL = root(r) + sum_i L(P_i, c_i),     cost = root_cost(r) + sum_i C(P_i, c_i),

and the best choice of ``c_1..c_k`` under a cap is a multiple-choice knapsack, solved by
Lagrangian relaxation (each part independently minimises ``L + lambda C``; ``lambda`` by
bisection). Every ``L(P_i, c)`` is measured once: the tree that completes *all* parts of
``r`` by ``c`` is evaluated (through the evaluator, so it counts against the budget like any
searcher's tree), and its nodes' losses are read from the node bank, summed per part.

The search, within its budget:

1. root rules whose cheapest completion fits under the cap (costs need no training),
   costliest first, each measured by its homogeneous tree when that fits the cap, else
   completed by 3-ary Huffman subtrees, the cheapest completion (at most half the budget);
2. root rules in order of their best measured objective at the cap, each completion rule
   measured in turn (Huffman of fanouts 2-4, k-means of fanouts 2-16, head-and-tail, ...);
3. after each root rule is complete, the knapsack's tree for the cap is evaluated (its
   nodes are all in the bank, so it trains nothing; the prediction is checked against the
   evaluation).

Costs are computed from the trees alone (no training), so a completion measured for one
cap serves every cap, and a front search (several caps) pays for each tree once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from tree_search.agents.base import Searcher
from tree_search.cost import head_cost, node_costs
from tree_search.data.features import FeatureDataset, class_embeddings, default_device
from tree_search.envs.config import TreeEnvConfig
from tree_search.heads.evaluator import BudgetExhausted, Evaluation, Evaluator
from tree_search.heads.reward import huffman_cost, node_nll_shares
from tree_search.heads.timing import resolve_cost
from tree_search.split_grammar import (
    Plan,
    SplitRule,
    huffman_rule,
    normalise_embeddings,
    plan_tree,
    split_group,
    split_rules,
)
from tree_search.tree import Tree

__all__ = ["DPSearcher", "choose_completions"]


@dataclass
class _Measured:
    """One root rule: its parts, and per completion rule the loss and cost of each part's subtree."""

    rule: SplitRule
    parts: list[int]  # indices (into the root split's parts) of the parts with more than one class
    members: list[np.ndarray]  # the root split's parts
    root_loss: float = math.nan
    root_cost: float = math.nan
    loss: dict[SplitRule, np.ndarray] = field(default_factory=dict)  # completion -> (parts,) NLL share per part
    cost: dict[SplitRule, np.ndarray] = field(default_factory=dict)  # completion -> (parts,) cost share per part


def choose_completions(
    loss: np.ndarray, cost: np.ndarray, budget: float, iterations: int = 60
) -> tuple[np.ndarray, float, float] | None:
    """The completion of each part minimising the summed loss with summed cost at most ``budget``.

    Args:
        loss: (options, parts) loss of each option for each part (NaN: not measured).
        cost: (options, parts) their costs (NaN: not measured).
        budget: the cost left for the parts.
        iterations: bisection steps on the Lagrange multiplier.

    Returns:
        ``(choice (parts,), loss, cost)``, or None when even the cheapest choice exceeds the budget.
        Lagrangian relaxation: exact at the ``lambda`` found, up to the duality gap of the knapsack.
    """
    loss = np.where(np.isnan(loss), np.inf, loss)
    cost = np.where(np.isnan(cost), np.inf, cost)
    cheapest = cost.argmin(0)
    columns = np.arange(loss.shape[1])
    if cost[cheapest, columns].sum() > budget * (1 + 1e-12):
        return None

    def pick(lam: float) -> np.ndarray:
        return np.argmin(loss + lam * cost, axis=0)

    choice = pick(0.0)
    if cost[choice, columns].sum() <= budget:
        return choice, float(loss[choice, columns].sum()), float(cost[choice, columns].sum())
    low, high = 0.0, 1.0
    while cost[pick(high), columns].sum() > budget:
        high *= 4
        if high > 1e30:
            choice = cheapest
            return choice, float(loss[choice, columns].sum()), float(cost[choice, columns].sum())
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if cost[pick(middle), columns].sum() > budget:
            low = middle
        else:
            high = middle
    choice = pick(high)
    # Spend what the relaxation leaves: upgrade single parts while the budget allows (greedy by loss saved).
    while True:
        spent = cost[choice, columns].sum()
        gain = loss[choice, columns][None, :] - loss
        extra = cost - cost[choice, columns][None, :]
        allowed = (gain > 0) & (extra <= budget - spent)
        if not allowed.any():
            break
        option, part = np.unravel_index(np.argmax(np.where(allowed, gain, -np.inf)), loss.shape)
        choice[part] = option
    # Never worse than one option for every part (the relaxation's duality gap could be)
    uniform = [o for o in range(loss.shape[0]) if cost[o].sum() <= budget]
    if uniform:
        o = min(uniform, key=lambda o: loss[o].sum())
        if loss[o].sum() < loss[choice, columns].sum():
            choice = np.full(loss.shape[1], o)
    return choice, float(loss[choice, columns].sum()), float(cost[choice, columns].sum())


class DPSearcher(Searcher):
    """Dynamic programming over the split grammar's completions, with node losses from the bank."""

    name = "dp"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        config: TreeEnvConfig,
        *,
        seconds: float | None = None,
        seed: int = 0,
        device: str | None = None,
        use_bank: bool = True,
    ) -> None:
        """Args: evaluator: rewards and budget; dataset: features; config: the split grammar and the cost cap."""
        super().__init__(None, evaluator, seconds=seconds, seed=seed)
        self.dataset, self.config, self.use_bank = dataset, config, use_bank
        self.device = default_device() if device is None else torch.device(device)  # the bank is per device
        counts = np.asarray(dataset.counts, dtype=np.float64)
        self.counts = counts if counts.sum() > 0 else np.ones(dataset.num_classes)
        self.embeddings = normalise_embeddings(class_embeddings(dataset))
        self.dim = dataset.dim
        self.cost_model = resolve_cost(config.cost, dim=dataset.dim, device_type=default_device().type)
        self.cap = config.cost_cap * huffman_cost(dataset, self.cost_model)
        rules = [r for r in split_rules(config.fanouts) if not r.flat]
        self.root_rules = [r for r in rules if r.order in ("kmeans", "pca") or r.cut == "headtail"]
        # completions in order of promise: the cheapest (Huffman), then clusters of growing fanout, then the rest
        clusters = sorted((r for r in rules if r.order in ("kmeans", "pca")), key=lambda r: (r.fanout, r.order, r.cut))
        self.completions = [huffman_rule(k) for k in (2, 3, 4)] + clusters
        self.completions += [r for r in rules if r not in self.completions]
        self.measured: dict[SplitRule, _Measured] = {}
        self._splits: dict = {}  # group splits by (rule, content), shared by all trees of the search
        self.predictions: list[tuple[float, float]] = []  # (predicted NLL, evaluated NLL) of knapsack trees

    # ------------------------------------------------------------------ building and measuring
    def _tree(self, root: SplitRule, completion: dict[int, SplitRule] | SplitRule) -> Tree:
        parts = self._parts(root).parts
        chosen = completion if isinstance(completion, dict) else dict.fromkeys(parts, completion)
        plan = Plan(root, {i: Plan(rule) for i, rule in chosen.items()})
        return plan_tree(self.counts, self.embeddings, plan, seed=self.config.seed, cache=self._splits,
                         leaf_size=self.config.split_leaf_size, head_max=self.config.split_head_max)  # fmt: skip

    def _parts(self, rule: SplitRule) -> _Measured:
        if rule not in self.measured:
            everything = np.arange(self.counts.size)
            _, parts = split_group(everything, rule, self.counts, self.embeddings, seed=self.config.seed,
                                   head_max=self.config.split_head_max, cache=self._splits)  # fmt: skip
            self.measured[rule] = _Measured(rule, [i for i, p in enumerate(parts) if p.size > 1], parts)
        return self.measured[rule]

    def _node_values(self, tree: Tree) -> tuple[np.ndarray, np.ndarray]:
        """(I,) each node's NLL share and cost share, from the bank (the evaluator has just trained them)."""
        shares, _ = node_nll_shares(tree, self.dataset, self.config.train, seeds=self.config.seeds,
                                    device=self.device, use_bank=self.use_bank)  # fmt: skip
        return shares, node_costs(tree, self.counts, self.dim, model=self.cost_model)

    def _measure(self, root: SplitRule, completion: SplitRule) -> Evaluation | None:
        """Evaluate the tree completing every part of ``root`` by ``completion``; record its per-part values."""
        entry = self._parts(root)
        if completion in entry.loss:
            return None
        tree = self._tree(root, completion)
        evaluation = self.evaluator.evaluate(tree, searcher=self.label)
        if not evaluation.ok:
            entry.loss[completion] = np.full(len(entry.parts), math.nan)
            entry.cost[completion] = np.full(len(entry.parts), math.nan)
            return evaluation
        loss, cost = self._node_values(tree)
        # the root's children that are internal nodes, in the order of the root split's parts (by smallest member)
        kids = [c - tree.num_classes for c in tree.children(0) if c >= tree.num_classes]
        smallest = {int(tree.min_leaf[node]): node for node in kids}
        nodes = [smallest[int(entry.members[i].min())] for i in entry.parts]
        assert all(tree.subtree_size[n] == entry.members[i].size for n, i in zip(nodes, entry.parts, strict=True))
        entry.root_loss, entry.root_cost = float(loss[0]), float(cost[0])
        entry.loss[completion] = tree.node_subtree_sums(loss)[nodes]  # each part's whole subtree
        entry.cost[completion] = tree.node_subtree_sums(cost)[nodes]
        return evaluation

    # ------------------------------------------------------------------ the search
    def _knapsack(self, entry: _Measured) -> tuple[dict[int, SplitRule], float] | None:
        """The best measured completion of each part of ``entry`` within the cap, and the tree's predicted NLL."""
        if not entry.loss or math.isnan(entry.root_loss):
            return None
        options = list(entry.loss)
        best = choose_completions(np.stack([entry.loss[o] for o in options]),
                                  np.stack([entry.cost[o] for o in options]), self.cap - entry.root_cost)  # fmt: skip
        if best is None:
            return None
        choice, loss, _ = best
        return {part: options[c] for part, c in zip(entry.parts, choice, strict=True)}, entry.root_loss + loss

    def _objective(self, entry: _Measured) -> float:
        """The best NLL the measured completions of ``entry`` reach within the cap (inf: none fits)."""
        best = self._knapsack(entry)
        return math.inf if best is None else best[1]

    def _combine(self, entry: _Measured) -> Evaluation | None:
        """Evaluate the knapsack's tree of ``entry`` at the cap (nothing new to train)."""
        best = self._knapsack(entry)
        if best is None:
            return None
        completions, predicted = best
        tree = self._tree(entry.rule, completions)
        evaluation = self.evaluator.evaluate(tree, searcher=self.label)
        if evaluation.ok:
            self.predictions.append((predicted, evaluation.valid_nll))
        return evaluation

    def search(self) -> Iterator[Evaluation]:
        """Measure, combine, and yield each counted evaluation, until the budget is used."""
        try:
            # Costs need no training: root rules whose cheapest completion (3-ary Huffman) is over the cap are out.
            cheap = huffman_rule(3)
            cheapest = {r: head_cost(self._tree(r, cheap), self.counts, self.dim, model=self.cost_model)
                        for r in self.root_rules}  # fmt: skip
            # the costliest first: a wider root split buys more loss for its cost
            feasible = sorted((r for r in self.root_rules if cheapest[r] <= self.cap), key=lambda r: -cheapest[r])
            # At most half the budget ranks root rules, each by its homogeneous tree when that fits the cap (a classic
            # candidate itself), else completed by 3-ary Huffman; the rest of the budget completes the best of them.
            left = self.evaluator.remaining
            feasible = feasible[: max(2, left // 2)] if left is not None else feasible
            for root in feasible:
                if self.done:
                    return
                fits = head_cost(self._tree(root, root), self.counts, self.dim, model=self.cost_model) <= self.cap
                evaluation = self._measure(root, root if fits else cheap)
                if evaluation is not None and evaluation.counted:
                    yield evaluation
            while not self.done:
                ranked = sorted(feasible, key=lambda r: self._objective(self.measured[r]))
                pending = [(r, c) for r in ranked for c in self.completions if c not in self.measured[r].loss]
                if not pending:
                    break
                root = pending[0][0]
                todo = [c for r, c in pending if r == root]
                for number, completion in enumerate(todo, start=1):
                    if self.done:
                        return
                    evaluation = self._measure(root, completion)
                    if evaluation is not None and evaluation.counted:
                        yield evaluation
                    if (number % 4 == 0 or number == len(todo)) and not self.done:  # the best tree known so far
                        evaluation = self._combine(self.measured[root])
                        if evaluation is not None and evaluation.counted:
                            yield evaluation
        except BudgetExhausted:
            return
