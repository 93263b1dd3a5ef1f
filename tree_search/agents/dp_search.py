"""`DPSearcher`: the best tree of the split grammar under a cost cap, by dynamic programming over node losses.

The node-exact reward makes a tree's validation NLL a sum over its nodes, and the split
grammar (`tree_search.split_grammar`) makes a group's subtree depend only on the group and
its rule. So for a root split ``r`` into parts ``P_1..P_k``, the loss and the cost of a tree
that completes each part ``P_i`` by its own rule ``c_i`` are

    NLL = root(r) + sum_i L(P_i, c_i),     cost = root_cost(r) + sum_i C(P_i, c_i),

and the best choice of ``c_1..c_k`` under a cap is a multiple-choice knapsack, solved exactly
(`choose_completions`: dynamic programming over the Pareto front of partial choices). So dp
is optimal over a two-level grammar: one root rule, and for each of its parts one completion
rule applied recursively inside it (a homogeneous subtree), among the completions it measured;
it is not optimal over deeper plans (a rule per part of a part).

Every ``L(P_i, c)`` is measured once: the tree that completes *all* parts of
``r`` by ``c`` is evaluated (through the evaluator, so it counts against the budget like any
searcher's tree), and its nodes' shares of the loss come from the evaluator (`Evaluator.node_shares`: its
node bank, under its recipe and seeds), summed per part.

The search, within its budget:

0. the whole k-ary Huffman trees of the classic front that fit the caps and cost nothing (the
   baselines evaluated them): the grammar's roots split first, so it cannot express them;
1. root rules whose cheapest homogeneous completion (3-ary Huffman or a flat node,
   projected or not) fits under the cap (costs need no training), widest first (costliest
   with 3-ary Huffman tails; in decoding time, where wide roots are fast, most
   multiply-adds), each measured by its homogeneous tree when that fits the cap (for the
   adaptive softmax's cutoffs, PyTorch's tree: tail i projected to ``d / 4**(i+1)``; for
   the frequency cutoffs, unprojected flat tails), else by that cheapest completion (at
   most half the budget);
2. root rules in order of their best measured objective at the cap, each completion rule
   measured in turn (Huffman of fanouts 2-4, k-means of fanouts 2-16, head-and-tail, ...,
   flat nodes projected to d/16 or d/4 or not projected; for a root cut in frequency order
   the flat nodes right after Huffman), except those that fit no part under the cap;
3. after each root rule is complete, the knapsack's tree for the cap is evaluated (its
   nodes are all in the bank, so it trains nothing; the prediction is checked against the
   evaluation).

With a prior (`RulePrior`, e.g. a learned policy: ``search --agent dp --prior``) step 1 takes
the root rules in the prior's order and ranks only the first `PRIOR_ROOTS` of them before
step 2 (the others one at a time, in that order, whenever the ranked ones are complete), and
step 2 measures each root's completions in the prior's order.

The root rules are the split environment's (k-means, PCA, head-and-tail) plus the root
splits of the adaptive softmax shapes users know (`ADAPTIVE_SHAPES`: PyTorch's usual cutoffs
and Grave et al.'s) and of the frequency cutoffs (`CUTOFF_SHAPES`, unprojected tails), so the
search space holds those trees and their variants.

Costs are computed from the trees alone (no training), so a completion measured for one
cap serves every cap, and a front search (several caps) pays for each tree once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tree_search.agents.base import Searcher
from tree_search.builders import CLASSIC_SETS, CUTOFF_SHAPES, classic_trees
from tree_search.cost import DecodeCost, head_cost, node_costs
from tree_search.data.features import FeatureDataset, class_embeddings, default_device
from tree_search.envs.config import TreeEnvConfig
from tree_search.heads.timing import resolve_cost
from tree_search.reward.decode_cap import decode_cap_for
from tree_search.reward.evaluator import BudgetExhausted, Evaluation, Evaluator, evaluation_key
from tree_search.reward.reward import huffman_cost
from tree_search.split_grammar import (
    FLAT,
    HUFFMAN_FANOUTS,
    Plan,
    SplitCache,
    SplitRule,
    classic_root_rules,
    huffman_rule,
    normalise_embeddings,
    plan_head,
    projected_flat,
    split_group,
    split_rules,
)
from tree_search.tree import Tree

__all__ = ["PRIOR_ROOTS", "DPCaches", "DPSearcher", "RulePrior", "choose_completions"]

_RECENT_TREES = 8  # whole trees a search keeps built (at V = 100k, each took 0.2-2 s to build)


@dataclass
class _Measured:
    """One root rule: its parts, and per completion rule the loss and cost of each part's subtree."""

    rule: SplitRule
    parts: list[int]  # indices (into the root split's parts) of the parts with more than one class
    members: list[np.ndarray]  # the root split's parts
    root_cost: float = math.nan
    root_halves: np.ndarray = field(default_factory=lambda: np.full(2, math.nan))  # the root's NLL share per half
    cost: dict[SplitRule, np.ndarray] = field(default_factory=dict)  # completion -> (parts,) cost share per part
    halves: dict[SplitRule, np.ndarray] = field(default_factory=dict)  # completion -> (2, parts) NLL share per half
    tried: set[SplitRule] = field(default_factory=set)  # completions measured on every part, or found unable to fit
    # under a decoding cap: the root's and each part's share of the predicted decoding time (a forecast: a part's
    # scored pairs depend on the rest of the tree), per completion as ``cost``
    decode_root: float = math.nan
    decode: dict[SplitRule, np.ndarray] = field(default_factory=dict)


