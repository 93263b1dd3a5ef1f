"""The one terminal reward every environment uses, its split over nodes, and the data they need.

`EpisodeScorer` turns a finished tree into a reward: it applies the cost rule of the
`TreeEnvConfig` and, when the tree is within the rules, asks a `RewardFunction` for the
validation loss. The default `LocalReward` trains the head in this process through
`tree_search.reward.evaluate` (cached by canonical tree hash, in memory and on disk);
searchers pass their own `RewardFunction` (an `Evaluator`) to share, deduplicate and
distribute evaluations.

`DenseRewards` (``reward_mode="dense"``) pays that same reward out node by node: each
decision that fixes a node's content is rewarded at once by minus the node's share of
the validation NLL, and the last step gets the exact remainder, so an episode's rewards
add up to the terminal reward (docs/architecture.md, "The reward splits over nodes").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from tree_search.cost import head_cost, node_costs
from tree_search.data.features import FeatureDataset, class_embeddings, default_device, load_feature_folder
from tree_search.data.npz_dataset import load_npz_dataset
from tree_search.data.planted import PlantedConfig, make_planted
from tree_search.data.prepare import prepare_dataset
from tree_search.data.vocab import DataError
from tree_search.envs.config import TreeEnvConfig
from tree_search.heads.timing import resolve_cost
from tree_search.reward.decode_cap import decode_cap_for
from tree_search.reward.node_train import NodeRecipe
from tree_search.reward.reward import (
    Result,
    evaluate,
    full_softmax_cost,
    huffman_cost,
    node_nll_shares,
    training_failure,
)
from tree_search.tree import Tree

__all__ = [
    "ChargesNodes",
    "DenseRewards",
    "EpisodeScorer",
    "LocalReward",
    "NodeContent",
    "RewardFunction",
    "SearchStopped",
    "class_embeddings",
    "load_env_dataset",
    "node_tree",
]


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


class ChargesNodes(Protocol):
    """A `RewardFunction` that also counts node losses revealed outside evaluations against a budget (optional)."""

    def charge_nodes(self, tree: Tree, projections: Mapping[int, int] | None, nodes_revealed: int) -> None:
        """Dense rewards revealed the losses of ``nodes_revealed`` nodes of ``tree`` (see `Evaluator.charge_nodes`)."""
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
    """`RewardFunction` that trains heads in this process with `tree_search.reward.evaluate`."""

    dataset: FeatureDataset
    train: NodeRecipe = NodeRecipe()
    seeds: int = 1
    node_bank: bool = True  # reuse results of trees trained before (memory and disk)

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """Train and score ``tree`` on the validation split (cached by canonical hash)."""
        return evaluate(
            tree, self.dataset, self.train, seeds=self.seeds, projections=projections, node_bank=self.node_bank
        )


class EpisodeScorer:
    """Applies a config's cost rule to finished trees and turns them into rewards."""

    def __init__(self, config: TreeEnvConfig, dataset: FeatureDataset, reward_fn: RewardFunction | None) -> None:
        self.config = config
        self.dataset = dataset
        self.reward_fn = reward_fn if reward_fn is not None else LocalReward(dataset, config.train, config.seeds)
        self.counts = dataset.class_weights
        self.dim = dataset.dim
        self.cost_model = resolve_cost(config.cost, dim=dataset.dim, device_type=default_device().type, dataset=dataset)
        self.full_cost = full_softmax_cost(dataset, self.cost_model)
        self.huffman_cost = huffman_cost(dataset, self.cost_model)
        self.cap = config.cost_cap * self.huffman_cost
        self.decode_cap = decode_cap_for(config.cost, config.decode_cap, dataset)  # None: no cap on decoding time
        self.floor = math.log(dataset.num_classes)  # the NLL of a uniform guess

    def cost(self, tree: Tree, projections: Mapping[int, int] | None = None) -> float:
        """Cost per token of the head on ``tree``: multiply-adds, or the profile's seconds (``config.cost``)."""
        return head_cost(tree, self.counts, self.dim, projections, self.cost_model)

    def charge_nodes(self, tree: Tree, projections: Mapping[int, int] | None, nodes_revealed: int) -> None:
        """Tell the reward function (when it keeps a budget, `ChargesNodes`) of node losses dense rewards revealed."""
        charge = getattr(self.reward_fn, "charge_nodes", None)
        if charge is not None and nodes_revealed > 0:
            charge(tree, projections or None, nodes_revealed)

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
        if self.config.cost_mode == "cap":
            excess = cost / self.cap - 1.0 if cost > self.cap * (1 + 1e-9) else 0.0
            if self.decode_cap is not None:
                ratio = info["decode_vs_huffman"] = self.decode_cap.ratio(tree, projections)
                if not self.decode_cap.admits_ratio(ratio):
                    excess += ratio / self.decode_cap.multiple - 1.0
            if excess > 0:  # over either cap: the penalty grows with how far over both it is
                info["over_cap"] = True
                return -self.floor - self.config.cap_penalty * excess, info
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


class NodeContent(NamedTuple):
    """An internal node as the reward sees it: what lies below each child, and its projection.

    A node's trained result depends on nothing else (its content key, `node_keys`), so a
    decision that fixes these is rewarded at once in dense mode.
    """

    children: tuple[np.ndarray, ...]  # the class ids below each child, in child order (one class: a leaf)
    projection: int = 0  # projected dimension of the node (0: none, the full feature dimension)


