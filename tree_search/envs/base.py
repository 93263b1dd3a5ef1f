"""What every tree-building environment shares: config, masking contract, reward, info, render.

Subclasses implement the decision process (`_start`, `_legal`, `_apply`, `_features`,
`_decisions_left`, `_finish`); this class runs the Gymnasium protocol around it, and the
rewards: all at the end (``reward_mode="terminal"``), or node by node (``"dense"``, from the
nodes `_apply` reports as fixed) with the same sum.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from tree_search.cost import visit_probabilities
from tree_search.data.features import FeatureDataset
from tree_search.envs.config import TreeEnvConfig
from tree_search.envs.scoring import (
    DenseRewards,
    EpisodeScorer,
    NodeContent,
    RewardFunction,
    SearchStopped,
    class_embeddings,
    load_env_dataset,
)
from tree_search.split_grammar import normalise_embeddings
from tree_search.tree import Tree

__all__ = ["TreeEnv", "render_tree"]

OBS_LIMIT = 10.0  # every observation feature is clipped to [-OBS_LIMIT, OBS_LIMIT]


def render_tree(tree: Tree, counts: np.ndarray, levels: int = 2, width: int = 8) -> str:
    """Text of a tree's top ``levels``: each node with its classes and share of the counts."""
    V = tree.num_classes
    mass, size = visit_probabilities(tree, counts), tree.subtree_size
    lines = [f"tree: {V} classes, {tree.num_internal} internal nodes, max depth {tree.max_depth}"]
    stack: list[tuple[int, int]] = [(0, 0)]
    while stack:
        node, depth = stack.pop()
        kids = tree.children(node)
        leaves, inner = kids[kids < V], kids[kids >= V] - V
        lines.append(
            f"{'  ' * depth}node {node}: {size[node]} classes, {mass[node]:.1%} of tokens, "
            f"fanout {kids.size} ({leaves.size} leaves)"
        )
        if depth + 1 < levels:
            shown = sorted(inner.tolist(), key=lambda n: -mass[n])
            stack.extend((int(n), depth + 1) for n in reversed(shown[:width]))
            if len(shown) > width:
                lines.append(f"{'  ' * (depth + 1)}... {len(shown) - width} more nodes")
    return "\n".join(lines)


