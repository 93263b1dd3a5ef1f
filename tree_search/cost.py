"""What a tree head costs per token: multiply-adds, or time measured on a device (a `CostProfile`).

Two cost models share one shape, a sum over the tree's internal nodes (`docs/architecture.md`,
"The reward splits over nodes"), so caps, fronts, the dense rewards and ``dp`` can use either:

- **multiply-adds** (``"macs"``, the default): node n costs ``visits(n) * fanout(n) * dim``
  (plus its projection), `node_costs` without a model;
- **measured time** (``"measured:PROFILE"``): node n costs the seconds per token that a
  fitted `CostProfile` predicts for it under the layout `TreeSoftmaxHead` gives it
  (`head_layout`): a dense block scored by a matmul, a column of the shared top block
  (scored for every token), or a packed node whose weights are gathered per visit.

The profile is data (JSON, one per device, dimension, batch and precision, written by
``tree-search cost calibrate``); the features and the fit live here. Nothing here needs
torch: the timing itself is `tree_search.heads.timing`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.tree import Tree

__all__ = [
    "FEATURES",
    "LAYOUT_DEFAULTS",
    "PROFILE_FORMAT",
    "CostProfile",
    "HeadLayout",
    "ProfileError",
    "cost_label",
    "fit_coefficients",
    "head_cost",
    "head_layout",
    "layout_features",
    "load_profile",
    "parse_cost_spec",
    "node_costs",
    "visit_probabilities",
]

PROFILE_FORMAT = "tree_search.cost_profile"
# `TreeSoftmaxHead`'s layout settings (`head_layout`); top levels up to 64 columns measured fastest on CPU
# (binary Huffman at V = 10k, the einsum-free head before the fused scores: 27.5 ms a step against 38.9 ms
# with 1,024; `bench_head_time.py --top-columns N` repeats it)
LAYOUT_DEFAULTS = {"dense_fanout": 64, "max_dense_nodes": 32, "top_columns": 64}

# Per-token features of a head's training step (forward + backward), each the sum of its nodes' shares.
FEATURES = (
    "constant",  # 1: per-token work of any tree (targets, the loss)
    "groups",  # weight groups / batch: each group is a few kernels per step, whatever its size
    "packed_pairs",  # visits of packed nodes: index arithmetic and a gather per (token, node) pair
    "packed_macs",  # visits x bucket width x dim of packed nodes: gathered weights, from cache when reused
    "packed_rows",  # expected distinct packed nodes a batch touches x width x dim / batch: weights read from memory
    "packed_uncached_macs",  # packed_macs of buckets whose weights overflow the cache (their share that misses)
    "top_pairs",  # visits of nodes in the shared top block: scores picked out of the block
    "top_macs",  # columns of the shared top block x dim: a matmul over every token of the batch
    "dense_rows",  # visits of dense nodes: rows gathered into their matmul
    "dense_macs",  # visits x (fanout x dim_n + projection) of dense nodes: matmuls
    "dense_scores",  # visits x fanout of dense nodes: score elements written, normalised and read back
    "dense_grad_params",  # parameters with dense gradients / batch: written and zeroed every step
)


class ProfileError(ValueError):
    """A cost profile file that cannot be used (missing, malformed, another format or version)."""


def parse_cost_spec(spec: str) -> tuple[str, str]:
    """``(kind, path)`` of a ``--cost`` value: ``("macs", "")``, ``("measured", "")`` or ``("measured", PATH)``.

    Raises:
        ProfileError: any other value, naming the accepted ones.
    """
    kind, _, path = str(spec).partition(":") if isinstance(spec, str) else ("", "", "")
    if (kind == "macs" and not path) or kind == "measured":
        return kind, path
    raise ProfileError(f"--cost must be 'macs', 'measured' (this device's profile) or 'measured:PROFILE.json', "
                       f"got {spec!r}")  # fmt: skip


def node_costs(
    tree: Tree,
    counts: np.ndarray | Sequence[float] | None,
    dim: int,
    projections: Mapping[int, int] | None = None,
    model: CostProfile | None = None,
) -> np.ndarray:
    """(I,) each internal node's share of a `TreeSoftmaxHead`'s cost per token under ``model``.

    ``model`` None: expected multiply-adds; a node costs its visit probability (the mass of
    its classes) times ``fanout * dim``, or ``dim * p + fanout * p`` when projected to ``p``
    dimensions (the projection, then its children's scores, as a tail cluster of
    ``AdaptiveLogSoftmaxWithLoss`` does). A `CostProfile`: its predicted seconds per token
    (`CostProfile.node_costs`). Counts of None (or all zero) mean uniform classes.
    """
    if model is not None:
        return model.node_costs(tree, counts, dim, projections)
    visits = visit_probabilities(tree, counts)
    per_visit = tree.fanout * float(dim)
    if projections:
        nodes = np.fromiter(projections.keys(), dtype=np.int64)
        sizes = np.fromiter(projections.values(), dtype=np.float64)
        bad = (nodes < 0) | (nodes >= tree.num_internal) | (sizes < 1)
        if bad.any():
            node, size = int(nodes[bad][0]), int(sizes[bad][0])
            raise ValueError(f"projection {node}: {size} must name an internal node (0..{tree.num_internal - 1}) "
                             f"and a size >= 1")  # fmt: skip
        per_visit[nodes] = (dim + tree.fanout[nodes]) * sizes
    return visits * per_visit


def head_cost(
    tree: Tree,
    counts: np.ndarray | Sequence[float] | None,
    dim: int,
    projections: Mapping[int, int] | None = None,
    model: CostProfile | None = None,
) -> float:
    """A `TreeSoftmaxHead`'s cost per token under ``model`` (multiply-adds, or seconds): the sum of `node_costs`."""
    return float(node_costs(tree, counts, dim, projections, model).sum())


