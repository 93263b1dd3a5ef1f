"""What a tree head costs per token: multiply-adds, or time measured on a device (a `CostProfile`).

Three cost models share one shape, a sum over the tree's internal nodes (`docs/architecture.md`,
"The reward splits over nodes"), so caps, fronts, the dense rewards and ``dp`` can use any:

- **multiply-adds** (``"macs"``, the default): node n costs ``visits(n) * fanout(n) * dim``
  (plus its projection), `node_costs` without a model;
- **measured training time** (``"measured[:PROFILE]"``): node n costs the seconds per token
  that a fitted `CostProfile` predicts for it under the layout `TreeSoftmaxHead` gives it
  (`head_layout`): a dense block scored by a matmul, a column of the shared top block
  (scored for every token), or a packed node whose weights are gathered per visit;
- **measured decoding time** (``"decode[:PROFILE]"``): node n costs the seconds per query of
  exact top-k decoding (`TreeSoftmaxHead.predict`) the profile predicts for it: how often the
  certified beam search scores it, replayed on the data's class distributions
  (`tree_search.heads.decode_replay`), times what scoring it costs under the layout, plus the
  search's per-level work on the root (`DecodeCost`, the profile's decoding side).

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
    "DECODE_FEATURES",
    "DecodeCost",
    "cost_label",
    "decode_features",
    "fit_coefficients",
    "full_softmax_macs",
    "head_cost",
    "head_layout",
    "layout_features",
    "load_profile",
    "parse_cost_spec",
    "node_costs",
    "visit_probabilities",
]

PROFILE_FORMAT = "tree_search.cost_profile"
PROFILE_VERSION = 4  # 2: decoding beside training; 3: the top-block rule of head_layout, buckets priced apart;
# 4: the packed nodes' C kernels on CPU (heads/native.py)
# `TreeSoftmaxHead`'s layout settings (`head_layout`); top levels up to 64 columns measured fastest on CPU
# (binary Huffman at V = 10k, the einsum-free head before the fused scores: 27.5 ms a step against 38.9 ms
# with 1,024; `bench_head_time.py --top-columns N` repeats it)
LAYOUT_DEFAULTS = {"dense_fanout": 64, "max_dense_nodes": 32, "top_columns": 64}

# Per-token features of a head's training step (forward + backward), each the sum of its nodes' shares.
FEATURES = (
    "constant",  # 1: per-token work of any tree (targets, the loss)
    "groups",  # matmul groups (dense nodes, the top block) / batch: a few kernels per step, whatever their size
    "buckets",  # packed buckets / batch: a compiled gather, a sort and two embedding bags per step, whatever their size
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


# Per-query features of exact top-k decoding by `TreeSoftmaxHead.predict` (a certified beam search, level by
# level): each the sum of its nodes' shares, a node's weighted by the chance that the search scores it.
DECODE_FEATURES = (
    "constant",  # 1: per-query work of any tree (the final top-k, result tables)
    "levels",  # levels / decode batch: each level is a few kernels and a Python step per batch
    "level_groups",  # levels x weight groups / decode batch: every level asks every group for its pairs
    "level_tables",  # levels x beam x (k + beam): each query's candidate tables ranked at every level
    "scored_pairs",  # scored nodes: index arithmetic, logsumexp and top-k per (query, node) pair
    "scored_elements",  # scored nodes x their score columns (bucket width or fanout)
    "gathered_macs",  # scored packed nodes x bucket width x dim: weights gathered per pair
    "top_macs",  # levels holding top nodes x the top block's columns x dim: the block scored for every query
    "dense_macs",  # scored dense nodes x (fanout x dim_n + projection): matmuls
    "dense_launches",  # dense nodes scored for some query of a batch / decode batch: a matmul each
)
DECODE_SETTINGS = {"decode_batch": 256, "decode_k": 5}  # what a profile's decoding is measured at
DEFAULT_BEAM = 8  # `TreeSoftmaxHead.predict`'s beam: the max(k, DEFAULT_BEAM) most probable nodes per level


class ProfileError(ValueError):
    """A cost profile file that cannot be used (missing, malformed, another format or version)."""


def parse_cost_spec(spec: str) -> tuple[str, str]:
    """``(kind, path)`` of a ``--cost`` value: ``("macs", "")``, or ``("measured" | "decode", "" | PATH)``.

    "measured" is training time, "decode" decoding time, both from a `CostProfile` (this
    device's when no path is given).

    Raises:
        ProfileError: any other value, naming the accepted ones.
    """
    kind, _, path = str(spec).partition(":") if isinstance(spec, str) else ("", "", "")
    if (kind == "macs" and not path) or kind in ("measured", "decode"):
        return kind, path
    raise ProfileError(f"--cost must be 'macs', 'measured' (training time, this device's profile), 'decode' "
                       f"(decoding time) or either with ':PROFILE.json', got {spec!r}")  # fmt: skip


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


def full_softmax_macs(num_classes: int, dim: int) -> float:
    """A full softmax's multiply-adds per token: one node scoring all ``num_classes`` classes, ``V x dim``."""
    return float(num_classes) * float(dim)


def head_cost(
    tree: Tree,
    counts: np.ndarray | Sequence[float] | None,
    dim: int,
    projections: Mapping[int, int] | None = None,
    model: CostProfile | None = None,
) -> float:
    """A `TreeSoftmaxHead`'s cost per token under ``model`` (multiply-adds, or seconds): the sum of `node_costs`."""
    return float(node_costs(tree, counts, dim, projections, model).sum())


def cost_label(model: CostProfile | DecodeCost | None) -> str:
    """What costs are in: "multiply-adds", the profile's "training time on DEVICE" or "decoding time on DEVICE"."""
    if model is None:
        return "multiply-adds"
    return f"{'decoding' if isinstance(model, DecodeCost) else 'training'} time on {model.device}"


def visit_probabilities(tree: Tree, counts: np.ndarray | Sequence[float] | None) -> np.ndarray:
    """(I,) probability that a token's path passes each internal node (uniform classes when counts are None or 0)."""
    V = tree.num_classes
    weights = np.ones(V) if counts is None else np.asarray(counts, dtype=np.float64)
    if weights.shape != (V,):
        raise ValueError(f"counts must have one entry per class ({V}), got {weights.size}")
    total = float(weights.sum())  # all zero (unknown counts): uniform, as `builders.common.class_weights` falls back
    return tree.subtree_sums(weights / total if total > 0 else np.full(V, 1.0 / V))


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
    children within ``top_columns`` while a sample's path uses at least half of the block's
    columns; a block of fewer than ``top_columns / 2`` columns is not kept (measured: a small
    or wasteful block costs more time than packing its nodes; docs/cost-in-time.md). Packed: the rest.
    """
    fanout = tree.fanout
    order = np.argsort(-fanout, kind="stable")
    wide = [int(n) for n in order[:max_dense_nodes] if fanout[n] > dense_fanout]
    dense_nodes = tuple(sorted(set(wide) | {int(n) for n in (projections or {})}))
    dense = np.zeros(tree.num_internal, dtype=bool)
    dense[list(dense_nodes)] = True
    packed_depth, packed_fanout = tree.node_depth[~dense], fanout[~dense]
    top_depth, columns, used = -1, 0, 0
    for depth in range(int(packed_depth.max()) + 1 if packed_depth.size else 0):
        level = packed_fanout[packed_depth == depth]
        columns, used = columns + int(level.sum()), used + int(level.max(initial=0))  # a path meets one node a level
        if columns > top_columns or columns > 2 * used:
            break
        top_depth = depth
    if 0 < 2 * fanout[~dense & (tree.node_depth <= top_depth)].sum() < top_columns:
        top_depth = -1
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
    size, projection = _scoring_sizes(inner, dim, projections)
    dense, top, packed = layout.dense, layout.top, layout.packed
    width = layout.width.astype(np.float64)
    out = np.zeros((inner, len(FEATURES)))
    column = {name: i for i, name in enumerate(FEATURES)}
    out[0, column["constant"]] = 1.0
    out[0, column["groups"]] = (len(layout.dense_nodes) + int(layout.top.any())) / batch
    out[0, column["buckets"]] = len(layout.bucket_widths) / batch
    out[packed, column["packed_pairs"]] = visits[packed]
    out[packed, column["packed_macs"]] = visits[packed] * width[packed] * dim
    touched = _any_of(visits, batch)  # P(a batch visits the node)
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


def decode_features(
    tree: Tree,
    replayed: tuple[np.ndarray, float],
    dim: int,
    projections: Mapping[int, int] | None,
    layout: HeadLayout,
    *,
    batch: int,
    k: int,
) -> np.ndarray:
    """(I, len(DECODE_FEATURES)) each internal node's share of the per-query `DECODE_FEATURES` of decoding.

    ``replayed``: ``(scored, levels)``, the pairs the certified beam search scores per query
    at each node and the levels it runs per batch of ``batch`` queries
    (`tree_search.heads.decode_replay`). Tree-wide terms (constant, the per-level ones, the
    top block) are the root's; summed over nodes, the rows give the tree's features.
    """
    scored, levels = np.asarray(replayed[0], np.float64), float(replayed[1])
    inner = tree.num_internal
    fanout = tree.fanout.astype(np.float64)
    size, projection = _scoring_sizes(inner, dim, projections)
    dense, top, packed = layout.dense, layout.top, layout.packed
    width = layout.width.astype(np.float64)
    beam = float(max(k, DEFAULT_BEAM))
    widest = max([float(fanout.max()), *(float(w) for w in layout.bucket_widths)])
    column = {name: i for i, name in enumerate(DECODE_FEATURES)}
    out = np.zeros((inner, len(DECODE_FEATURES)))
    out[0, column["constant"]] = 1.0
    out[0, column["levels"]] = levels / batch
    out[0, column["level_groups"]] = levels * layout.num_groups / batch
    out[0, column["level_tables"]] = levels / batch * beam * (k + min(beam + 1, widest))
    out[:, column["scored_pairs"]] = scored
    out[:, column["scored_elements"]] = scored * np.where(dense, fanout, width)
    out[packed, column["gathered_macs"]] = scored[packed] * width[packed] * dim
    top_levels = float(np.unique(tree.node_depth[top]).size)
    out[0, column["top_macs"]] = top_levels * fanout[top].sum() * dim
    out[dense, column["dense_macs"]] = scored[dense] * (fanout[dense] * size[dense] + projection[dense])
    launched = _any_of(scored, batch)  # some query of the batch scores it
    out[dense, column["dense_launches"]] = launched[dense] / batch
    return out


def _scoring_sizes(inner: int, dim: int, projections: Mapping[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(I,) each node's scoring dimension (projected or not) and (I,) its projection's multiply-adds per visit."""
    size, projection = np.full(inner, float(dim)), np.zeros(inner)
    for node, p in (projections or {}).items():
        size[node], projection[node] = float(p), float(dim) * float(p)
    return size, projection


def _any_of(p: np.ndarray, draws: float) -> np.ndarray:
    """The chance that at least one of ``draws`` independent tries, each hitting with probability ``p``, hits."""
    return -np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-12)))


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


