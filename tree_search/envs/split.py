"""`TreeSearch/Split-v1`: build a tree top-down by choosing how each large group of classes splits."""

from __future__ import annotations

import heapq
import math

import numpy as np

from tree_search.data.taxonomy import taxonomy_tree
from tree_search.envs.base import TreeEnv
from tree_search.envs.scoring import NodeContent
from tree_search.split_grammar import (
    CLASSIC_ROOTS,
    FLAT,
    FLAT_PROJECTIONS,
    HUFFMAN_FANOUTS,
    ORDERS,
    SplitRule,
    classic_root_rules,
    flat_projections,
    huffman_graft,
    huffman_rule,
    partition_group,
    split_rules,
)
from tree_search.tree import Tree

__all__ = ["ORDERS", "SplitEnv", "SplitRule"]


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
    mass (every part keeps at least one class); "headtail" makes the most frequent classes
    holding half the group's mass (at most ``split_head_max``, at least one) direct leaves
    and cuts the rest into k-1 tail groups: equal-mass runs in frequency order (adaptive
    softmax's clusters), or balanced k-means or PCA clusters. k-means and PCA
    are seeded by ``config.seed`` and the group's members (never its place in the tree), so
    the same actions always build the same tree, and a group splits the same way in every
    tree (the grammar is `tree_search.split_grammar`, shared with the ``dp`` searcher).

    With ``config.split_classic_shapes`` the adaptive softmax's trees are in the grammar too
    (off by default: on a planted task of 256 classes, the 12 extra actions left TPE behind
    random search on 4 of 6 seeds at a budget of 32): at the root, the root split of each
    shape of `tree_search.split_grammar.CLASSIC_ROOTS` (PyTorch's usual cutoffs, Grave et
    al.'s cost-optimal ones, and the frequency cutoffs at 80/90/95% of the mass): a head of
    the most frequent classes as leaves and tail groups in frequency order; and for any group,
    one flat node scoring its classes on the features projected to d/4, d/16 or d/64
    dimensions (the adaptive softmax's tail clusters). A tail group of a cutoffs root may also
    be one unprojected flat node whatever its size (the frequency cutoffs' tails), and is
    finished as one when no decision reaches it.

    ## Action Space
    ``Discrete(9F + 1)`` for F = ``len(config.fanouts)`` (37 by default), index =
    ``(order * 2 + cut) * F + f`` for the 3 orders (frequency, pca, kmeans) x 2 cuts (count,
    mass) x F fanouts; then ``(6 + order) * F + f`` for head-and-tail with its tail in that
    order and fanout ``fanouts[f]``; last, flat. With ``split_classic_shapes``,
    ``Discrete(9F + 13)`` (49): before flat, ``9F + s`` for the root split of shape ``s`` of
    `CLASSIC_ROOTS` (9 shapes), then ``9F + 9 + j`` for the flat node projected to d/4, d/16,
    d/64 (j = 0, 1, 2). Legal: a fanout below the group's size; a classic root split only at
    the root (and when the shape can be built on these classes); a projected flat node for any
    group (its projection distinct and under d); flat only for groups of at most
    ``split_flat_max`` classes, tails of a cutoffs root, or at the root (where flat is the
    full softmax).

    With ``config.split_two_level`` the episode is a plan of the ``dp`` searcher's grammar: the
    root's rule, then one completion rule for each part of the root with more than one class
    (largest mass first), which then applies through that part's whole subtree (nothing below
    the root's parts is decided). Its actions are the classic shapes' (as above), then Huffman
    subtrees of fanouts ``HUFFMAN_FANOUTS`` (2, 3, 4, 8, 16, 32; the group becomes its own k-ary
    Huffman tree), then flat, legal for a group of any size: ``Discrete(9F + 19)`` (55). So every
    tree dp chooses is one episode (`tree_search.agents.expert.demonstrate` plays dp's plans for a
    policy to imitate); ``max_steps`` must allow the root and each of its parts.

    ## Observation Space
    ``Dict(observations=Box(-10, 10, (10,)), action_mask=Box(0, 1, (9F + 1,)))`` (in the two-level
    mode 11 features, the last one the cap):

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
    | 10    | two-level mode only: log2(cost cap in binary Huffmans) / 4     |

    ## Rewards
    0 until the end. At the end: ``-(validation NLL in nats/token)`` of a head trained on
    the tree (validation split; the test split is never used), with the cost rule of the
    config: ``cost_mode="cap"`` (default): a tree whose expected cost per token exceeds
    ``cost_cap`` x binary Huffman's is not trained and gets ``-ln V - cap_penalty * (cost /
    cap - 1)``; ``cost_mode="tradeoff"``: ``-NLL - cost_weight * cost / full-softmax cost``.
    A failed evaluation (NaN, out of memory) gives ``-ln V - failure_penalty`` with the
    error in ``info["error"]``.

    With ``reward_mode="dense"`` each decision is rewarded at once: it fixes the split
    group's node (its children are the parts), and its reward is minus that node's share of
    the validation NLL, ``-min_m L_n[m] / N`` (the node's validation loss sum at its best
    measurement over the N validation tokens of the sample; from the node bank, or trained
    now), minus ``cost_weight`` x its share of the cost over the full softmax's in the tradeoff
    mode (``info["node_reward"]``). The last step gets the terminal reward above minus
    everything given before, so every episode's rewards add up to it exactly (the last
    decision's node and the nodes finished by the inherited rules are paid then).

    ## Starting State
    One open group, the root, with all classes. Deterministic. With ``config.taxonomy`` (a
    taxonomy file, `tree_search.data.taxonomy`, matched to the dataset's class tokens), the
    taxonomy tree's nodes above ``config.taxonomy_level`` are fixed as given and each of its
    nodes at that depth is a starting group holding the classes below it (the taxonomy's
    structure below that level is what the episode searches); classes that are leaves above
    that depth stay leaves. Groups of more than ``split_min_group`` classes are open for the
    agent (largest mass first); smaller ones, and open groups left after ``max_steps``
    decisions, become flat nodes.

    ## Episode End
    Terminates when no group is left for the agent, or after ``max_steps`` decisions;
    truncates (reward 0) only when the search's reward function says the search is over.
    ``info`` then carries the tree (``info["tree"]``), its statistics, and the evaluation
    (``info["result"]``); in dense mode also ``terminal_reward`` and ``dense_node_queries``.

    ## Arguments
    ``gymnasium.make("TreeSearch/Split-v1", config=TreeEnvConfig(...), reward_fn=None,
    dataset=None, render_mode=None, **config_fields)``.

    ## Version History
    * v1, later: ``split_two_level`` (dp's grammar: Huffman subtrees, flat nodes of any size,
      decisions for the root and its parts only; off by default: the default episodes are unchanged).
    * v1, later: ``split_classic_shapes`` adds the adaptive softmax's trees (off by default:
      the default episodes are unchanged).
    * v1: head-and-tail with k-means or PCA tail clusters (37 actions by default); k-means and
      PCA seeded by each group's content (so the same actions can give other trees than v0's);
      ``reward_mode="dense"``; a taxonomy start (``config.taxonomy``; default episodes unchanged).
    * v0: initial version.
    """

    def _setup(self) -> None:
        F = len(self.config.fanouts)
        grammar = split_rules(self.config.fanouts)
        roots, projected, shapes = {}, (), ()
        self._two_level = self.config.split_two_level
        huffmans = tuple(huffman_rule(k) for k in HUFFMAN_FANOUTS) if self._two_level else ()
        if self.config.split_classic_shapes or self._two_level:
            roots = classic_root_rules(self.counts, self.scorer.dim)
            projected = flat_projections(self.scorer.dim)
            projected += (projected[-1],) * (len(FLAT_PROJECTIONS) - len(projected))  # a tiny dim: repeats, illegal
            # a shape that cannot be built on these classes keeps its index, never legal (FLAT only stands in)
            shapes = tuple(roots.get(name, FLAT) for name in CLASSIC_ROOTS)
        self.rules: tuple[SplitRule, ...] = (*grammar[:-1], *shapes, *projected, *huffmans, FLAT)
        assert len(self.rules) == self._num_actions()
        self._fanouts = np.array([r.fanout for r in self.rules])
        self._roots = slice(9 * F, 9 * F + len(shapes))
        self._root_available = np.array([name in roots for name in CLASSIC_ROOTS][: len(shapes)], dtype=bool)
        self._projected = slice(self._roots.stop, self._roots.stop + len(projected))
        if self._two_level:
            most = 1 + max(r.fanout for r in self.rules if r.cut != "huffman")  # the root, then each of its parts
            if self.config.max_steps < most:
                raise ValueError(
                    f"TreeEnvConfig.max_steps={self.config.max_steps}: with split_two_level an episode decides the "
                    f"root and each of its parts, up to {most} decisions; set max_steps to at least {most}"
                )
        sizes = [r.projection for r in projected]
        self._projected_available = np.array([0 < p < self.scorer.dim and p not in sizes[:j]
                                              for j, p in enumerate(sizes)], dtype=bool)  # fmt: skip
        p = self.mass
        centre = p @ self.embeddings
        self._total_spread = float(p @ ((self.embeddings - centre) ** 2).sum(axis=1)) or 1.0
        self._fixed = self._taxonomy_start() if self.config.taxonomy else None

    def _taxonomy_start(self) -> tuple[list[list[int]], list[int], list[np.ndarray], float]:
        """The fixed upper part of the taxonomy tree: children lists, node depths, starting groups' classes, cost.

        The cost is the fixed nodes' share of the committed cost (sum of fanout x mass).

        Node ids: the fixed nodes (depth below the level) first in their taxonomy order, then
        one node per starting group, so that every parent comes before its children.
        """
        level, path = self.config.taxonomy_level, self.config.taxonomy
        tree, _ = taxonomy_tree(path, self.dataset.vocab.tokens, self.counts, unknown=self.config.taxonomy_unknown)
        V = self.num_classes
        fixed = np.flatnonzero(tree.node_depth < level)
        groups = np.flatnonzero(tree.node_depth == level)
        if groups.size == 0:
            raise ValueError(
                f"TreeEnvConfig.taxonomy_level={level}: the tree of {path} has no internal node at that depth "
                f"(its deepest is at depth {int(tree.node_depth.max())}); choose a smaller level"
            )
        new_id = np.full(tree.num_internal, -1, dtype=np.int64)
        new_id[fixed] = np.arange(fixed.size)
        new_id[groups] = fixed.size + np.arange(groups.size)
        ids = tree.child_ids.copy()
        ids[ids >= V] = V + new_id[ids[ids >= V] - V]
        rows = np.split(ids, tree.child_ptr[1:-1])
        children = [rows[u].tolist() for u in fixed]
        nodes, _, _ = tree.paths()
        ancestor = np.where(tree.depth > level, nodes[:, min(level, nodes.shape[1] - 1)], -1)  # (V,) group's node
        key = np.where(ancestor >= 0, new_id[ancestor], -1)  # leaves above the level sort first, then by group
        order = np.argsort(key, kind="stable")[np.sum(ancestor < 0) :]  # classes below the level, by group
        sizes = np.bincount(key[order] - fixed.size, minlength=groups.size)
        members = np.split(order, np.cumsum(sizes)[:-1])
        if max(m.size for m in members) <= self.config.split_min_group:
            raise ValueError(
                f"TreeEnvConfig.taxonomy_level={level}: no group of {path} at that depth has more than "
                f"split_min_group={self.config.split_min_group} classes, so the agent has nothing to decide; "
                "choose a smaller level or split_min_group"
            )
        depths = [*tree.node_depth[fixed].tolist(), *[level] * groups.size]
        committed = float(tree.fanout[fixed] @ tree.subtree_sums(self.mass)[fixed])
        return children, depths, members, committed

    def _num_actions(self) -> int:
        two_level = self.config.split_two_level
        extra = len(CLASSIC_ROOTS) + len(FLAT_PROJECTIONS) if self.config.split_classic_shapes or two_level else 0
        return 9 * len(self.config.fanouts) + extra + (len(HUFFMAN_FANOUTS) if two_level else 0) + 1

    def _num_features(self) -> int:
        return 11 if self.config.split_two_level else 10

    def describe_action(self, action: int) -> str:
        """The rule of an action index."""
        return str(self.rules[action])

    def action_of(self, rule: SplitRule) -> int:
        """The action index of ``rule`` (ValueError when the environment's grammar lacks it)."""
        try:
            return self.rules.index(rule)
        except ValueError:
            raise ValueError(f"the split environment has no action for the rule '{rule}'") from None

    def current_group(self) -> np.ndarray:
        """The class ids of the group the next action splits (empty once the episode is over)."""
        if self._done or not self._queue:
            return np.empty(0, dtype=np.int64)
        return self._groups[self._current()][0]

    # ------------------------------------------------------------------ episode state
    def _start(self) -> None:
        V = self.num_classes
        self._children: list[list[int]] = [[]]
        self._depth: list[int] = [0]
        self._queue: list[tuple[float, int]] = []  # (-mass, node) of groups the agent decides
        self._groups: dict[int, tuple[np.ndarray, SplitRule | None]] = {0: (np.arange(V), None)}
        self._later: list[int] = []  # groups finished by their inherited rule at the end
        self._committed = 0.0  # sum over decided nodes of fanout x mass
        self._projections: dict[int, int] = {}  # projected flat nodes: node -> dimensions
        if self._fixed is None:
            self._queue.append((-1.0, 0))
            return
        # a taxonomy start: its upper part fixed, its nodes at the level as the starting groups
        children, depths, members, committed = self._fixed
        first = len(children)
        self._children = [list(row) for row in children] + [[] for _ in members]
        self._depth = list(depths)
        self._groups = {first + g: (part, None) for g, part in enumerate(members)}
        for g, part in enumerate(members):
            if part.size > self.config.split_min_group:
                heapq.heappush(self._queue, (-float(self.mass[part].sum()), first + g))
            else:
                self._later.append(first + g)
        self._committed = committed

    def _current(self) -> int:
        return self._queue[0][1]

    def _decisions_left(self) -> bool:
        return bool(self._queue)

    def _legal(self) -> np.ndarray:
        node = self._current()
        members, inherited = self._groups[node]
        size = members.size
        legal = (self._fanouts < size) & (self._fanouts > 0)
        legal[self._roots] = self._root_available & (node == 0)
        legal[self._projected] = self._projected_available & (size > 1)
        tail = inherited is not None and inherited.cut == "cutoffs"
        legal[-1] = node == 0 or size <= self.config.split_flat_max or tail or self._two_level
        return legal

    def _apply(self, action: int) -> list[NodeContent]:
        _, node = heapq.heappop(self._queue)
        members, _ = self._groups.pop(node)
        rule = self.rules[action]
        children = self._split(node, members, rule, decide=True)
        self._committed += len(children) * float(self.mass[members].sum())
        return [NodeContent(tuple(children), rule.projection)]  # the group's node: its children are the parts

    def _split(self, node: int, members: np.ndarray, rule: SplitRule, decide: bool) -> list[np.ndarray]:
        """Split ``members`` under ``node`` by ``rule``; new groups inherit it. Returns the children's class sets."""
        V = self.num_classes
        if rule.cut == "huffman":
            return self._graft_huffman(node, members, rule.fanout)
        leaves, parts = partition_group(members, rule, self.counts, self.embeddings, seed=self.config.seed,
                                        head_max=self.config.split_head_max)  # fmt: skip
        if rule.flat and rule.projection:
            self._projections[node] = rule.projection
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
            if self._two_level:  # only the root's parts are decided (each by its own completion rule)
                offered = decide and node == 0
            else:
                offered = decide and part.size > self.config.split_min_group
            if offered:
                heapq.heappush(self._queue, (-float(self.mass[part].sum()), child))
            else:
                self._later.append(child)
        return [leaves[i : i + 1] for i in range(leaves.size)] + list(parts)

    def _graft_huffman(self, node: int, members: np.ndarray, fanout: int) -> list[np.ndarray]:
        """Make ``node`` the root of the k-ary Huffman tree of ``members``; returns the root's children's class sets."""
        # members in the order the split gave them, as `plan_head` has
        sub, rows = huffman_graft(self.counts, members, fanout, node, len(self._children))
        self._children[node].extend(rows[0])
        self._children.extend(rows[1:])
        self._depth.extend((self._depth[node] + sub.node_depth[1:]).tolist())
        below = sub.subtree_sums(self.mass[members])
        self._committed += float(sub.fanout[1:] @ below[1:])  # the root's share is the decision's (`_apply`)
        top = sub.paths()[1][:, 0]  # each member's child slot at the subtree's root
        return [members[top == slot] for slot in range(len(rows[0]))]

    def _finish(self) -> tuple[Tree, dict[int, int]]:
        pending = [node for _, node in self._queue] + self._later
        self._queue, self._later = [], []
        leaf_size = self.config.split_leaf_size
        while pending:
            node = pending.pop()
            members, rule = self._groups.pop(node)
            if rule is None or rule.cut == "cutoffs" or members.size <= max(leaf_size, rule.fanout):
                rule = FLAT  # a cutoffs root's tails: unprojected flat nodes, as the frequency cutoffs have them
            self._split(node, members, rule, decide=False)
            pending.extend(self._later)
            self._later = []
        return Tree(self.num_classes, self._children), dict(self._projections)

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
        capped = self.config.cost_mode == "cap"
        cap = [math.log2(self.config.cost_cap) / 4 if capped else 0.0] if self._two_level else []
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
                *cap,
            ]
        )

    def _render_state(self) -> str:
        lines = [f"{len(self._queue)} open group(s) for the agent, committed cost {self._committed:.2f} x dim"]
        for negative_mass, node in sorted(self._queue)[:8]:
            lines.append(f"  node {node}: {self._groups[node][0].size} classes, {-negative_mass:.1%} of tokens")
        return "\n".join(lines)