def choose_completions(loss: np.ndarray, cost: np.ndarray, budget: float) -> tuple[np.ndarray, float, float] | None:
    """The completion of each part minimising the summed loss with summed cost at most ``budget``: exact.

    A multiple-choice knapsack, solved by dynamic programming over the parts: after each part,
    only the partial choices on the Pareto front of (cost, loss) are kept (a partial choice
    that costs more and loses more than another can never complete to a better whole, since
    the remaining parts add the same costs and losses to both), none whose cost plus the
    cheapest completion of the remaining parts exceeds the budget, and none whose loss plus the
    lowest loss of the remaining parts exceeds that of a good feasible choice found first
    (`_lagrangian_choice`). Each rule only drops partial choices the optimum cannot extend, so
    the result is exact, with no discretised cost.

    Args:
        loss: (options, parts) loss of each option for each part (NaN: not measured).
        cost: (options, parts) their costs (NaN: not measured).
        budget: the cost left for the parts.

    Returns:
        ``(choice (parts,), loss, cost)``, or None when even the cheapest choice exceeds the budget.
    """
    unmeasured = np.isnan(loss) | np.isnan(cost)
    loss = np.where(unmeasured, np.inf, loss)
    cost = np.where(unmeasured, np.inf, cost)
    parts = loss.shape[1]
    limit = budget * (1 + 1e-12)
    # the cheapest completion of parts j.. (for pruning partial choices that cannot fit)
    rest = np.append(np.cumsum(cost.min(0)[::-1])[::-1], 0.0)
    if rest[0] > limit:
        return None
    incumbent = _lagrangian_choice(loss, cost, budget)
    bound = loss[incumbent, np.arange(parts)].sum()
    bound += 1e-12 * abs(bound)  # never drop the incumbent itself to rounding
    rest_loss = np.append(np.cumsum(loss.min(0)[::-1])[::-1], 0.0)
    front_cost, front_loss = np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []  # per part: (state's previous state, its option)
    for j in range(parts):
        options = np.flatnonzero(np.isfinite(cost[:, j]) & np.isfinite(loss[:, j]))
        new_cost = (front_cost[:, None] + cost[options, j][None, :]).ravel()
        new_loss = (front_loss[:, None] + loss[options, j][None, :]).ravel()
        previous = np.repeat(np.arange(front_cost.size), options.size)
        option = np.tile(options, front_cost.size)
        fits = (new_cost + rest[j + 1] <= limit) & (new_loss + rest_loss[j + 1] <= bound)
        new_cost, new_loss, previous, option = new_cost[fits], new_loss[fits], previous[fits], option[fits]
        order = np.lexsort((new_loss, new_cost))  # by cost, then loss
        running = np.minimum.accumulate(new_loss[order])
        keep = order[np.concatenate([[True], new_loss[order][1:] < running[:-1]])]  # strictly better than cheaper
        front_cost, front_loss = new_cost[keep], new_loss[keep]
        parents.append(np.stack([previous[keep], option[keep]]))
    state = int(np.argmin(front_loss))
    total_loss, total_cost = float(front_loss[state]), float(front_cost[state])
    choice = np.empty(parts, dtype=np.int64)
    for j in range(parts - 1, -1, -1):
        state, choice[j] = int(parents[j][0, state]), int(parents[j][1, state])
    return choice, total_loss, total_cost


