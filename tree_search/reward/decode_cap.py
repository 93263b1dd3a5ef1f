"""`DecodeCap`: a cap on decoding time beside a search's own cap in training time (``--decode-cap``).

A tree good for training can be slow to decode (a deep binary tree trains fast per token
and decodes slowest), so a search capped in training time may also be held to a decoding
budget. The decoding time is the profile's prediction (`tree_search.cost.DecodeCost`,
bound to the dataset's replayed class distributions), in multiples of binary Huffman's.
Every place that decides whether a tree fits the caps asks `DecodeCap.admits`: the
environments' scorer, ``dp``'s knapsack, the evaluator's record, the finalists and the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tree_search.cost import DecodeCost, head_cost, parse_cost_spec
from tree_search.data.features import FeatureDataset, default_device
from tree_search.tree import Tree

__all__ = ["DecodeCap", "decode_cap_for", "fits_decode_cap"]

TOLERANCE = 1e-9  # relative slack of every decoding-cap comparison (rounding of sums over nodes)


def fits_decode_cap(ratio: float, multiple: float) -> bool:
    """Whether a decoding time of ``ratio`` x binary Huffman's fits a cap of ``multiple`` (0: no cap; NaN: no)."""
    return not multiple or ratio <= multiple * (1 + TOLERANCE)  # NaN compares False


@dataclass(frozen=True, eq=False)
class DecodeCap:
    """Trees whose predicted decoding time is at most ``multiple`` x binary Huffman's (``unit``) fit."""

    model: DecodeCost  # bound to the dataset's replay
    counts: np.ndarray
    dim: int
    unit: float  # binary Huffman's predicted decoding seconds per query
    multiple: float  # the cap, in multiples of ``unit``

    @property
    def limit(self) -> float:
        """The cap in predicted seconds per query."""
        return self.multiple * self.unit

    def seconds(self, tree: Tree, projections: Mapping[int, int] | None = None) -> float:
        """Predicted decoding seconds per query of the head on ``tree``."""
        return head_cost(tree, self.counts, self.dim, projections or None, self.model)

    def ratio(self, tree: Tree, projections: Mapping[int, int] | None = None) -> float:
        """Predicted decoding time in multiples of binary Huffman's."""
        return self.seconds(tree, projections) / self.unit

    def admits_ratio(self, ratio: float) -> bool:
        """Whether a decoding time of ``ratio`` x binary Huffman's fits the cap."""
        return fits_decode_cap(ratio, self.multiple)

    def admits(self, tree: Tree, projections: Mapping[int, int] | None = None) -> bool:
        """Whether ``tree``'s predicted decoding time fits the cap."""
        return self.admits_ratio(self.ratio(tree, projections))


def decode_cap_for(cost: str, multiple: float, dataset: FeatureDataset) -> DecodeCap | None:
    """The decoding cap of a search whose costs are ``cost`` (``measured[:PROFILE]``); None when ``multiple`` is 0.

    The decoding model is the same profile's decoding side, bound to ``dataset``.

    Raises:
        ValueError: ``cost`` is not training time from a profile.
        tree_search.cost.ProfileError: the profile has no decoding model.
    """
    if not multiple:
        return None
    from tree_search.heads.timing import resolve_cost  # the profile's file and device checks, in one place
    from tree_search.reward.reward import huffman_cost

    kind, path = parse_cost_spec(cost)
    if kind != "measured":
        raise ValueError(f"a decoding cap needs costs in training time ('measured[:PROFILE]'), not {cost!r}")
    model = resolve_cost(f"decode:{path}" if path else "decode", dim=dataset.dim, device_type=default_device().type,
                         dataset=dataset)  # fmt: skip
    return DecodeCap(model, dataset.class_weights, dataset.dim, huffman_cost(dataset, model), float(multiple))