def node_tree(num_classes: int, node: NodeContent) -> tuple[Tree, int, dict[int, int]]:
    """The smallest tree over all the classes that holds ``node``: ``(tree, the node's id, projections)``.

    The node's children are exactly ``node.children`` (a one-class set is a leaf, a larger
    one a flat node); the classes outside the node are leaves of a root above it, unless the
    node holds every class, when it is the root. Its content key is therefore the one it has
    in every tree that contains it, and the node bank answers for it.

    Example:
        >>> tree, node, _ = node_tree(5, NodeContent((np.array([1]), np.array([2, 3]))))
        >>> tree.children_lists(), node
        ([[6, 0, 4], [1, 7], [2, 3]], 1)
    """
    V = int(num_classes)
    sets = [np.asarray(c, dtype=np.int64).ravel() for c in node.children]
    outside = np.setdiff1d(np.arange(V), np.concatenate(sets))
    top = int(outside.size > 0)  # the node's id: 1 below a root of the outside classes, else the root
    children: list[list[int]] = [[V + 1, *outside.tolist()]] if top else []
    kids: list[int] = []
    flat: list[list[int]] = []
    for classes in sets:
        if classes.size == 1:
            kids.append(int(classes[0]))
        else:
            kids.append(V + top + 1 + len(flat))
            flat.append(sorted(classes.tolist()))
    tree = Tree(V, [*children, kids, *flat])
    return tree, top, ({top: int(node.projection)} if node.projection else {})


class DenseRewards:
    """Pays an episode's terminal reward out node by node (``reward_mode="dense"``); used by `TreeEnv.step`.

    Life cycle: `reset` when an episode starts; `step` after each decision that does not end
    it, with the nodes whose content that decision fixed: their reward is minus each node's
    share of the validation NLL, ``-min_m L_n[m] / N`` (``L_n[m]``: the node's validation loss
    sum at measurement m, N: the validation tokens of the sample; the mean over the config's
    seeds, as `evaluate` does), and in the tradeoff cost mode also minus ``cost_weight`` x the
    node's share of the expected cost (visit probability x fanout x dim, projections as in
    `head_cost`) over the full softmax's; `remainder` at the end: the terminal reward (what
    terminal mode gives, whatever the outcome: within the cap, over it, failed) minus what was
    given, so that the episode's rewards add up to it exactly.

    Node losses come from the node bank of ``config.train`` on ``config.dense_device`` (the
    bank `evaluate` reads on that device class: whole-tree evaluations there reuse these nodes,
    and these reuse theirs), training a missing node now. These queries are not evaluations
    of a tree: they never go through the environment's `RewardFunction` nor count in its budget.
    """

    def __init__(self, scorer: EpisodeScorer) -> None:
        """Args: scorer: the environment's `EpisodeScorer` (its config, dataset, counts and costs)."""
        self.scorer = scorer
        config = scorer.config
        self.device = default_device() if config.dense_device == "auto" else torch.device(config.dense_device)
        self.totals = {"trained": 0, "reused": 0}  # node queries of every episode so far (one per seed)
        self._episode = dict(self.totals)
        self._given: list[float] = []

    def reset(self) -> None:
        """Start an episode: nothing given yet."""
        self._given = []
        self._episode = {"trained": 0, "reused": 0}

    def node_share(self, node: NodeContent) -> float:
        """Node's share of the validation NLL (nats/token, mean over the seeds), from the bank or trained now."""
        tree, index, projections = node_tree(self.scorer.dataset.num_classes, node)
        shares, counters = node_nll_shares(tree, self.scorer.dataset, self.scorer.config.train,
                                           seeds=self.scorer.config.seeds, projections=projections,
                                           device=self.device, nodes=np.array([index]))  # fmt: skip
        for how in ("trained", "reused"):
            self._episode[how] += counters[f"nodes_{how}"]
            self.totals[how] += counters[f"nodes_{how}"]
        return float(shares[0])

    def node_cost(self, node: NodeContent) -> float:
        """Node's share of the cost per token (`node_costs`, under the scorer's cost model)."""
        tree, index, projections = node_tree(self.scorer.dataset.num_classes, node)
        costs = node_costs(tree, self.scorer.counts, self.scorer.dim, projections, self.scorer.cost_model)
        return float(costs[index])

    def step(self, nodes: Sequence[NodeContent]) -> tuple[float, dict[str, Any]]:
        """Reward of a decision that fixed ``nodes`` (none: 0), and its ``info`` entries.

        A genuine training failure of a node (non-finite loss, out of memory) gives it 0
        here, with the error in ``info["node_error"]``; the remainder still makes the sum exact.
        """
        if not nodes:
            return 0.0, {"node_reward": None}
        reward, info = 0.0, {}
        for node in nodes:
            try:
                share = self.node_share(node)
            except Exception as err:  # noqa: BLE001 - only genuine training failures become a result
                if not training_failure(err):
                    raise
                info["node_error"] = f"{type(err).__name__}: {err}"
                continue
            reward -= share
            if self.scorer.config.cost_mode == "tradeoff":
                reward -= self.scorer.config.cost_weight * self.node_cost(node) / self.scorer.full_cost
        self._given.append(reward)
        return reward, {"node_reward": reward, **info}

    def remainder(self, terminal: float) -> float:
        """The last step's reward: ``terminal`` minus every reward given in this episode."""
        return terminal - math.fsum(self._given)

    def queries(self) -> dict[str, int]:
        """This episode's node queries (one per node and seed): trained now vs answered by the bank."""
        return dict(self._episode)
