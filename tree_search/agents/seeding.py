"""Seeding a search with the classic trees its environment can express.

The episodes that repeat one action at every step build, in the split environment,
exactly the homogeneous classic trees (k-means or PCA trees of each fanout,
frequency-ordered splits, head-and-tail shapes, the full softmax). A search starts from
them so that it is never worse than the classic trees it is compared with: Optuna
enqueues them as its first trials (`tree_search.agents.optuna_search`), RLlib plays them
as its first episodes and clones the best one's actions into the initial policy
(`tree_search.agents.rllib_search`). At most half of the remaining budget goes to them,
the most expensive trees within the cap first (cost buys loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tree_search.agents.base import EnvFactory
from tree_search.cost import head_cost
from tree_search.envs import SearchStopped
from tree_search.reward.evaluator import Evaluator
from tree_search.tree import Tree

__all__ = ["SeedEpisode", "homogeneous_episodes", "nearest_legal", "seed_episodes"]


def nearest_legal(action: int, legal: np.ndarray) -> int:
    """The legal index nearest to ``action`` (the lower one on a tie)."""
    indices = np.flatnonzero(legal)
    return int(indices[np.argmin(np.abs(indices - action))])


@dataclass(frozen=True)
class SeedEpisode:
    """One homogeneous episode: the action it repeats, its steps, its tree, and whether the tree fits the cap."""

    action: int
    steps: int
    tree: Tree
    within_cap: bool
    cost: float  # expected multiply-adds per token under the training counts

    @property
    def params(self) -> dict[str, int]:
        """Its Optuna parameters ``{"a0": action, "a1": action, ...}``."""
        return {f"a{step}": self.action for step in range(self.steps)}


def homogeneous_episodes(env_factory: EnvFactory, seed: int = 0) -> list[SeedEpisode]:
    """The episodes that repeat one action, one per distinct tree.

    Each episode is played without a reward (only its tree is built); episodes whose
    trees coincide (an action illegal at some step falls back to its nearest legal
    neighbour) are kept once. A tree within the cap would be trained (and counted); one
    over it would only be penalised.
    """

    def no_reward(tree, projections=None):
        raise SearchStopped("tree only")  # the episode ends truncated; its tree is kept in `last_tree`

    env = env_factory(no_reward)
    seen, out = set(), []
    for action in range(int(env.action_space.n)):
        _, info = env.reset(seed=seed)
        done, truncated, steps = False, False, 0
        while not (done or truncated):
            _, _, done, truncated, info = env.step(nearest_legal(action, info["action_mask"]))
            steps += 1
        tree = env.unwrapped.last_tree
        if tree.canonical_hash not in seen:
            seen.add(tree.canonical_hash)
            cost = head_cost(tree, env.unwrapped.counts, 1)  # multiply-adds (per dimension), projections aside
            out.append(SeedEpisode(action, steps, tree, truncated, cost))  # truncated: a reward was asked: within cap
    return out


def seed_episodes(
    env_factory: EnvFactory, evaluator: Evaluator, seed: int = 0
) -> tuple[list[SeedEpisode], list[SeedEpisode]]:
    """``(to train, free)``: the homogeneous episodes a search starts from.

    To train: those within the cap that the evaluator does not know, the most expensive
    first, at most half the remaining budget (at least one). Free: those it knows (their
    reward is read back) and those over the cap (penalised without training).
    """
    episodes = homogeneous_episodes(env_factory, seed)
    new = [e for e in episodes if e.within_cap and not evaluator.knows(e.tree.canonical_hash)]
    new.sort(key=lambda e: -float(f"{e.cost:.12g}"))  # trees of equal cost (up to rounding) keep their action order
    left = evaluator.remaining
    chosen = new[: max(1, left // 2)] if left is not None else new
    free = [e for e in episodes if not e.within_cap or evaluator.knows(e.tree.canonical_hash)]
    return chosen, free