def choose_completions_within(
    loss: np.ndarray, cost: np.ndarray, budget: float, second: np.ndarray, second_budget: float
) -> tuple[np.ndarray, float, float] | None:
    """`choose_completions` under a second budget too (``second``: each option's share of another cost).

    A Lagrangian relaxation of the second budget: each option's loss gains ``lam`` x its share
    of ``second_budget``, and ``lam`` rises from 0 (bisected) until the exact knapsack's choice
    fits both. Whenever some choice fits both, one is found (at a high enough price the choice
    spends the least of the second cost that the first budget allows); it need not be the
    best such choice (the relaxation's duality gap). Options with NaN ``second`` are unmeasured.

    Returns:
        ``(choice, loss, cost)`` as `choose_completions` (the loss without the price), or None.
    """
    if second_budget <= 0:
        return None
    share = second / second_budget
    columns = np.arange(loss.shape[1])

    def solve(lam: float) -> tuple[np.ndarray, float, float] | None:
        return choose_completions(loss + lam * share, cost, budget)  # NaN shares: unmeasured at every price

    def fits(found) -> bool:
        return found is not None and share[found[0], columns].sum() <= 1 + 1e-9

    def plain(found) -> float:
        return float(loss[found[0], columns].sum())

    best = solve(0.0)
    if best is None:
        return None
    if not fits(best):
        low, high = 0.0, 1e-3
        while not fits(best := solve(high)):
            if best is None or high > 1e12:
                return None
            low, high = high, high * 4
        for _ in range(30):  # down to the smallest price (to 2^-30 of the bracket) whose choice fits
            middle = 0.5 * (low + high)
            trial = solve(middle)
            if fits(trial):
                high = middle
                if plain(trial) <= plain(best):  # the best fitting choice any price gave
                    best = trial
            else:
                low = middle
    choice = best[0].copy()
    # Spend what the relaxation leaves: upgrade single parts while both budgets allow (greedy by loss saved)
    safe_loss, safe_share = np.where(np.isnan(share), np.inf, loss), np.where(np.isnan(share), np.inf, share)
    while True:
        gain = loss[choice, columns][None, :] - safe_loss
        more_cost = cost - cost[choice, columns][None, :]
        more_share = safe_share - share[choice, columns][None, :]
        allowed = ((gain > 0) & (more_cost <= budget * (1 + 1e-12) - cost[choice, columns].sum())
                   & (more_share <= 1 + 1e-9 - share[choice, columns].sum()))  # fmt: skip
        if not allowed.any():
            break
        option, part = np.unravel_index(np.argmax(np.where(allowed, gain, -np.inf)), loss.shape)
        choice[part] = option
    return choice, float(loss[choice, columns].sum()), float(cost[choice, columns].sum())


def _lagrangian_choice(loss: np.ndarray, cost: np.ndarray, budget: float, iterations: int = 60) -> np.ndarray:
    """A good feasible choice, fast (Lagrangian relaxation, greedy upgrades): the bound `choose_completions` prunes by.

    ``loss`` and ``cost`` hold inf where unmeasured; the cheapest choice must fit the budget.
    """
    cheapest = cost.argmin(0)
    columns = np.arange(loss.shape[1])

    def pick(lam: float) -> np.ndarray:
        return np.argmin(loss + lam * cost, axis=0)

    choice = np.argmin(loss, axis=0)
    if cost[choice, columns].sum() <= budget:
        return choice
    low, high = 0.0, 1.0
    while cost[pick(high), columns].sum() > budget:
        high *= 4
        if high > 1e30:
            return cheapest
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
    return choice


@dataclass
class DPCaches:
    """What the `DPSearcher`s of a run's caps share: group splits and whole trees' costs.

    Both are pure functions of the seed, the data and the cost model, which the caps share.
    """

    splits: SplitCache = field(default_factory=SplitCache)
    costs: dict[tuple, float] = field(default_factory=dict)


class RulePrior(Protocol):
    """What dp asks a prior (a learned policy, `tree_search.agents.imitation.PolicyPrior`): orders of preference."""

    def root_order(self, roots: Sequence[SplitRule]) -> list[SplitRule]:
        """``roots`` (dp's feasible root rules), most promising first."""
        ...

    def completion_order(self, root: SplitRule, completions: Sequence[SplitRule]) -> list[SplitRule]:
        """``completions`` of ``root``'s parts, most promising first."""
        ...


PRIOR_ROOTS = 3  # with a prior, the root rules ranked by a measurement before dp completes the best of them


