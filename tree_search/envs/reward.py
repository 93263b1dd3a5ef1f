"""The one terminal reward every environment uses, and the data it needs.

`EpisodeScorer` turns a finished tree into a reward: it applies the cost rule of the
`TreeEnvConfig` and, when the tree is within the rules, asks a `RewardFunction` for the
validation loss. The default `LocalReward` trains the head in this process through
`tree_search.heads.evaluate` (cached by canonical tree hash, in memory and on disk);
searchers pass their own `RewardFunction` (an `Evaluator`) to share, deduplicate and
distribute evaluations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tree_search.builders import huffman
from tree_search.data.features import FeatureDataset, class_embeddings, load_feature_folder
from tree_search.data.npz_dataset import load_npz_dataset
from tree_search.data.planted import PlantedConfig, make_planted
from tree_search.data.prepare import prepare_dataset
from tree_search.data.vocab import DataError
from tree_search.envs.config import TreeEnvConfig
from tree_search.heads.node_train import NodeRecipe
from tree_search.heads.reward import Result, evaluate, head_cost
from tree_search.tree import Tree

__all__ = ["EpisodeScorer", "LocalReward", "RewardFunction", "SearchStopped", "class_embeddings", "load_env_dataset"]


class SearchStopped(RuntimeError):
    """Raised by a `RewardFunction` when the search is over (budget or time used up).

    The environment then truncates the episode without a reward (learners bootstrap a
    truncated episode's value instead of taking a made-up reward for its outcome).
    """


class RewardFunction(Protocol):
    """Anything that trains a head on a tree and returns its validation `Result`."""

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """Evaluate ``tree`` (with optional per-node projections) on the validation split."""
        ...


@functools.lru_cache(maxsize=4)
def _load(dataset: str, planted: PlantedConfig) -> FeatureDataset:
    if dataset == "builtin":
        return prepare_dataset()
    if dataset == "planted":
        return make_planted(planted).to_dataset()
    path = Path(dataset).expanduser()
    if path.suffix == ".npz":
        return load_npz_dataset(path)
    if path.is_dir():
        loaded = load_feature_folder(path)
        if loaded is None:
            raise DataError(f"{path}: not a complete prepared feature folder (no info.json)")
        return loaded
    raise DataError(
        f"TreeEnvConfig.dataset: {dataset!r} is neither 'builtin', 'planted', an existing .npz file "
        "nor a prepared feature folder (see `tree-search data show`)"
    )


def load_env_dataset(config: TreeEnvConfig) -> FeatureDataset:
    """The dataset an environment scores trees on (loaded once per process and kept)."""
    return _load(config.dataset, config.planted)


@dataclass(frozen=True)
class LocalReward:
    """`RewardFunction` that trains heads in this process with `tree_search.heads.evaluate`."""

    dataset: FeatureDataset
    train: NodeRecipe = NodeRecipe()
    seeds: int = 1
    use_cache: bool = True  # reuse results of trees trained before (memory and disk)

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """Train and score ``tree`` on the validation split (cached by canonical hash)."""
        return evaluate(
            tree, self.dataset, self.train, seeds=self.seeds, projections=projections, use_cache=self.use_cache
        )


class EpisodeScorer:
    """Applies a config's cost rule to finished trees and turns them into rewards."""

    def __init__(self, config: TreeEnvConfig, dataset: FeatureDataset, reward_fn: RewardFunction | None) -> None:
        self.config = config
        self.dataset = dataset
        self.reward_fn = reward_fn if reward_fn is not None else LocalReward(dataset, config.train, config.seeds)
        counts = np.asarray(dataset.counts, dtype=np.float64)
        self.counts = counts if counts.sum() > 0 else np.ones(dataset.num_classes)
        self.dim = dataset.dim
        self.full_cost = float(dataset.num_classes * dataset.dim)
        self.huffman_cost = huffman(self.counts, 2).expected_cost(self.counts, self.dim)
        self.cap = config.cost_cap * self.huffman_cost
        self.floor = math.log(dataset.num_classes)  # the NLL of a uniform guess

    def cost(self, tree: Tree, projections: Mapping[int, int] | None = None) -> float:
        """Expected multiply-adds per token of the head on ``tree``."""
        return head_cost(tree, self.counts, self.dim, projections)

    def score(self, tree: Tree, projections: Mapping[int, int] | None = None) -> tuple[float, dict[str, Any]]:
        """The terminal reward of ``tree`` and the ``info`` entries that explain it."""
        cost = self.cost(tree, projections)
        info: dict[str, Any] = {
            "tree": tree,
            "tree_hash": tree.canonical_hash,
            "projections": dict(projections or {}),
            "expected_cost": cost,
            "cost_ratio": cost / self.full_cost,
            "cost_vs_huffman": cost / self.huffman_cost,
            "expected_depth": tree.expected_path_length(self.counts),
            "max_depth": tree.max_depth,
            "num_internal": tree.num_internal,
            "over_cap": False,
            "evaluated": False,
            "result": None,
            "error": None,
        }
        if self.config.cost_mode == "cap" and cost > self.cap * (1 + 1e-9):
            info["over_cap"] = True
            return -self.floor - self.config.cap_penalty * (cost / self.cap - 1.0), info
        result = self.reward_fn(tree, projections or None)
        info["evaluated"] = True
        info["result"] = result.to_json()
        if not result.ok or not math.isfinite(result.valid_nll):
            info["error"] = result.error or f"non-finite validation NLL {result.valid_nll}"
            return -self.floor - self.config.failure_penalty, info
        reward = -result.valid_nll
        if self.config.cost_mode == "tradeoff":
            reward -= self.config.cost_weight * cost / self.full_cost
        return reward, info
