"""Gymnasium environments in which an episode builds one tree, rewarded by held-out loss.

Registered ids (lazy entry points): ``TreeSearch/Split-v1`` (top-down splits, any V),
``TreeSearch/Merge-v0`` (bottom-up merges), ``TreeSearch/Cutoffs-v0`` (adaptive-softmax
cutoffs and projections). `make_env` is the RLlib-ready factory: ``env_config`` dict in,
environment out. ``reward_mode="dense"`` pays each episode's terminal reward out node by
node as decisions fix nodes (`DenseRewards`), with exactly the same sum.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from tree_search.envs.config import REWARD_MODES, TreeEnvConfig
from tree_search.envs.scoring import (
    DenseRewards,
    EpisodeScorer,
    LocalReward,
    NodeContent,
    RewardFunction,
    SearchStopped,
    class_embeddings,
    load_env_dataset,
    node_tree,
)

__all__ = [
    "ENV_IDS",
    "REWARD_MODES",
    "DenseRewards",
    "EpisodeScorer",
    "LocalReward",
    "NodeContent",
    "RewardFunction",
    "SearchStopped",
    "TreeEnvConfig",
    "class_embeddings",
    "env_class",
    "load_env_dataset",
    "make_env",
    "node_tree",
]

ENV_IDS = {
    "split": "TreeSearch/Split-v1",
    "merge": "TreeSearch/Merge-v0",
    "cutoffs": "TreeSearch/Cutoffs-v0",
}
_ENTRY_POINTS = {
    "split": "tree_search.envs.split:SplitEnv",
    "merge": "tree_search.envs.merge:MergeEnv",
    "cutoffs": "tree_search.envs.cutoffs:CutoffsEnv",
}

for _name, _id in ENV_IDS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_ENTRY_POINTS[_name])


def env_class(name: str) -> type[gym.Env]:
    """The environment class of ``"split"``, ``"merge"`` or ``"cutoffs"``."""
    if name not in _ENTRY_POINTS:
        raise ValueError(f"unknown environment {name!r}; choose one of {sorted(_ENTRY_POINTS)}")
    module, attribute = _ENTRY_POINTS[name].split(":")
    return getattr(__import__(module, fromlist=[attribute]), attribute)


def make_env(env_config: dict[str, Any] | None = None, **kwargs: Any) -> gym.Env:
    """RLlib-ready factory: ``env_config["env"]`` names the environment, the rest are `TreeEnvConfig` fields.

    Args:
        env_config: ``{"env": "split" | "merge" | "cutoffs", **TreeEnvConfig fields}``;
            RLlib passes its ``env_config`` here (an ``EnvContext``, a dict).
        **kwargs: passed to the environment (``reward_fn``, ``dataset``, ``render_mode``).
    """
    values = dict(env_config or {})
    name = values.pop("env", "split")
    return env_class(name)(TreeEnvConfig.from_env_config(values), **kwargs)
