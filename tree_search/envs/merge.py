"""`TreeSearch/Merge-v0`: build a tree bottom-up by choosing which current roots to merge."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from tree_search.builders import from_merges, huffman
from tree_search.envs.base import TreeEnv
from tree_search.envs.scoring import NodeContent
from tree_search.tree import Tree

__all__ = ["MergeEnv"]


class MergeEnv(TreeEnv):
    """Build a tree bottom-up: each step merges two (or more) current roots into a new node.

    ## Description
    The forest starts from the V classes as single-leaf roots when V <= ``merge_max_leaves``;
    for larger V it starts from K = ``merge_groups`` roots: classes ranked by descending
    count are cut into K runs of equal token mass (a class heavier than a run stays alone),
    and each run's inner tree is its binary Huffman tree. Each step merges roots chosen
    from a candidate list of c = 2m roots (m = ``merge_candidates``): the m lightest roots
    (by token mass; ties: single classes before merged nodes, then by class id, then by
    age, exactly Huffman's order), then the m roots whose mean embedding is nearest to the
    lightest one's (not already listed). After ``max_steps`` merges, the remaining roots
    are merged lightest pair first (Huffman's rule), so a policy that always merges the
    two lightest roots rebuilds binary Huffman exactly.

    ## Action Space
    ``Discrete(c(c-1)/2 + W)``: index ``i`` < c(c-1)/2 merges the candidate pair number
    ``i`` in the order (0,1), (0,2), ..., (0,c-1), (1,2), ... -- action 0 merges the two
    lightest roots; then one action per fanout k > 2 in ``config.fanouts`` (W of them)
    merging the k lightest roots. Legal: both candidates exist (fewer roots than c leave
    gaps); a k-merge needs at least k roots.

    ## Observation Space
    ``Dict(observations=Box(-10, 10, (4c + 3,)), action_mask=Box(0, 1, (n,)))``: for each
    candidate slot (zeros when empty) its log10 share of the token mass / 10, log(size) /
    log(V), subtree height / 10 and embedding distance to the lightest root / the largest
    such distance; then the number of roots / V, merges left / max_steps, and the share of
    mass held by the lightest candidate.

    ## Rewards
    As `SplitEnv`: at the end ``-(validation NLL)`` under the config's cost rule (cap
    relative to binary Huffman by default, or a tradeoff), a penalty for failed evaluations;
    the test split is never used. With ``reward_mode="dense"`` each merge is rewarded at once
    by minus the new node's share of the validation NLL (and of the cost, in the tradeoff
    mode), its children being the merged roots; the last step gets the exact remainder, so
    an episode's rewards add up to the terminal reward. The initial grouped forest of a
    large V and the final Huffman merges are not decisions: they are paid in the remainder.

    ## Starting State
    The forest described above. Deterministic.

    ## Episode End
    Terminates after ``max_steps`` merges or when one root remains; truncates (reward 0)
    only when the search's reward function says the search is over.

    ## Arguments
    ``gymnasium.make("TreeSearch/Merge-v0", config=TreeEnvConfig(...), ...)``; uses
    ``merge_candidates``, ``merge_max_leaves``, ``merge_groups``, ``fanouts``, ``max_steps``.

    ## Version History
    * v0: initial version; ``reward_mode="dense"`` added later (the default terminal rewards are unchanged).
    """

    def _setup(self) -> None:
        m = self.config.merge_candidates
        self._slots = 2 * m
        self._pairs = list(combinations(range(self._slots), 2))
        self._wide = [k for k in self.config.fanouts if k > 2]
        V = self.num_classes
        if V <= self.config.merge_max_leaves:
            self._initial_merges: list[list[int]] = []
            self._initial_roots = np.arange(V)
        else:
            self._initial_merges, self._initial_roots = _grouped_forest(self.counts, self.config.merge_groups)

    def _num_actions(self) -> int:
        return len(self._pairs) + len(self._wide)

    def _num_features(self) -> int:
        return 4 * self._slots + 3

    def describe_action(self, action: int) -> str:
        """The merge an action index asks for."""
        if action < len(self._pairs):
            i, j = self._pairs[action]
            return f"merge candidates {i} and {j}"
        return f"merge the {self._wide[action - len(self._pairs)]} lightest roots"

    # ------------------------------------------------------------------ episode state
    def _start(self) -> None:
        V = self.num_classes
        self._merges = [list(m) for m in self._initial_merges]
        total = V + len(self._merges)
        # Per node (classes, then merges in order): mass, member-embedding sum, size, height.
        self._node_mass = np.zeros(total)
        self._node_mass[:V] = self.counts
        self._node_sum = np.zeros((total, self.embeddings.shape[1]))
        self._node_sum[:V] = self.embeddings
        self._node_size = np.ones(total)
        self._node_height = np.zeros(total)
        for index, members in enumerate(self._merges):
            self._record(V + index, members)
        self._roots = [int(r) for r in self._initial_roots]
        self._candidates = self._candidate_list()

    def _record(self, node: int, members: list[int]) -> None:
        self._node_mass[node] = self._node_mass[members].sum()
        self._node_sum[node] = self._node_sum[members].sum(axis=0)
        self._node_size[node] = self._node_size[members].sum()
        self._node_height[node] = self._node_height[members].max() + 1

    def _grow(self) -> int:
        node = len(self._node_mass)
        self._node_mass = np.append(self._node_mass, 0.0)
        self._node_sum = np.vstack([self._node_sum, np.zeros((1, self._node_sum.shape[1]))])
        self._node_size = np.append(self._node_size, 0.0)
        self._node_height = np.append(self._node_height, 0.0)
        return node

    def _lightest_order(self) -> np.ndarray:
        """Roots in Huffman's order: mass, then single classes before merges, then id (= age)."""
        roots = np.asarray(self._roots)
        return roots[np.lexsort((roots, roots >= self.num_classes, self._node_mass[roots]))]

    def _candidate_list(self) -> list[int]:
        m = self.config.merge_candidates
        ranked = self._lightest_order()
        chosen = [int(r) for r in ranked[:m]]
        rest = ranked[m:]
        if rest.size:
            centres = self._node_sum[rest] / self._node_size[rest, None]
            anchor = self._node_sum[chosen[0]] / self._node_size[chosen[0]]
            distance = ((centres - anchor) ** 2).sum(axis=1)
            chosen += [int(r) for r in rest[np.lexsort((rest, distance))[:m]]]
        return chosen

    def _decisions_left(self) -> bool:
        return len(self._roots) > 1

    def _legal(self) -> np.ndarray:
        present = len(self._candidates)
        pairs = np.array([j < present for _, j in self._pairs], dtype=bool)
        wide = np.array([len(self._roots) >= k for k in self._wide], dtype=bool)
        return np.concatenate([pairs, wide])

    def _merge(self, members: list[int]) -> None:
        node = self._grow()
        self._record(node, members)
        self._merges.append(members)
        taken = set(members)
        self._roots = [r for r in self._roots if r not in taken] + [node]

    def _apply(self, action: int) -> list[NodeContent]:
        if action < len(self._pairs):
            i, j = self._pairs[action]
            members = [self._candidates[i], self._candidates[j]]
        else:
            k = self._wide[action - len(self._pairs)]
            members = [int(r) for r in self._lightest_order()[:k]]
        self._merge(members)
        self._candidates = self._candidate_list()
        return [NodeContent(tuple(self._classes(m) for m in members))]  # the new node: its children are the roots

    def _classes(self, node: int) -> np.ndarray:
        """The classes below ``node`` (a class, or ``V + m`` for merge m), sorted."""
        V, found, stack = self.num_classes, [], [node]
        while stack:
            top = stack.pop()
            if top < V:
                found.append(top)
            else:
                stack.extend(self._merges[top - V])
        return np.sort(np.asarray(found, dtype=np.int64))

    def _finish(self) -> tuple[Tree, dict[int, int]]:
        while len(self._roots) > 1:
            self._merge([int(r) for r in self._lightest_order()[:2]])
        return from_merges(self.num_classes, self._merges), {}

    # ------------------------------------------------------------------ observations
    def _features(self) -> np.ndarray:
        V = self.num_classes
        total = self._node_mass[:V].sum()
        slots = np.zeros((self._slots, 4))
        cands = np.asarray(self._candidates)
        anchor = self._node_sum[cands[0]] / self._node_size[cands[0]]
        centres = self._node_sum[cands] / self._node_size[cands, None]
        distance = np.sqrt(((centres - anchor) ** 2).sum(axis=1))
        slots[: cands.size, 0] = np.log10(np.maximum(self._node_mass[cands] / total, 1e-30)) / 10
        slots[: cands.size, 1] = np.log(self._node_size[cands]) / math.log(V)
        slots[: cands.size, 2] = self._node_height[cands] / 10
        slots[: cands.size, 3] = distance / max(float(distance.max()), 1e-12)
        tail = [
            len(self._roots) / V,
            (self.config.max_steps - self._steps) / self.config.max_steps,
            self._node_mass[cands[0]] / total,
        ]
        return np.concatenate([slots.ravel(), tail])

    def _render_state(self) -> str:
        lines = [f"{len(self._roots)} roots; candidates (mass share, classes):"]
        total = self._node_mass[: self.num_classes].sum()
        for slot, node in enumerate(self._candidates):
            lines.append(f"  {slot}: node {node}: {self._node_mass[node] / total:.3%}, {int(self._node_size[node])}")
        return "\n".join(lines)


def _grouped_forest(counts: np.ndarray, groups: int) -> tuple[list[list[int]], np.ndarray]:
    """Initial merges and roots for large V: equal-mass runs of the count ranking, Huffman inside."""
    V = counts.size
    ranked = np.lexsort((np.arange(V), -counts))
    cumulative = np.cumsum(counts[ranked])
    run = np.minimum((cumulative - counts[ranked]) / max(cumulative[-1], 1e-300) * groups, groups - 1).astype(np.int64)
    merges: list[list[int]] = []
    roots: list[int] = []
    for k in np.unique(run):
        members = ranked[run == k]
        if members.size == 1:
            roots.append(int(members[0]))
            continue
        inner = huffman(counts[members] + 0.0, 2)
        # Replay the inner Huffman tree's nodes bottom-up as merges of global ids.
        base = V + len(merges)
        local_order = list(range(inner.num_internal - 1, -1, -1))  # children have larger ids: reverse is bottom-up
        index_of = {node: base + i for i, node in enumerate(local_order)}
        for node in local_order:
            kids = inner.children(node)
            merges.append([int(members[c]) if c < members.size else index_of[int(c) - members.size] for c in kids])
        roots.append(index_of[0])
    return merges, np.asarray(roots)
