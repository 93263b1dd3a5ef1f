"""`TreeSearch/Split-v0`: build a tree top-down by choosing how each large group of classes splits."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from tree_search.builders import order_group
from tree_search.envs.base import TreeEnv
from tree_search.tree import Tree

__all__ = ["ORDERS", "SplitEnv", "SplitRule"]

ORDERS = ("frequency", "pca", "kmeans")
CUTS = ("count", "mass")
HEAD_MASS = 0.5  # the head of a head-and-tail cut keeps the most frequent classes up to this share of the group


@dataclass(frozen=True)
class SplitRule:
    """How one group is split: an ordering of its classes, a cut rule and a fanout (or flat)."""

    order: str  # "frequency", "pca", "kmeans" (or "flat")
    cut: str  # "count", "mass", "headtail" (or "flat")
    fanout: int  # parts (head-and-tail: tail clusters + 1); 0 for flat

    @property
    def flat(self) -> bool:
        """All members become leaves of the node."""
        return self.cut == "flat"

    def __str__(self) -> str:
        if self.flat:
            return "flat"
        if self.cut == "headtail":
            return f"head+{self.fanout - 1} tail clusters (frequency order)"
        return f"{self.order} order, equal-{self.cut} cut, fanout {self.fanout}"


FLAT = SplitRule("flat", "flat", 0)


class SplitEnv(TreeEnv):
    """Build a tree top-down: each step decides how the largest open group of classes splits.

    ## Description
    The episode starts with one group, the root, holding all V classes. Each step takes
    the open group of largest token mass (ties: the earlier node) and the action chooses
    how it splits: an ordering of its classes (by descending frequency, along the top
    principal direction of the class embeddings, or by balanced k-means clusters of the
    embeddings), a cut of that order (equal counts, equal token mass, or head-and-tail as
    in adaptive softmax) and a fanout; or "flat", all members leaves of the node. Each part
    of one class is a leaf; each larger part is a new group that *inherits* the rule. Groups
    of at most ``split_min_group`` classes are never offered to the agent: they, and every
    group still open after ``max_steps`` decisions, are finished by applying their inherited
    rule recursively (groups of at most ``split_leaf_size`` classes, or at most the rule's
    fanout, become flat nodes). So one decision at the root gives a whole homogeneous tree
    (e.g. the 8-ary frequency split), and further decisions mix rules by depth (e.g. a
    frequency split of fanout 8 at the root, k-means of fanout 16 below).

    Cuts of an ordered group into k parts: "count" gives sizes differing by at most one
    (larger first); "mass" cuts where the cumulative token mass crosses j/k of the group's
    mass (every part keeps at least one class); "headtail" (frequency order only) makes the
    most frequent classes holding half the group's mass (at most ``split_head_max``, at least
    one) direct leaves and cuts the rest into k-1 equal-mass tail groups. k-means and PCA
    are seeded by ``config.seed``, so the same actions always build the same tree.

    ## Action Space
    ``Discrete(7F + 1)`` for F = ``len(config.fanouts)`` (29 by default), index =
    ``(order * 2 + cut) * F + f`` for the 3 orders (frequency, pca, kmeans) x 2 cuts (count,
    mass) x F fanouts; then ``6F + f`` for head-and-tail with fanout ``fanouts[f]``; last,
    ``7F`` for flat. Legal: a fanout below the group's size; flat only for groups of at most
    ``split_flat_max`` classes, or at the root (where flat is the full softmax). At the root
    of a tree with more classes than the largest fanout every action is legal.

    ## Observation Space
    ``Dict(observations=Box(-10, 10, (10,)), action_mask=Box(0, 1, (7F + 1,)))``:

    | index | observation                                                   |
    |-------|---------------------------------------------------------------|
    | 0     | log(group size) / log(V)                                      |
    | 1     | group's share of the token mass                               |
    | 2     | log10 of that share / 10                                      |
    | 3     | frequency entropy of the group / log(group size)              |
    | 4     | depth of the group's node / 10                                |
    | 5     | embedding spread: weighted variance / the whole vocabulary's  |
    | 6     | share of the mass no longer in groups the agent will decide   |
    | 7     | committed cost (decided nodes, fanout x mass) / cost cap      |
    | 8     | decisions left / max_steps                                    |
    | 9     | open groups the agent may still decide / max_steps            |

    ## Rewards
    0 until the end. At the end: ``-(validation NLL in nats/token)`` of a head trained on
    the tree (validation split; the test split is never used), with the cost rule of the
    config: ``cost_mode="cap"`` (default): a tree whose expected cost per token exceeds
    ``cost_cap`` x binary Huffman's is not trained and gets ``-ln V - cap_penalty * (cost /
    cap - 1)``; ``cost_mode="tradeoff"``: ``-NLL - cost_weight * cost / full-softmax cost``.
    A failed evaluation (NaN, out of memory) gives ``-ln V - failure_penalty`` with the
    error in ``info["error"]``.

    ## Starting State
    One open group, the root, with all classes. Deterministic.

    ## Episode End
    Terminates when no group is left for the agent, or after ``max_steps`` decisions;
    never truncates. ``info`` then carries the tree (``info["tree"]``), its statistics, and
    the evaluation (``info["result"]``).

    ## Arguments
    ``gymnasium.make("TreeSearch/Split-v0", config=TreeEnvConfig(...), reward_fn=None,
    dataset=None, render_mode=None, **config_fields)``.

    ## Version History
    * v0: initial version.
    """

    def _setup(self) -> None:
        F = len(self.config.fanouts)
        rules = [SplitRule(o, c, k) for o in ORDERS for c in CUTS for k in self.config.fanouts]
        rules += [SplitRule("frequency", "headtail", k) for k in self.config.fanouts]
        self.rules: tuple[SplitRule, ...] = (*rules, FLAT)
        assert len(self.rules) == 7 * F + 1
        self._fanouts = np.array([r.fanout for r in self.rules])
        p = self.mass
        centre = p @ self.embeddings
        self._total_spread = float(p @ ((self.embeddings - centre) ** 2).sum(axis=1)) or 1.0

    def _num_actions(self) -> int:
        return 7 * len(self.config.fanouts) + 1

    def _num_features(self) -> int:
        return 10

    def describe_action(self, action: int) -> str:
        """The rule of an action index."""
        return str(self.rules[action])

    # ------------------------------------------------------------------ episode state
    def _start(self) -> None:
        V = self.num_classes
        self._children: list[list[int]] = [[]]
        self._depth: list[int] = [0]
        self._queue: list[tuple[float, int]] = []  # (-mass, node) of groups the agent decides
        self._groups: dict[int, tuple[np.ndarray, SplitRule | None]] = {0: (np.arange(V), None)}
        self._later: list[int] = []  # groups finished by their inherited rule at the end
        self._committed = 0.0  # sum over decided nodes of fanout x mass
        self._queue.append((-1.0, 0))

    def _current(self) -> int:
        return self._queue[0][1]

    def _decisions_left(self) -> bool:
        return bool(self._queue)

    def _legal(self) -> np.ndarray:
        node = self._current()
        size = self._groups[node][0].size
        legal = (self._fanouts < size) & (self._fanouts > 0)
        legal[-1] = node == 0 or size <= self.config.split_flat_max
        return legal

    def _apply(self, action: int) -> None:
        _, node = heapq.heappop(self._queue)
        members, _ = self._groups.pop(node)
        rule = self.rules[action]
        self._committed += self._split(node, members, rule, decide=True) * float(self.mass[members].sum())

    def _split(self, node: int, members: np.ndarray, rule: SplitRule, decide: bool) -> int:
        """Split ``members`` under ``node`` by ``rule``; new groups inherit it. Returns the fanout."""
        V = self.num_classes
        leaves, parts = self._partition(node, members, rule)
        kids = self._children[node]
        kids.extend(int(y) for y in leaves)
        for part in parts:
            if part.size == 1:
                kids.append(int(part[0]))
                continue
            child = len(self._children)
            self._children.append([])
            self._depth.append(self._depth[node] + 1)
            kids.append(V + child)
            self._groups[child] = (part, rule)
            if decide and part.size > self.config.split_min_group:
                heapq.heappush(self._queue, (-float(self.mass[part].sum()), child))
            else:
                self._later.append(child)
        return len(kids)

    def _partition(self, node: int, members: np.ndarray, rule: SplitRule) -> tuple[np.ndarray, list[np.ndarray]]:
        """(direct leaves, parts) of one split."""
        size = members.size
        if rule.flat or size <= rule.fanout:
            return members, []
        weights = self.counts[members]
        if rule.order == "frequency":
            ordered = members[np.lexsort((members, -weights))]
        else:
            rng = np.random.default_rng([self.config.seed, node, size])
            ordered = members[order_group(self.embeddings[members], weights, rule.order, rule.fanout, rng)]
        if rule.cut == "count":
            return np.empty(0, np.int64), np.array_split(ordered, rule.fanout)
        mass = self.counts[ordered]
        if rule.cut == "mass":
            return np.empty(0, np.int64), np.split(ordered, _mass_cuts(mass, rule.fanout))
        tails = rule.fanout - 1
        cumulative = np.cumsum(mass)
        head = int(np.searchsorted(cumulative, HEAD_MASS * cumulative[-1])) + 1
        head = max(1, min(head, self.config.split_head_max, size - tails))
        tail = ordered[head:]
        return ordered[:head], np.split(tail, _mass_cuts(self.counts[tail], tails)) if tails > 1 else [tail]

    def _finish(self) -> tuple[Tree, dict[int, int]]:
        pending = [node for _, node in self._queue] + self._later
        self._queue, self._later = [], []
        leaf_size = self.config.split_leaf_size
        while pending:
            node = pending.pop()
            members, rule = self._groups.pop(node)
            if rule is None or members.size <= max(leaf_size, rule.fanout):
                rule = FLAT
            self._split(node, members, rule, decide=False)
            pending.extend(self._later)
            self._later = []
        return Tree(self.num_classes, self._children), {}

    # ------------------------------------------------------------------ observations
    def _features(self) -> np.ndarray:
        V = self.num_classes
        node = self._current()
        members, _ = self._groups[node]
        p = self.mass[members]
        share = float(p.sum())
        q = p / share if share > 0 else np.full(members.size, 1.0 / members.size)
        entropy = -float(np.sum(q[q > 0] * np.log(q[q > 0])))
        X = self.embeddings[members]
        spread = float(q @ ((X - q @ X) ** 2).sum(axis=1)) / self._total_spread
        open_mass = sum(float(self.mass[self._groups[n][0]].sum()) for _, n in self._queue)
        return np.array(
            [
                math.log(members.size) / math.log(V),
                share,
                math.log10(max(share, 1e-30)) / 10,
                entropy / math.log(members.size),
                self._depth[node] / 10,
                spread,
                1.0 - open_mass,
                self._committed * self.scorer.dim / self.scorer.cap,
                (self.config.max_steps - self._steps) / self.config.max_steps,
                len(self._queue) / self.config.max_steps,
            ]
        )

    def _render_state(self) -> str:
        lines = [f"{len(self._queue)} open group(s) for the agent, committed cost {self._committed:.2f} x dim"]
        for negative_mass, node in sorted(self._queue)[:8]:
            lines.append(f"  node {node}: {self._groups[node][0].size} classes, {-negative_mass:.1%} of tokens")
        return "\n".join(lines)


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