class _SummedOverNodes:
    """``predict``: the sum of a model's ``node_costs`` (seconds per token of training, or per query of decoding)."""

    def predict(
        self,
        tree: Tree,
        counts: np.ndarray | Sequence[float] | None,
        dim: int | None = None,
        projections: Mapping[int, int] | None = None,
    ) -> float:
        """Predicted seconds of the head on ``tree``: per token of a training step, or per query of decoding."""
        return float(self.node_costs(tree, counts, self.dim if dim is None else dim, projections).sum())


@dataclass(frozen=True)
class CostProfile(_SummedOverNodes):
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
    pair_kernels: str = ""  # the packed nodes' kernels it was measured with: "native" (C, CPU) or "torch"
    created: str = ""
    fit: dict[str, Any] = field(default_factory=dict)  # errors on the fitting and held-out trees
    head_settings: dict[str, int] = field(default_factory=lambda: dict(LAYOUT_DEFAULTS))  # `head_layout`'s
    # decoding (exact top-k per query), fitted beside the training step; empty in profiles written before it
    decode_coefficients: tuple[float, ...] = ()  # seconds per unit of each DECODE_FEATURES feature
    decode_batch: int = DECODE_SETTINGS["decode_batch"]
    decode_k: int = DECODE_SETTINGS["decode_k"]
    decode_fit: dict[str, Any] = field(default_factory=dict)  # errors on the fitting and held-out trees

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

    @property
    def decoding(self) -> DecodeCost:
        """The profile's decoding side, a cost model of its own (``--cost decode``).

        Raises:
            ProfileError: a profile written before decoding was calibrated.
        """
        if len(self.decode_coefficients) != len(DECODE_FEATURES):
            raise ProfileError(f"the cost profile of {self.device} has no decoding model (written before decoding "
                               "was calibrated): run `tree-search cost calibrate` again")  # fmt: skip
        return DecodeCost(self)

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "features": list(FEATURES),
                "decode_features": list(DECODE_FEATURES), **asdict(self)}  # fmt: skip

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
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"{path}: cost profile version {data.get('version')!r}; this code reads version "
                           f"{PROFILE_VERSION} (its heads are laid out differently): calibrate again")  # fmt: skip
    if data.get("features") != list(FEATURES):
        raise ProfileError(f"{path}: the profile's features {data.get('features')} are not this code's {FEATURES}; "
                           "calibrate again")  # fmt: skip
    if data.get("decode_coefficients") and data.get("decode_features") != list(DECODE_FEATURES):
        raise ProfileError(f"{path}: the profile's decoding features {data.get('decode_features')} are not this "
                           f"code's {DECODE_FEATURES}; calibrate again")  # fmt: skip
    fields = {k: v for k, v in data.items() if k not in ("format", "version", "features", "decode_features")}
    try:
        profile = CostProfile(
            **{
                **fields,
                "coefficients": tuple(float(c) for c in fields["coefficients"]),
                "decode_coefficients": tuple(float(c) for c in fields.get("decode_coefficients", ())),
            }
        )
    except (TypeError, KeyError, ValueError) as err:
        raise ProfileError(f"{path}: malformed cost profile ({err})") from None
    for name, values, expected in (
        ("coefficients", profile.coefficients, len(FEATURES)),
        ("decode_coefficients", profile.decode_coefficients, len(DECODE_FEATURES)),
    ):
        if (len(values) != expected and values) or not all(math.isfinite(c) and c >= 0 for c in values):
            raise ProfileError(f"{path}: field {name!r} must hold {expected} finite numbers >= 0")
    if not profile.coefficients:
        raise ProfileError(f"{path}: field 'coefficients' must hold {len(FEATURES)} finite numbers >= 0")
    return profile


