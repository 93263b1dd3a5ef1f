"""`TreeEnvConfig`: what every tree-building environment shares, and the RLlib-ready factory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from tree_search.builders import UNKNOWN_MODES
from tree_search.cost import parse_cost_spec
from tree_search.data.planted import PlantedConfig
from tree_search.reward.node_train import NodeRecipe

__all__ = ["COST_MODES", "REWARD_MODES", "TreeEnvConfig"]

COST_MODES = ("cap", "tradeoff")
REWARD_MODES = ("terminal", "dense")


@dataclass(frozen=True)
class TreeEnvConfig:
    """Data, reward and episode settings of a tree-building environment.

    The reward is always measured on the validation split; the test split is never
    read by an environment.
    """

    # --- data
    dataset: str = "builtin"  # "builtin" (code corpus), "planted", a .npz file, or a prepared feature folder
    planted: PlantedConfig = field(default_factory=PlantedConfig)  # used when dataset == "planted"
    # --- reward
    train: NodeRecipe = field(default_factory=NodeRecipe)  # node recipe of one evaluation (the reward's fidelity)
    seeds: int = 1  # training seeds averaged per evaluation
    cost_mode: str = "cap"  # "cap": over-cap trees are penalised; "tradeoff": reward -= cost_weight * cost ratio
    cost_cap: float = 2.0  # cap on expected cost per token, in multiples of binary Huffman's
    cost: str = "macs"  # "macs" (multiply-adds), "measured[:PROFILE]" or "decode[:PROFILE]" (a device's time)
    decode_cap: float = 0.0  # with cost "measured": also cap decoding time, in multiples of binary Huffman's (0: none)
    cap_penalty: float = 1.0  # over the cap: reward = -ln V - cap_penalty * (cost / cap - 1); no training
    cost_weight: float = 1.0  # lambda of the tradeoff mode: reward = -NLL - lambda * cost / full-softmax cost
    failure_penalty: float = 1.0  # a failed evaluation (NaN, OOM): reward = -ln V - failure_penalty
    reward_mode: str = "terminal"  # "terminal": all at the end; "dense": each new node's share at once, same sum
    dense_device: str = "auto"  # where dense mode trains its nodes ("auto": CUDA when available, as the evaluator)
    # --- episodes
    max_steps: int = 16  # decisions per episode; the rest of the tree is finished by a fixed rule
    fanouts: tuple[int, ...] = (2, 4, 8, 16)  # fanouts an action may choose
    seed: int = 0  # seeds k-means and power iterations: the same actions always build the same tree
    # --- split environment
    split_min_group: int = 64  # groups of at most this many classes are finished by their inherited rule
    split_flat_max: int = 256  # "flat" is legal for groups of at most this many classes (and at the root)
    split_leaf_size: int = 8  # the inherited rule makes groups of at most this many classes flat nodes
    split_head_max: int = 256  # most classes the head of a head-and-tail cut may keep as leaves
    split_classic_shapes: bool = False  # also the adaptive softmax's root splits and projected flat nodes (12 actions)
    # dp's grammar: a root rule, then one completion rule per root part, inherited through the part's whole subtree
    # (classic shapes on, Huffman subtrees of fanouts SPLIT_HUFFMAN_FANOUTS, flat nodes of any size)
    split_two_level: bool = False
    taxonomy: str = ""  # a taxonomy file (child<TAB>parent .tsv or .json): the split episode starts below its level
    taxonomy_level: int = 1  # the taxonomy's nodes at this depth are the starting groups; the levels above are fixed
    taxonomy_unknown: str = "catch-all"  # classes absent from the taxonomy: "catch-all", "frequency" or "error"
    # --- merge environment
    merge_candidates: int = 8  # m: the m lightest roots plus the m nearest to the lightest are candidates
    merge_max_leaves: int = 512  # above this V, the forest starts from merge_groups Huffman-built groups
    merge_groups: int = 256  # K initial groups for large V
    # --- cutoff environment
    cutoff_max_clusters: int = 4  # most tail clusters
    cutoff_projections: int = 8  # projection choices: dim, dim/2, ..., dim/2**(n-1)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"TreeEnvConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.split_classic_shapes, bool):
            raise bad("split_classic_shapes", "True or False")
        if not isinstance(self.split_two_level, bool):
            raise bad("split_two_level", "True or False")
        if self.split_two_level and self.taxonomy:
            raise bad("split_two_level", "False with a taxonomy start (dp's grammar decides the root and its parts)")
        if not isinstance(self.taxonomy, str):
            raise bad("taxonomy", "a taxonomy file path (.tsv or .json), or '' for none")
        if self.taxonomy_unknown not in UNKNOWN_MODES:
            raise bad("taxonomy_unknown", f"one of {UNKNOWN_MODES}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise bad("dataset", "'builtin', 'planted', a .npz path or a feature folder")
        if not isinstance(self.planted, PlantedConfig):
            raise bad("planted", "a PlantedConfig (or a dict of its fields in env_config)")
        if not isinstance(self.train, NodeRecipe):
            raise bad("train", "a NodeRecipe (or a dict of its fields in env_config)")
        try:
            parse_cost_spec(self.cost)
        except ValueError:
            raise bad(
                "cost",
                "'macs', 'measured' (training time: this device's profile), 'decode' (decoding time), "
                "or either with ':PROFILE.json'",
            ) from None
        if self.cost_mode not in COST_MODES:
            raise bad("cost_mode", f"one of {COST_MODES}")
        cap = self.decode_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap < math.inf:
            raise bad("decode_cap", "a finite number >= 0 (a multiple of binary Huffman's decoding time; 0: none)")
        if cap and (parse_cost_spec(self.cost)[0] != "measured" or self.cost_mode != "cap"):
            raise bad("decode_cap", "0 unless costs are training time under a cap (cost 'measured[:PROFILE]', "
                      f"cost_mode 'cap'; the decoding cap reads the same profile), "
                      f"with cost {self.cost!r}")  # fmt: skip
        if self.reward_mode not in REWARD_MODES:
            raise bad("reward_mode", f"one of {REWARD_MODES} (dense: each decision is rewarded by its node's loss)")
        if not isinstance(self.dense_device, str) or not _is_device(self.dense_device):
            raise bad("dense_device", "'auto' (CUDA when available) or a torch device name such as 'cpu' or 'cuda:0'")
        for name in ("cost_cap",):
            if not (isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < math.inf):
                raise bad(name, "a finite number > 0 (a multiple of binary Huffman's cost; 3-ary Huffman costs ~0.95)")
        for name in ("cap_penalty", "cost_weight", "failure_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise bad(name, "a finite number >= 0")
        minimums = {
            "seeds": 1,
            "max_steps": 1,
            "seed": 0,
            "split_min_group": 2,
            "split_flat_max": 2,
            "split_leaf_size": 2,
            "split_head_max": 1,
            "taxonomy_level": 1,
            "merge_candidates": 2,
            "merge_max_leaves": 2,
            "merge_groups": 2,
            "cutoff_max_clusters": 1,
            "cutoff_projections": 1,
        }
        for name, low in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}")
        fanouts = self.fanouts
        if (
            not isinstance(fanouts, tuple)
            or not fanouts
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in fanouts)
            or list(fanouts) != sorted(set(fanouts))
        ):
            raise bad("fanouts", "a non-empty increasing tuple of distinct integers >= 2")

    @classmethod
    def from_env_config(cls, env_config: Mapping[str, Any] | TreeEnvConfig | None = None) -> TreeEnvConfig:
        """Build from a plain dict (RLlib's ``env_config``, JSON); nested configs may be dicts.

        Raises:
            ValueError: naming unknown keys and listing the known ones.
        """
        if isinstance(env_config, TreeEnvConfig):
            return env_config
        values = dict(env_config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TreeEnvConfig field(s) {unknown}; known fields: {sorted(known)}")
        if isinstance(values.get("planted"), Mapping):
            values["planted"] = PlantedConfig(**values["planted"])
        if isinstance(values.get("train"), Mapping):
            recipe = {f.name for f in fields(NodeRecipe)}
            unknown = sorted(set(values["train"]) - recipe)
            if unknown:  # e.g. a run folder written before the node-exact reward (its `train` was a TrainConfig)
                raise ValueError(
                    f"unknown NodeRecipe field(s) {unknown} in env_config.train; known fields: {sorted(recipe)} "
                    "(a run made by an older version of tree_search cannot be resumed: start a new one)"
                )
            values["train"] = NodeRecipe(**values["train"])
        if isinstance(values.get("fanouts"), list):
            values["fanouts"] = tuple(values["fanouts"])
        return cls(**values)

    def to_env_config(self) -> dict[str, Any]:
        """The inverse of `from_env_config`: a plain, JSON-friendly dict."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("planted", "train"):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def with_updates(self, **changes: Any) -> TreeEnvConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True