class DPSearcher(Searcher):
    """Dynamic programming over the split grammar's completions, with each node's loss from the evaluator."""

    name = "dp"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        config: TreeEnvConfig,
        *,
        seconds: float | None = None,
        seed: int = 0,
        caches: DPCaches | None = None,
        prior: RulePrior | None = None,
    ) -> None:
        """Args: evaluator: rewards, budget, node shares; dataset: features; config: the grammar and the cost cap.

        ``caches``: splits and costs shared with the searchers of the run's other caps (`DPCaches`).
        ``prior``: orders the root rules and each root's completions (None: widest roots first, and
        the completions in `_completion_order`'s fixed order). With a prior only its first
        `PRIOR_ROOTS` feasible roots are ranked by a measurement before the best of them is
        completed; the others are measured, in the prior's order, once those are complete.
        """
        super().__init__(None, evaluator, seconds=seconds, seed=seed)
        self.dataset, self.config = dataset, config
        self.counts = dataset.class_weights
        self.embeddings = normalise_embeddings(class_embeddings(dataset))
        self.dim = dataset.dim
        self.cost_model = resolve_cost(config.cost, dim=dataset.dim, device_type=default_device().type, dataset=dataset)
        self.cap = config.cost_cap * huffman_cost(dataset, self.cost_model)
        self.decode_cap = decode_cap_for(config.cost, config.decode_cap, dataset)  # None: no cap on decoding time
        rules = [r for r in split_rules(config.fanouts) if not r.flat]
        # the adaptive softmax's root splits (its cutoffs and Grave et al.'s; with projected flat tails, its own trees)
        # and the frequency cutoffs' (with unprojected flat tails, theirs)
        roots = classic_root_rules(self.counts, self.dim)
        self._unprojected_roots = {rule for name, rule in roots.items() if name in CUTOFF_SHAPES}
        cutoffs = list(dict.fromkeys(roots.values()))
        self.root_rules = [r for r in rules if r.order in ("kmeans", "pca") or r.cut == "headtail"] + cutoffs
        # completions in order of promise: the cheapest (Huffman), then clusters of growing fanout, then the rest
        clusters = sorted((r for r in rules if r.order in ("kmeans", "pca")), key=lambda r: (r.fanout, r.order, r.cut))
        self.huffmans = [huffman_rule(k) for k in HUFFMAN_FANOUTS if k <= 4]
        # under a decoding cap, wide Huffman tails too: they train nearly as fast and decode several times faster
        self.huffmans += [huffman_rule(k) for k in HUFFMAN_FANOUTS if k > 4] if self.decode_cap is not None else []
        # flat nodes, projected as the adaptive softmax's tail clusters are (PyTorch's div_value 4), and not
        self.flats = list(dict.fromkeys([projected_flat(max(1, self.dim // 16)), projected_flat(max(1, self.dim // 4)),
                                         FLAT]))  # fmt: skip
        others = [r for r in rules if r not in clusters]
        self.completions = list(dict.fromkeys(self.huffmans + clusters + others + self.flats))
        # whole k-ary Huffman trees: the grammar's roots split first (k-means, PCA, head-and-tail, cutoffs), so it
        # cannot express them, though in training and decoding time wide Huffman trees are strong cheap classics
        self.whole_huffmans = tuple(name for name in CLASSIC_SETS["front"] if name.startswith("huffman-"))
        self.measured: dict[SplitRule, _Measured] = {}
        caches = caches or DPCaches()
        self._splits = caches.splits  # group splits by (rule, content), shared by all trees of the search
        # the trees built last: costing a completion (`_may_fit`) and then measuring it build the same tree
        self._trees: OrderedDict[tuple, tuple[Tree, dict[int, int]]] = OrderedDict()
        self._costs = caches.costs  # whole trees' costs by `_key`
        self._cheapest: dict[SplitRule, tuple[SplitRule, float]] | None = None  # per root rule: (completion, cost)
        self.predictions: list[tuple[float, float, Tree]] = []  # (predicted NLL, evaluated NLL, tree) of knapsack trees
        self.prior = prior
        self._prior_orders: dict[SplitRule, list[SplitRule]] = {}  # root -> the prior's order of its completions

    def _completion_order(self, root: SplitRule) -> list[SplitRule]:
        """The completions of ``root``'s parts in order of promise.

        The parts of a cut in frequency order are runs of ever rarer classes, which the adaptive
        softmax scores by one (projected) flat node each: there the flat nodes come right after Huffman.
        """
        if root.cut in ("cutoffs", "headtail"):
            first = self.huffmans + self.flats
            order = first + [c for c in self.completions if c not in first]
        else:
            order = self.completions
        if self.prior is None:
            return order
        if root not in self._prior_orders:
            self._prior_orders[root] = self.prior.completion_order(root, order)
        return self._prior_orders[root]

    # ------------------------------------------------------------------ building and measuring
    def _tree(self, root: SplitRule, completion: dict[int, SplitRule] | SplitRule) -> tuple[Tree, dict[int, int]]:
        """The tree (and its projections) completing each part of ``root`` by its rule (one rule: every part)."""
        key = self._key(root, completion)
        if key in self._trees:
            self._trees.move_to_end(key)
        else:
            plan = Plan(root, {i: Plan(rule) for i, rule in key[1]})
            self._trees[key] = plan_head(self.counts, self.embeddings, plan, seed=self.config.seed, cache=self._splits,
                                         leaf_size=self.config.split_leaf_size,
                                         head_max=self.config.split_head_max)  # fmt: skip
            if len(self._trees) > _RECENT_TREES:
                self._trees.popitem(last=False)
        tree, projections = self._trees[key]
        return tree, dict(projections)

    def _key(self, root: SplitRule, completion: dict[int, SplitRule] | SplitRule) -> tuple:
        """``(root, ((part, rule), ...))``: what identifies a tree of the search."""
        chosen = completion if isinstance(completion, dict) else dict.fromkeys(self._parts(root).parts, completion)
        return root, tuple(sorted(chosen.items()))

    def _cost(self, root: SplitRule, completion: dict[int, SplitRule] | SplitRule) -> float:
        """The whole tree's cost (no training), remembered."""
        key = self._key(root, completion)
        if key not in self._costs:
            tree, projections = self._tree(root, completion)
            self._costs[key] = head_cost(tree, self.counts, self.dim, projections, self.cost_model)
        return self._costs[key]

    def _macs(self, root: SplitRule, completion: SplitRule) -> float:
        """The whole tree's multiply-adds per token, whatever the search's costs are in (a measure of its width)."""
        tree, projections = self._tree(root, completion)
        return head_cost(tree, self.counts, self.dim, projections)

    def _parts(self, rule: SplitRule) -> _Measured:
        if rule not in self.measured:
            everything = np.arange(self.counts.size)
            _, parts = split_group(everything, rule, self.counts, self.embeddings, seed=self.config.seed,
                                   head_max=self.config.split_head_max, cache=self._splits)  # fmt: skip
            self.measured[rule] = _Measured(rule, [i for i, p in enumerate(parts) if p.size > 1], parts)
        return self.measured[rule]

    def _part_nodes(self, entry: _Measured, tree: Tree) -> list[int]:
        """The root's children that are internal nodes, in the order of ``entry.parts`` (matched by smallest member)."""
        kids = [c - tree.num_classes for c in tree.children(0) if c >= tree.num_classes]
        smallest = {int(tree.min_leaf[node]): node for node in kids}
        nodes = [smallest[int(entry.members[i].min())] for i in entry.parts]
        assert all(tree.subtree_size[n] == entry.members[i].size for n, i in zip(nodes, entry.parts, strict=True))
        return nodes

    def _part_costs(self, root: SplitRule, completion: SplitRule) -> np.ndarray:
        """(parts,) the cost of each part's subtree when completed by ``completion`` (no training), remembered."""
        entry = self._parts(root)
        known = entry.cost.get(completion)
        if known is None or np.isnan(known).any():
            tree, projections = self._tree(root, completion)
            cost = node_costs(tree, self.counts, self.dim, projections, model=self.cost_model)
            entry.root_cost = float(cost[0])
            entry.cost[completion] = tree.node_subtree_sums(cost)[self._part_nodes(entry, tree)]
            if self.decode_cap is not None:  # the decoding forecast needs no training either
                self._record_decoding(entry, tree, projections, dict.fromkeys(entry.parts, completion))
        return entry.cost[completion]

    def _record_decoding(self, entry: _Measured, tree: Tree, projections, chosen: dict[int, SplitRule]) -> None:
        """Each part's (and the root's) share of ``tree``'s predicted decoding time, under its completion rule."""
        decode = node_costs(tree, self.counts, self.dim, projections, model=self.decode_cap.model)
        entry.decode_root = float(decode[0])
        part_decode = tree.node_subtree_sums(decode)[self._part_nodes(entry, tree)]
        for k, part in enumerate(entry.parts):
            entry.decode.setdefault(chosen[part], np.full(len(entry.parts), math.nan))[k] = part_decode[k]

    def _may_fit(self, root: SplitRule, completion: SplitRule) -> bool:
        """Whether some part completed by ``completion``, the others by their cheapest known completion, fits the cap.

        Under a decoding cap, the same part must also fit it with the others at their fastest-decoding known
        completion (a necessary condition: no tree with that part so completed fits both caps otherwise).
        A completion that fits no part never enters the knapsack's choice: measuring it would spend budget for nothing.
        """
        costs, entry = self._part_costs(root, completion), self._parts(root)
        cheapest = np.nanmin(np.stack(list(entry.cost.values())), axis=0)
        slack = self.cap * (1 + 1e-12) - entry.root_cost - cheapest.sum()
        fits = costs - cheapest <= slack
        if self.decode_cap is not None:
            fastest = np.nanmin(np.stack(list(entry.decode.values())), axis=0)
            decode_slack = self.decode_cap.limit * (1 + 1e-9) - entry.decode_root - fastest.sum()
            fits &= entry.decode[completion] - fastest <= decode_slack
        return bool(np.any(fits))

    def _node_values(self, tree: Tree, projections: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(I, 2) each node's NLL share per validation half and (I,) its cost share, from the bank (just trained)."""
        shares = self.evaluator.node_shares(tree, projections)  # the evaluator's recipe, seeds and node bank
        return shares, node_costs(tree, self.counts, self.dim, projections, model=self.cost_model)

    def _measure(self, root: SplitRule, completion: dict[int, SplitRule] | SplitRule) -> Evaluation | None:
        """Evaluate the tree completing the parts of ``root`` by ``completion``; record each part's values.

        ``completion``: one rule for every part (then remembered as tried, measured or not), or a rule per part.
        """
        entry = self._parts(root)
        if isinstance(completion, SplitRule):
            if completion in entry.tried:
                return None
            entry.tried.add(completion)
        chosen = completion if isinstance(completion, dict) else dict.fromkeys(entry.parts, completion)
        tree, projections = self._tree(root, chosen)
        evaluation = self.evaluator.evaluate(tree, projections, searcher=self.label)
        if not evaluation.ok:
            return evaluation
        halves, cost = self._node_values(tree, projections)
        nodes = self._part_nodes(entry, tree)
        entry.root_cost, entry.root_halves = float(cost[0]), halves[0].copy()
        part_cost = tree.node_subtree_sums(cost)[nodes]
        part_halves = np.stack([tree.node_subtree_sums(halves[:, h])[nodes] for h in (0, 1)])  # subtrees
        for k, part in enumerate(entry.parts):
            rule = chosen[part]
            entry.cost.setdefault(rule, np.full(len(entry.parts), math.nan))[k] = part_cost[k]
            entry.halves.setdefault(rule, np.full((2, len(entry.parts)), math.nan))[:, k] = part_halves[:, k]
        if self.decode_cap is not None:
            self._record_decoding(entry, tree, projections, chosen)
        return evaluation

    def _first_completion(
        self, root: SplitRule, first: dict[int, SplitRule] | SplitRule, cheapest: SplitRule
    ) -> dict[int, SplitRule] | SplitRule:
        """The completion that ranks ``root``: ``first`` when it fits the cap, else ``cheapest``.

        Under a decoding cap, the first of them and then of the completions in order of promise
        whose tree fits both caps (costs need no training), so that the ranking tree can stand
        for the root at its caps; ``first`` or ``cheapest`` as before when none does.
        """
        fallback = first if self._cost(root, first) <= self.cap else cheapest
        if self.decode_cap is None:
            return fallback
        for completion in (first, cheapest, *self._completion_order(root)):
            if self._cost(root, completion) <= self.cap and self.decode_cap.admits(*self._tree(root, completion)):
                return completion
        return fallback

    def _adaptive_completion(self, root: SplitRule) -> dict[int, SplitRule]:
        """The classic shape's own tails of a cutoffs root: unprojected flat nodes, or PyTorch's projections.

        The frequency cutoffs' roots keep their tails flat and unprojected; the adaptive softmax's
        project part i to ``dim // 4**(i + 1)`` dimensions.
        """
        if root in self._unprojected_roots:
            return dict.fromkeys(self._parts(root).parts, FLAT)
        return {i: projected_flat(max(1, self.dim // 4 ** (i + 1))) for i in self._parts(root).parts}

    # ------------------------------------------------------------------ the search
    def _knapsack(self, entry: _Measured, half: int | None = None) -> tuple[dict[int, SplitRule], float] | None:
        """The best measured completion of each part of ``entry`` within the cap, and the tree's predicted NLL.

        ``half``: choose on that validation half's terms alone (the NLL returned is then that half's term).
        """
        if not entry.halves or np.isnan(entry.root_halves).any():
            return None
        options = list(entry.halves)
        loss = np.stack([entry.halves[o].sum(0) if half is None else entry.halves[o][half] for o in options])
        cost = np.stack([entry.cost[o] for o in options])
        root = float(entry.root_halves.sum() if half is None else entry.root_halves[half])
        if self.decode_cap is None:
            best = choose_completions(loss, cost, self.cap - entry.root_cost)
        else:
            best = self._within_decode_cap(entry, options, loss, cost)
        if best is None:
            return None
        choice, total, _ = best
        return {part: options[c] for part, c in zip(entry.parts, choice, strict=True)}, root + total

    def _within_decode_cap(self, entry: _Measured, options: list[SplitRule], loss: np.ndarray,
                           cost: np.ndarray) -> tuple[np.ndarray, float, float] | None:  # fmt: skip
        """`choose_completions_within` the search's cap and the decoding cap (parts' decoding shares: a forecast)."""
        decode = np.stack([entry.decode.get(o, np.full(len(entry.parts), math.nan)) for o in options])
        return choose_completions_within(loss, cost, self.cap - entry.root_cost, decode,
                                         self.decode_cap.limit - entry.decode_root)  # fmt: skip

    def best_plan(self) -> tuple[SplitRule, dict[int, SplitRule], list[np.ndarray], float] | None:
        """The choice of dp at the cap over every root rule it measured, or None before any fits.

        Returns the root rule, the completion rule of each root part with more than one class
        (by part index), the root split's parts, and the predicted validation NLL (summed over the
        sample). `tree_search.agents.expert` replays it as actions of the split environment.
        """
        picks = [(entry, found) for entry in self.measured.values() if (found := self._knapsack(entry)) is not None]
        if not picks:
            return None
        entry, (completions, predicted) = min(picks, key=lambda pick: pick[1][1])
        return entry.rule, completions, list(entry.members), predicted

    def selection_free_nll(self) -> float | None:
        """The validation NLL of dp's choice at the cap, cross-fitted over the two validation halves.

        dp's own figure is optimistic: the knapsack picks, for every part, the completion with
        the lowest loss on the very rows it then reports. Here the whole choice (root rule and
        completions) is made on one half's terms and scored on the other half's, both ways; the
        two scores sum to an NLL over the whole sample that the choosing did not see. It
        estimates the NLL of dp's procedure: its tree (chosen on both halves) can differ.
        """
        total = 0.0
        for choose, score in ((0, 1), (1, 0)):
            picks = [(entry, found) for entry in self.measured.values()
                     if (found := self._knapsack(entry, half=choose)) is not None]  # fmt: skip
            if not picks:
                return None
            entry, (completions, _) = min(picks, key=lambda pick: pick[1][1])
            index = {part: k for k, part in enumerate(entry.parts)}
            total += float(entry.root_halves[score]) + sum(
                float(entry.halves[rule][score, index[part]]) for part, rule in completions.items()
            )
        return total

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
        tree, projections = self._tree(entry.rule, completions)
        if head_cost(tree, self.counts, self.dim, projections, self.cost_model) > self.cap * (1 + 1e-9):
            # parts' costs add up exactly in multiply-adds and training time; in decoding time a part's pairs
            # depend on the rest of the tree (a better class found elsewhere prunes it), so the sum is a forecast
            return None
        if self.decode_cap is not None and not self.decode_cap.admits(tree, projections):
            return None  # the decoding forecast was wrong for this tree
        evaluation = self.evaluator.evaluate(tree, projections, searcher=self.label)
        if evaluation.ok:
            self.predictions.append((predicted, evaluation.valid_nll, tree))
        return evaluation

    def _propose_whole_huffman_trees(self) -> None:
        """Propose each classic k-ary Huffman tree (`whole_huffmans`) within the caps that costs no evaluation.

        Free ones are those the baselines evaluated (``--baselines front`` has them all): the evaluator
        answers from memory and records that the search found the classic tree, so dp's best at a cap is
        never worse on validation than the best of those Huffman trees within it.
        """
        for classic in classic_trees(self.counts, self.whole_huffmans, dim=self.dim).values():
            tree = classic.tree
            if not self.evaluator.knows(evaluation_key(tree)):
                continue
            if head_cost(tree, self.counts, self.dim, None, self.cost_model) > self.cap * (1 + 1e-9):
                continue
            if self.decode_cap is not None and not self.decode_cap.admits(tree, {}):
                continue
            self.evaluator.evaluate(tree, searcher=self.label)

    def _combined(self, root: SplitRule) -> Iterator[Evaluation]:
        evaluation = self._combine(self.measured[root])
        if evaluation is not None and evaluation.counted:
            yield evaluation

    def _cheapest_trees(self) -> dict[SplitRule, tuple[SplitRule, float]]:
        """Each root rule's cheapest homogeneous completion and its tree's cost (no training)."""
        if self._cheapest is None:
            # The cheapest is mostly 3-ary Huffman in multiply-adds (for some roots' parts 2- or 4-ary); in training
            # time a wider Huffman tail can be faster (8-ary trains in 0.9x binary Huffman's time); in decoding time
            # deep tails are the slowest, and a flat (projected) tail the fastest, so every Huffman and flat
            # candidate is costed.
            candidates = (huffman_rule(3), *self.huffmans, *self.flats)
            cheapest_rule = {r: min(candidates, key=lambda c, r=r: self._cost(r, c)) for r in self.root_rules}
            self._cheapest = {r: (c, self._cost(r, c)) for r, c in cheapest_rule.items()}
        return self._cheapest

    def cheapest_ratio(self, baselines: Collection[str] = ()) -> float:
        """The cost of the cheapest tree this search can yield, in multiples of binary Huffman's (inf: none).

        The grammar's trees, and the whole Huffman trees among ``baselines`` (classic tree names),
        which the search proposes when they fit (`_propose_whole_huffman_trees`).
        """
        unit = self.cap / self.config.cost_cap  # binary Huffman's cost
        costs = [cost for _, cost in self._cheapest_trees().values()]
        wholes = [name for name in self.whole_huffmans if name in baselines]
        for classic in classic_trees(self.counts, wholes, dim=self.dim).values() if wholes else ():
            costs.append(head_cost(classic.tree, self.counts, self.dim, None, self.cost_model))
        return min(costs, default=math.inf) / unit

    def search(self) -> Iterator[Evaluation]:
        """Measure, combine, and yield each counted evaluation, until the budget is used."""
        try:
            # Costs need no training: root rules whose cheapest completion is over the cap are out.
            cheap = huffman_rule(3)
            cheapest_rule = {r: c for r, (c, _) in self._cheapest_trees().items()}
            cheapest = {r: cost for r, (_, cost) in self._cheapest_trees().items()}
            # the widest first: a wider root split buys more loss. Its cost measures its width in multiply-adds and in
            # training time; in decoding time a wide root is often the fast one (it prunes the rest), so there its
            # multiply-adds do (ranked by decoding cost, PyTorch's adaptive roots came last and went unmeasured).
            by_macs = isinstance(self.cost_model, DecodeCost)
            width = {r: self._macs(r, cheap) if by_macs else self._cost(r, cheap) for r in self.root_rules}
            feasible = sorted((r for r in self.root_rules if cheapest[r] <= self.cap), key=lambda r: -width[r])
            if not feasible and self.root_rules:
                self.stop_reason = (f"no tree of its grammar fits under the cap of {self.config.cost_cap:g}x binary "
                                    f"Huffman: the cheapest costs {self.cheapest_ratio():.2f}x")  # fmt: skip
            # At most half the budget ranks root rules, each by its homogeneous tree when that fits the cap (a classic
            # candidate itself; for the adaptive softmax's cutoffs, its own tree), else completed by 3-ary Huffman;
            # the rest of the budget completes the best of them.
            self._propose_whole_huffman_trees()
            left = self.evaluator.remaining
            if self.prior is not None:  # the prior's order; the first few ranked, the rest when those are complete
                feasible = self.prior.root_order(feasible)
            feasible = feasible[: max(2, left // 2)] if left is not None else feasible
            unranked = list(feasible[PRIOR_ROOTS:] if self.prior is not None else ())
            ranking = feasible[: len(feasible) - len(unranked)]

            def rank(root: SplitRule) -> Evaluation | None:
                first = self._adaptive_completion(root) if root.cut == "cutoffs" else root
                return self._measure(root, self._first_completion(root, first, cheapest_rule[root]))

            for root in ranking:
                if self.done:
                    return
                evaluation = rank(root)
                if evaluation is not None and evaluation.counted:
                    yield evaluation
            while not self.done:
                ranked = sorted(ranking, key=lambda r: self._objective(self.measured[r]))
                pending = [(r, c) for r in ranked for c in self._completion_order(r) if c not in self.measured[r].tried]
                if not pending and unranked:
                    ranking.append(unranked.pop(0))
                    evaluation = rank(ranking[-1])
                    if evaluation is not None and evaluation.counted:
                        yield evaluation
                    continue
                if not pending:
                    break
                root = pending[0][0]
                todo = [c for r, c in pending if r == root]
                measured = 0
                for completion in todo:
                    if self.done:
                        return
                    if not self._may_fit(root, completion):
                        self.measured[root].tried.add(completion)
                        continue
                    evaluation = self._measure(root, completion)
                    measured += 1
                    if evaluation is not None and evaluation.counted:
                        yield evaluation
                    if measured % 4 == 0 and not self.done:  # the best tree known so far
                        yield from self._combined(root)
                if measured % 4 and not self.done:
                    yield from self._combined(root)
        except BudgetExhausted:
            return