class TreeEnv(gym.Env):
    """Base class of the tree-building environments (see each subclass for its specification)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        config: TreeEnvConfig | dict[str, Any] | None = None,
        *,
        dataset: FeatureDataset | None = None,
        reward_fn: RewardFunction | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        """Create the environment.

        Args:
            config: a `TreeEnvConfig` or a dict of its fields (RLlib's ``env_config``).
            dataset: the features to score trees on (default: loaded from ``config.dataset``).
            reward_fn: how trees are evaluated (default: `LocalReward`, in this process).
            render_mode: ``None`` or ``"ansi"`` (text).
            **overrides: `TreeEnvConfig` fields that replace those of ``config``.
        """
        if isinstance(config, TreeEnvConfig) and overrides:
            config = config.to_env_config()
        if not isinstance(config, TreeEnvConfig):
            config = TreeEnvConfig.from_env_config({**(config or {}), **overrides})
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.config = config
        self.render_mode = render_mode
        self.dataset = dataset if dataset is not None else load_env_dataset(config)
        self.scorer = EpisodeScorer(config, self.dataset, reward_fn)
        self.dense = DenseRewards(self.scorer) if config.reward_mode == "dense" else None
        self.counts = self.scorer.counts
        self.mass = self.counts / self.counts.sum()
        self.num_classes = self.dataset.num_classes
        self._embeddings: np.ndarray | None = None
        self._setup()
        n = self._num_actions()
        self.action_space = spaces.Discrete(n)
        self.observation_space = spaces.Dict(
            {
                "observations": spaces.Box(-OBS_LIMIT, OBS_LIMIT, (self._num_features(),), np.float32),
                "action_mask": spaces.Box(0.0, 1.0, (n,), np.float32),
            }
        )
        self._steps = 0
        self._done = True
        self.last_tree: Tree | None = None
        self.last_projections: dict[int, int] = {}  # the last tree's projected nodes: node -> dimensions
        self.last_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ shared helpers
    @property
    def embeddings(self) -> np.ndarray:
        """(V, e) class embeddings, scaled and centred once (as `cluster_tree` does)."""
        if self._embeddings is None:
            self._embeddings = normalise_embeddings(class_embeddings(self.dataset))
        return self._embeddings

    # ------------------------------------------------------------------ subclass hooks
    def _setup(self) -> None:  # noqa: B027 - optional hook
        """Precompute what does not change between episodes."""

    @abstractmethod
    def _num_actions(self) -> int: ...

    @abstractmethod
    def _num_features(self) -> int: ...

    @abstractmethod
    def _start(self) -> None:
        """Reset the episode state."""

    @abstractmethod
    def _legal(self) -> np.ndarray:
        """(n,) bool: the legal actions in the current state."""

    @abstractmethod
    def _apply(self, action: int) -> Sequence[NodeContent]:
        """Carry out one legal action; return the nodes whose content it fixed (dense rewards pay for them)."""

    @abstractmethod
    def _decisions_left(self) -> bool:
        """Whether the agent has anything left to decide (ignoring ``max_steps``)."""

    @abstractmethod
    def _features(self) -> np.ndarray:
        """The ``observations`` vector of the current state."""

    @abstractmethod
    def _finish(self) -> tuple[Tree, dict[int, int]]:
        """Complete the tree by the fixed rule; return it and its per-node projections."""

    def describe_action(self, action: int) -> str:
        """What an action index means, in words."""
        return str(action)

    def _render_state(self) -> str:
        return ""

    # ------------------------------------------------------------------ Gymnasium protocol
    def _observation(self, legal: np.ndarray) -> dict[str, np.ndarray]:
        features = np.clip(np.nan_to_num(self._features(), nan=0.0), -OBS_LIMIT, OBS_LIMIT).astype(np.float32)
        return {"observations": features, "action_mask": legal.astype(np.float32)}

    def action_masks(self) -> np.ndarray:
        """(n,) bool legal actions now (the same as ``info["action_mask"]``)."""
        if self._done:
            return np.zeros(self.action_space.n, dtype=bool)
        return self._legal()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a new tree (see the subclass's Starting State)."""
        super().reset(seed=seed)
        self._steps = 0
        self._done = False
        if self.dense is not None:
            self.dense.reset()
        self._start()
        legal = self._legal()
        self.last_info = {"action_mask": legal.astype(np.int8), "step": 0}
        return self._observation(legal), dict(self.last_info)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Carry out ``action``; its reward (terminal mode: 0 until the end; dense: see `DenseRewards`)."""
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        legal = self._legal()
        try:
            index = int(action)
        except (TypeError, ValueError):
            raise ValueError(f"action must be an integer in 0..{legal.size - 1}, got {action!r}") from None
        if not (0 <= index < legal.size and index == action and legal[index]):
            allowed = np.flatnonzero(legal).tolist()
            raise ValueError(f"action {action!r} is not legal in this state; legal actions: {allowed}")
        described = self.describe_action(index)
        fixed = self._apply(index)
        self._steps += 1
        info: dict[str, Any] = {"step": self._steps, "action": described}
        reward, truncated = 0.0, False
        if self._steps >= self.config.max_steps or not self._decisions_left():
            self._done = True
            tree, projections = self._finish()
            try:
                reward, scored = self.scorer.score(tree, projections)
            except SearchStopped as stopped:  # the search is over: no reward exists, the episode is cut short
                truncated, scored = True, {"tree": tree, "stopped": str(stopped)}
            info.update(scored)
            if self.dense is not None:  # the last decision's node and the finished rest: the exact remainder
                if not truncated:
                    info["terminal_reward"] = reward
                    reward = self.dense.remainder(reward)
                    # the node losses this episode's rewards revealed count against the search's budget (unless
                    # the tree's counted evaluation paid for them); a node is queried once per seed
                    revealed = sum(self.dense.queries().values()) // max(1, self.scorer.config.seeds)
                    self.scorer.charge_nodes(tree, projections, revealed)
                info.update(node_reward=None, dense_node_queries=self.dense.queries())
            self.last_tree, self.last_projections = tree, dict(projections)
            # After the end no action is legal; the mask is all ones so learners never see an empty mask.
            next_legal = np.ones(self.action_space.n, dtype=bool)
            observation = {
                "observations": np.zeros(self.observation_space["observations"].shape, np.float32),
                "action_mask": next_legal.astype(np.float32),
            }
        else:
            if self.dense is not None:
                reward, paid = self.dense.step(fixed)
                info.update(paid)
            next_legal = self._legal()
            observation = self._observation(next_legal)
        info["action_mask"] = next_legal.astype(np.int8)
        self.last_info = info
        return observation, float(reward), self._done and not truncated, truncated, info

    def render(self) -> str | None:
        """Text: the decisions still open, or the finished tree's top levels (``render_mode="ansi"``)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; create the environment with render_mode='ansi'")
            return None
        if self._done and self.last_tree is not None:
            return render_tree(self.last_tree, self.counts)
        return f"step {self._steps}/{self.config.max_steps}\n{self._render_state()}"