@dataclass(frozen=True)
class DecodeCost(_SummedOverNodes):
    """A profile's decoding model: predicted seconds per query of exact top-k (`TreeSoftmaxHead.predict`).

    Shares `CostProfile`'s interface (``node_costs``, ``predict``, ``device``, ``dim``,
    ``save``), so every place that takes a cost model takes it: ``--cost decode`` caps
    and fronts in decoding time. Decoding at the profile's ``decode_batch`` queries at once
    and ``decode_k`` classes. ``replay`` (``tree -> (scored, levels)``) says how often the
    search scores each node on the data (`tree_search.heads.decode_replay.decode_scores_for_dataset`);
    `CostProfile.decoding` has none: `bound` gives it one.
    """

    profile: CostProfile
    replay: Any = field(default=None, compare=False)

    @property
    def device(self) -> str:
        """The profile's device."""
        return self.profile.device

    @property
    def dim(self) -> int:
        """The profile's dimension."""
        return self.profile.dim

    @property
    def fit(self) -> dict[str, Any]:
        """The decoding fit's errors on the fitting and held-out trees."""
        return self.profile.decode_fit

    def bound(self, replay) -> DecodeCost:
        """This model with ``replay`` (``tree -> (scored, levels)``) as the data's decoding."""
        return DecodeCost(self.profile, replay)

    def node_costs(
        self, tree: Tree, counts: np.ndarray | Sequence[float] | None, dim: int, projections: Mapping[int, int] | None
    ) -> np.ndarray:
        """(I,) each internal node's share of the predicted seconds per query (their sum: `predict`).

        ``counts`` are not read: how often a node is scored comes from the replay on the data.
        """
        p = self.profile
        if int(dim) != p.dim:
            raise ValueError(f"this cost profile was measured at dim {p.dim}, not {dim}: calibrate at dim {dim}")
        if self.replay is None:
            raise ValueError("decoding costs need the data's decoding replay: DecodeCost.bound(replay)")
        features = decode_features(tree, self.replay(tree), dim, projections, p.layout(tree, projections),
                                   batch=p.decode_batch, k=p.decode_k)  # fmt: skip
        return features @ np.asarray(p.decode_coefficients)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole profile (training and decoding) as JSON."""
        self.profile.save(path)