def cost_label(model: CostProfile | None) -> str:
    """What costs are in: "multiply-adds" or the profile's "training time on DEVICE"."""
    return "multiply-adds" if model is None else f"training time on {model.device}"


def visit_probabilities(tree: Tree, counts: np.ndarray | Sequence[float] | None) -> np.ndarray:
    """(I,) probability that a token's path passes each internal node (uniform classes when counts are None or 0)."""
    V = tree.num_classes
    total = 0.0 if counts is None else float(np.sum(counts))
    leaf_visits = np.full(V, 1.0 / V) if total <= 0 else np.asarray(counts, np.float64) / total
    return tree.subtree_sums(leaf_visits)


@dataclass(frozen=True)
class HeadLayout:
    """Where each internal node's weights live in a `TreeSoftmaxHead` (see its module docstring).

    ``dense`` nodes own a weight block scored by a matmul over the samples that visit them;
    ``top`` nodes share one block scored for every sample; the others are ``packed`` in
    buckets of power-of-two ``width``.
    """

    dense: np.ndarray  # (I,) bool
    top: np.ndarray  # (I,) bool
    width: np.ndarray  # (I,) int: bucket width of packed nodes (their fanout rounded up to a power of two)
    dense_nodes: tuple[int, ...]  # sorted
    bucket_widths: tuple[int, ...]  # sorted

    @property
    def packed(self) -> np.ndarray:
        """(I,) bool: nodes in the packed buckets."""
        return ~(self.dense | self.top)

    @property
    def num_groups(self) -> int:
        """Weight groups a training step visits: dense nodes, the top block (when any), buckets."""
        return len(self.dense_nodes) + int(self.top.any()) + len(self.bucket_widths)


def bucket_width(fanout: int | np.ndarray) -> np.ndarray:
    """Fanouts rounded up to a power of two (the packed buckets' widths)."""
    f = np.maximum(np.asarray(fanout, dtype=np.int64), 1)
    return np.left_shift(1, np.ceil(np.log2(f)).astype(np.int64))


