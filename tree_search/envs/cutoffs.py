"""`TreeSearch/Cutoffs-v0`: choose an adaptive-softmax shape: tail-cluster cutoffs and projection sizes."""

from __future__ import annotations

import numpy as np

from tree_search.builders import projected_cutoffs
from tree_search.envs.base import TreeEnv
from tree_search.envs.scoring import NodeContent
from tree_search.tree import Tree

__all__ = ["CUTOFF_FRACTIONS", "CutoffsEnv", "adaptive_softmax_actions"]

# Cutoff grid as fractions of V, about log-spaced; includes the common V/25 and V/5.
CUTOFF_FRACTIONS = (1 / 2000, 1 / 1000, 1 / 500, 1 / 250, 1 / 100, 1 / 50, 1 / 25, 1 / 15, 1 / 10, 1 / 5, 1 / 3, 1 / 2)


class CutoffsEnv(TreeEnv):
    """Choose the adaptive-softmax shape of ``torch.nn.AdaptiveLogSoftmaxWithLoss``, one number per step.

    ## Description
    Classes are ranked by descending count. The tree is `frequency_cutoffs`: a root whose
    leaves are the head (ranks below the first cutoff) plus one child per tail cluster
    ``[c_i, c_{i+1})``; tail cluster i scores its classes from a projection of the feature
    to ``p_i`` dimensions (what ``div_value`` sets in PyTorch: ``p_i = dim / div**(i+1)``).
    Steps alternate: choose the next cutoff on the grid (or stop), then that cluster's
    projection size; at most ``cutoff_max_clusters`` clusters.

    The cutoff grid is the distinct ranks ``round(f * V)`` in 1..V-1 for the fractions
    ``CUTOFF_FRACTIONS`` (1/2000 ... 1/2, about log-spaced in rank, with 1/25 and 1/5, the
    common choice). Projection choice j means ``max(1, dim // 2**j)`` dimensions for
    ``j < cutoff_projections``. PyTorch's cutoffs ``[V/25, V/5]`` with ``div_value=4`` is
    `adaptive_softmax_actions`.

    ## Action Space
    ``Discrete(max(G + 1, P))`` for a grid of G ranks and P projection sizes (at most
    ``cutoff_projections``: the sizes ``dim // 2**j`` that are at least 1). In a
    cutoff step, index ``g < G`` puts the next cutoff at grid rank g (legal when above the
    previous cutoff) and index ``G`` stops (legal once a cluster exists, or at the start,
    where stopping gives the flat full softmax). In a projection step, index ``j < P``
    chooses ``dim // 2**j`` dimensions (legal when at least 1).

    ## Observation Space
    ``Dict(observations=Box(-10, 10, (4 + 2K,)), action_mask=...)`` for K =
    ``cutoff_max_clusters``: phase (1 in a projection step), clusters so far / K, steps
    so far / (2K), last cutoff as log(rank)/log(V); then each cluster's log(cutoff)/log(V)
    and its projection as log2(dim / p)/P (zeros when not chosen yet).

    ## Rewards
    As `SplitEnv`: ``-(validation NLL)`` of the head (with the chosen projections) under the
    config's cost rule, costs counting each projection; a penalty for failed evaluations;
    the test split is never used. With ``reward_mode="dense"`` a tail cluster's node is fixed
    (its classes and projection) when the next cutoff is chosen: that cutoff step is rewarded
    by minus the node's share of the validation NLL (and of the cost, in the tradeoff mode);
    the first cutoff, the projection steps and a cluster of one class (a leaf) get 0; the last
    step gets the exact remainder (the root, the last cluster), so an episode's rewards add up
    to the terminal reward.

    ## Starting State
    No cluster: a cutoff step. Deterministic.

    ## Episode End
    Terminates after "stop", after the projection of the K-th cluster, when no larger
    cutoff is left, or after ``max_steps`` steps (the current cluster then keeps the full
    dimension). Truncates (reward 0) only when the search's reward function says the search
    is over.

    ## Arguments
    ``gymnasium.make("TreeSearch/Cutoffs-v0", config=TreeEnvConfig(...), ...)``; uses
    ``cutoff_max_clusters``, ``cutoff_projections``, ``max_steps``.

    ## Version History
    * v0: initial version; ``reward_mode="dense"`` added later (the default terminal rewards are unchanged).
    """

    def _setup(self) -> None:
        V = self.num_classes
        ranks = sorted({min(max(round(f * V), 1), V - 1) for f in CUTOFF_FRACTIONS})
        self.grid = np.array(ranks, dtype=np.int64)
        self.projection_sizes = [
            max(1, self.dataset.dim // 2**j) for j in range(self.config.cutoff_projections) if self.dataset.dim // 2**j
        ] or [1]
        self.stop_action = self.grid.size
        self._ranked = np.lexsort((np.arange(V), -self.counts))  # `frequency_cutoffs`'s ranking

    def _num_actions(self) -> int:
        return max(self.grid.size + 1, len(self.projection_sizes))

    def _num_features(self) -> int:
        return 4 + 2 * self.config.cutoff_max_clusters

    def describe_action(self, action: int) -> str:
        """What an action index means in the current phase."""
        if self._choosing_projection:
            return f"projection to {self.projection_sizes[action]} dimensions"
        return "stop" if action == self.stop_action else f"cutoff at rank {self.grid[action]}"

    def _start(self) -> None:
        self.cutoffs: list[int] = []
        self.projections: list[int] = []
        self._choosing_projection = False
        self._stopped = False

    def _decisions_left(self) -> bool:
        if self._stopped or (not self._choosing_projection and len(self.cutoffs) == self.config.cutoff_max_clusters):
            return False
        return self._choosing_projection or not self.cutoffs or self.cutoffs[-1] < self.grid[-1]

    def _legal(self) -> np.ndarray:
        legal = np.zeros(self.action_space.n, dtype=bool)
        if self._choosing_projection:
            legal[: len(self.projection_sizes)] = True
        else:
            legal[: self.grid.size] = self.grid > (self.cutoffs[-1] if self.cutoffs else 0)
            legal[self.stop_action] = True
        return legal

    def _apply(self, action: int) -> list[NodeContent]:
        if self._choosing_projection:
            self.projections.append(self.projection_sizes[action])
            self._choosing_projection = False
        elif action == self.stop_action:
            self._stopped = True
        else:
            self.cutoffs.append(int(self.grid[action]))
            self._choosing_projection = True
            if len(self.cutoffs) > 1:  # the previous tail cluster now ends here: its node is fixed
                start, end = self.cutoffs[-2:]
                if end - start > 1:  # (a cluster of one class is a leaf of the root)
                    size = self.projections[-1]
                    classes = self._ranked[start:end]
                    return [NodeContent(tuple(classes[:, None]), size if size < self.dataset.dim else 0)]
        return []

    def _finish(self) -> tuple[Tree, dict[int, int]]:
        if len(self.projections) < len(self.cutoffs):
            self.projections.append(self.dataset.dim)
        return projected_cutoffs(self.counts, self.cutoffs, self.projections, self.dataset.dim)

    def _features(self) -> np.ndarray:
        K, V, P = self.config.cutoff_max_clusters, self.num_classes, self.config.cutoff_projections
        per_cluster = np.zeros((K, 2))
        for i, cut in enumerate(self.cutoffs):
            per_cluster[i, 0] = np.log(cut) / np.log(V)
        for i, size in enumerate(self.projections):
            per_cluster[i, 1] = np.log2(self.dataset.dim / size) / P
        last = np.log(self.cutoffs[-1]) / np.log(V) if self.cutoffs else 0.0
        head = [float(self._choosing_projection), len(self.cutoffs) / K, self._steps / (2 * K), last]
        return np.concatenate([head, per_cluster.ravel()])

    def _render_state(self) -> str:
        return f"cutoffs {self.cutoffs}, projections {self.projections}"


def adaptive_softmax_actions(env: CutoffsEnv, cutoffs: list[int], div_value: float = 4.0) -> list[int]:
    """The action sequence giving PyTorch-style ``cutoffs`` with ``div_value`` (sizes ``dim // div**(i+1)``).

    Raises:
        ValueError: when a cutoff is not on the grid or a projection size is not offered.
    """
    actions = []
    for i, cut in enumerate(cutoffs):
        where = np.flatnonzero(env.grid == cut)
        if where.size == 0:
            raise ValueError(f"cutoff {cut} is not on the grid {env.grid.tolist()}")
        size = max(1, int(env.dataset.dim // div_value ** (i + 1)))
        if size not in env.projection_sizes:
            raise ValueError(f"projection size {size} is not among {env.projection_sizes}")
        actions += [int(where[0]), env.projection_sizes.index(size)]
    if len(cutoffs) < env.config.cutoff_max_clusters:
        actions.append(env.stop_action)
    return actions