def head_layout(
    tree: Tree,
    projections: Mapping[int, int] | None = None,
    *,
    dense_fanout: int = LAYOUT_DEFAULTS["dense_fanout"],
    max_dense_nodes: int = LAYOUT_DEFAULTS["max_dense_nodes"],
    top_columns: int = LAYOUT_DEFAULTS["top_columns"],
) -> HeadLayout:
    """The layout `TreeSoftmaxHead` gives ``tree`` with these settings (the one rule; the head calls it).

    Dense: the ``max_dense_nodes`` widest nodes of fanout above ``dense_fanout``, and every
    projected node. Top: the other nodes of the top levels, as many levels as keep their
    children within ``top_columns``. Packed: the rest.
    """
    fanout = tree.fanout
    order = np.argsort(-fanout, kind="stable")
    wide = [int(n) for n in order[:max_dense_nodes] if fanout[n] > dense_fanout]
    dense_nodes = tuple(sorted(set(wide) | {int(n) for n in (projections or {})}))
    dense = np.zeros(tree.num_internal, dtype=bool)
    dense[list(dense_nodes)] = True
    packed_depth = tree.node_depth[~dense]
    top_depth = -1
    for depth in range(int(packed_depth.max()) + 1 if packed_depth.size else 0):
        if fanout[~dense][packed_depth <= depth].sum() > top_columns:
            break
        top_depth = depth
    top = ~dense & (tree.node_depth <= top_depth)
    width = bucket_width(fanout)
    widths = tuple(sorted({int(w) for w in width[~dense & ~top]}))
    return HeadLayout(dense, top, width, dense_nodes, widths)


def layout_features(
    tree: Tree,
    counts: np.ndarray | Sequence[float] | None,
    dim: int,
    projections: Mapping[int, int] | None,
    layout: HeadLayout,
    *,
    batch: int,
    sparse: bool,
    cache_bytes: float = math.inf,
) -> np.ndarray:
    """(I, len(FEATURES)) each internal node's share of the per-token `FEATURES` of a training step.

    The tree-wide terms (``constant``, ``groups``) are the root's. Summed over nodes, the
    rows give the tree's features; a profile's prediction is their dot product with its
    coefficients. A packed bucket whose float32 weights exceed ``cache_bytes`` misses the
    cache for the overflowing share of its gathers (``packed_uncached_macs``).
    """
    inner = tree.num_internal
    fanout = tree.fanout.astype(np.float64)
    visits = visit_probabilities(tree, counts)
    size = np.full(inner, float(dim))  # each node's scoring dimension (projected or not)
    projection = np.zeros(inner)  # multiply-adds of each node's projection per visit
    for node, p in (projections or {}).items():
        size[node], projection[node] = float(p), float(dim) * float(p)
    dense, top, packed = layout.dense, layout.top, layout.packed
    width = layout.width.astype(np.float64)
    out = np.zeros((inner, len(FEATURES)))
    column = {name: i for i, name in enumerate(FEATURES)}
    out[0, column["constant"]] = 1.0
    out[0, column["groups"]] = layout.num_groups / batch
    out[packed, column["packed_pairs"]] = visits[packed]
    out[packed, column["packed_macs"]] = visits[packed] * width[packed] * dim
    touched = -np.expm1(batch * np.log1p(-np.minimum(visits, 1 - 1e-12)))  # P(a batch visits the node)
    out[packed, column["packed_rows"]] = touched[packed] * width[packed] * dim / batch
    for w in layout.bucket_widths:
        members = packed & (layout.width == w)
        table = 4.0 * members.sum() * w * dim  # the bucket's weights in bytes
        miss = max(0.0, 1.0 - cache_bytes / table) if math.isfinite(cache_bytes) else 0.0
        out[members, column["packed_uncached_macs"]] = miss * visits[members] * w * dim
    out[top, column["top_pairs"]] = visits[top]
    out[top, column["top_macs"]] = fanout[top] * dim
    out[dense, column["dense_rows"]] = visits[dense]
    out[dense, column["dense_macs"]] = visits[dense] * (fanout[dense] * size[dense] + projection[dense])
    out[dense, column["dense_scores"]] = visits[dense] * fanout[dense]
    params = np.where(dense, fanout * size + projection, fanout * dim)  # top nodes: their block's columns
    with_dense_grads = dense | top | (packed if not sparse else np.zeros(inner, dtype=bool))
    params = np.where(packed, width * dim, params)
    out[with_dense_grads, column["dense_grad_params"]] = params[with_dense_grads] / batch
    return out


def fit_coefficients(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared *relative* error of ``features @ c`` against ``seconds``.

    ``features`` (trees, len(FEATURES)), ``seconds`` (trees,) measured per token. Each row is
    divided by its time, so a fast tree weighs as much as a slow one (SciPy's NNLS).
    """
    from scipy.optimize import nnls  # the search extra's dependency; the light install never fits

    features, seconds = np.asarray(features, np.float64), np.asarray(seconds, np.float64)
    if features.ndim != 2 or features.shape[0] != seconds.size or not np.all(seconds > 0):
        raise ValueError("fit_coefficients needs (trees, features) and one positive time per tree")
    scale = features.max(axis=0)
    scale[scale <= 0] = 1.0  # unused features keep a zero coefficient
    coefficients, _ = nnls(features / scale / seconds[:, None], np.ones(seconds.size), maxiter=50 * features.shape[1])
    return coefficients / scale


@dataclass(frozen=True)
class CostProfile:
    """A measured cost model of `TreeSoftmaxHead`'s training step on one device.

    Predicts seconds per token of forward + backward at ``dim``, ``batch`` and
    ``precision``, as the dot product of a tree's `FEATURES` with ``coefficients``.
    """

    device: str  # the device's name, e.g. "cpu: AMD EPYC 9B14, 2 threads" or "cuda: NVIDIA H100"
    device_type: str  # "cpu" or "cuda"
    dim: int
    batch: int
    precision: str  # "fp32" or "bf16"
    sparse: bool  # packed nodes trained with sparse gradients (as `fit` trains)
    num_classes: int  # V of the calibration trees
    coefficients: tuple[float, ...]  # seconds per unit of each feature, in FEATURES order
    cache_bytes: float = math.inf  # fitted: packed weights beyond this many bytes miss the cache
    torch_version: str = ""
    created: str = ""
    fit: dict[str, Any] = field(default_factory=dict)  # errors on the fitting and held-out trees
    head_settings: dict[str, int] = field(default_factory=lambda: dict(LAYOUT_DEFAULTS))  # `head_layout`'s

    def layout(self, tree: Tree, projections: Mapping[int, int] | None = None) -> HeadLayout:
        """`head_layout` with the settings the profile was measured with."""
        return head_layout(tree, projections, **self.head_settings)

    def node_costs(
        self, tree: Tree, counts: np.ndarray | Sequence[float] | None, dim: int, projections: Mapping[int, int] | None
    ) -> np.ndarray:
        """(I,) each internal node's share of the predicted seconds per token (their sum: `predict`)."""
        if int(dim) != self.dim:
            raise ValueError(f"this cost profile was measured at dim {self.dim}, not {dim}: calibrate at dim {dim}")
        features = layout_features(tree, counts, dim, projections, self.layout(tree, projections),
                                   batch=self.batch, sparse=self.sparse, cache_bytes=self.cache_bytes)  # fmt: skip
        return features @ np.asarray(self.coefficients)

    def predict(
        self,
        tree: Tree,
        counts: np.ndarray | Sequence[float] | None,
        dim: int | None = None,
        projections: Mapping[int, int] | None = None,
    ) -> float:
        """Predicted seconds per token of a training step of the head on ``tree``."""
        return float(self.node_costs(tree, counts, self.dim if dim is None else dim, projections).sum())

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {"format": PROFILE_FORMAT, "version": 1, "features": list(FEATURES), **asdict(self)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_profile(path: str | os.PathLike[str]) -> CostProfile:
    """A profile written by `CostProfile.save`.

    Raises:
        ProfileError: naming the file and what is wrong with it.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such cost profile (write one with `tree-search cost calibrate`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileError(f"{path}: not a cost profile ({err})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path}: not a cost profile (format {PROFILE_FORMAT!r})")
    if data.get("version") != 1:
        raise ProfileError(f"{path}: cost profile version {data.get('version')!r}; this code reads version 1")
    if data.get("features") != list(FEATURES):
        raise ProfileError(f"{path}: the profile's features {data.get('features')} are not this code's {FEATURES}; "
                           "calibrate again")  # fmt: skip
    fields = {k: v for k, v in data.items() if k not in ("format", "version", "features")}
    try:
        profile = CostProfile(**{**fields, "coefficients": tuple(float(c) for c in fields["coefficients"])})
    except (TypeError, KeyError) as err:
        raise ProfileError(f"{path}: malformed cost profile ({err})") from None
    if len(profile.coefficients) != len(FEATURES) or not all(math.isfinite(c) and c >= 0 for c in profile.coefficients):
        raise ProfileError(f"{path}: field 'coefficients' must hold {len(FEATURES)} finite numbers >= 0")
    return profile
