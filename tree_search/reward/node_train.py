"""Node-exact training: every internal node of a tree is trained on its own, all nodes at once.

With frozen features, a tree's held-out NLL is a sum over its internal nodes
(docs/architecture.md, "The reward splits over nodes"): ``NLL(T) = (1/N) sum_n L_n`` with ``L_n``
node n's own cross-entropy summed over the held-out tokens whose class lies below it.
Here each node's training depends only on the node's *content* (the class sets of its
children and its projection size), never on the rest of the tree:

- its data: the tokens of a seeded sample of the train split whose class lies below
  it, in the sample's (seeded, tree-independent) order;
- its own parameters, its own Adam state, exactly ``steps`` optimizer steps of at most
  ``batch_size`` of its tokens (a power of two chosen from its token count), a learning
  rate scaled by its exact fanout, warm-up then cosine decay over its own steps;
- its initialisation: the count-weighted mean class embedding of each child (a first
  guess in the feature space, see `NodeRecipe.init`), or uniform noise seeded by the
  node's content key; projections are seeded by the key;
- its measurements (``measurements`` of them, evenly spaced over its steps, and its
  initial weights) on each half of the validation sample, and its result *cross-fitted*:
  its loss on each half at the measurement that was best on the other half, summed
  (`node_results`). Taking the lowest measurement on the same tokens it is scored on
  would make the result optimistic, the more so the more small nodes a tree has.

So a node gives the same numbers in every tree that contains it, which is what lets the
`tree_search.reward.node_bank.NodeBank` store it once. Nodes are batched: those with
the same (batch size, fanout rounded up to a power of two, projection size) form one
group whose every step is two batched matmuls (`torch.bmm`), so a Python loop runs
over a handful of groups and the steps, never over nodes or samples.
"""

from __future__ import annotations

import functools
import math
import platform
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tree_search.data.cache import source_identity
from tree_search.data.features import FeatureDataset, class_embeddings, row_documents
from tree_search.heads.centroid import child_centroids, subtree_embedding_sums
from tree_search.heads.schedule import step_scale
from tree_search.tree import Tree

__all__ = ["NodeOutcome", "NodeRecipe", "child_set_hashes", "measurement_totals", "node_keys", "node_result_halves",
           "node_results", "release_samples", "split_sample", "train_nodes", "training_code_identity",
           "training_dtype"]  # fmt: skip

# the code that decides a node's numbers
_TRAINING_SOURCES = ("tree_search.reward.node_train", "tree_search.heads.schedule", "tree_search.tree")


_IDENTITY = "node-train/" + source_identity(_TRAINING_SOURCES)  # read at import: the code that runs, even if edited


def training_code_identity() -> str:
    """A hash of the source of the modules that train and score nodes: caches of trained results key on it.

    Derived from the code itself, so no change to training can serve results of the old code
    (an edited comment also changes it: a recomputation, never a stale answer).
    """
    return _IDENTITY


@dataclass(frozen=True)
class NodeRecipe:
    """How every internal node is trained for the reward (the fidelity of an evaluation)."""

    train_tokens: int | None = 400_000  # seeded random sample of the train split (None: all rows)
    valid_tokens: int | None = 50_000  # seeded random sample of the validation split (None: all rows)
    epochs: float = 1.0  # passes over a node's sampled tokens (at most steps * batch_size tokens)
    steps: int = 64  # optimizer steps of a node of up to 31 children (more for wider ones, see `node_steps`)
    batch_size: int = 4096  # most tokens in one step of a node
    lr: float = 0.03  # peak Adam learning rate of a 16-ary node (narrower ones get less, wide ones more)
    warmup_fraction: float = 0.05  # share of a node's steps with a linear warm-up
    measurements: int = 4  # validation measurements per node, evenly spaced; the best is the node's result
    init: str = "embeddings"  # "embeddings": mean class embedding per child; "random": seeded uniform
    seed: int = 0  # which train sample, its order, and random initial weights
    precision: str = "auto"  # training matmuls: "bf16", "fp32", or "auto" (bf16 where the device has it natively)

    def __post_init__(self) -> None:
        # numbers normalised so that equal recipes have equal keys (`epochs=1` is `epochs=1.0`)
        for name in ("epochs", "lr", "warmup_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("steps", "batch_size", "measurements", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("train_tokens", "valid_tokens"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
                if value < 1:
                    raise ValueError(f"NodeRecipe.{name} must be >= 1 or None (all rows), got {value}")
        if not self.epochs > 0 or not self.lr > 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("NodeRecipe needs epochs > 0, lr > 0, steps >= 1 and batch_size >= 1")
        if not 1 <= self.measurements <= self.steps or not 0 <= self.warmup_fraction < 1:
            raise ValueError("NodeRecipe needs 1 <= measurements <= steps and 0 <= warmup_fraction < 1")
        if self.init not in ("embeddings", "random"):
            raise ValueError(f"NodeRecipe.init must be 'embeddings' or 'random', got {self.init!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"NodeRecipe.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def key_fields(self) -> dict[str, Any]:
        """The recipe as a JSON-friendly dict (what cache keys hold)."""
        return asdict(self)

    @property
    def measure_steps(self) -> np.ndarray:
        """The steps (1-based) after which a node of ``steps`` steps is measured; 0 is the initial weights."""
        return measure_points(self.steps, self.measurements)

    def node_steps(self, fanout: np.ndarray) -> np.ndarray:
        """Optimizer steps of nodes of these fanouts: ``steps``, times floor(sqrt(fanout / 16)) above 31 children.

        A wide node has many more weights to fit (a full softmax over 10k classes: 2.6M): it
        takes more, smaller steps over the same tokens (25x for 10k children).
        """
        return self.steps * np.maximum(1, np.floor(np.sqrt(np.asarray(fanout) / 16.0))).astype(np.int64)


PRECISIONS = ("auto", "bf16", "fp32")
BF16_MIN_WIDTH = 64  # narrower nodes train in float32 whatever the precision (their products are bound by memory)


def training_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of a node's training matmuls on ``device`` under ``precision`` (`NodeRecipe.precision`).

    Only the matmuls' inputs are rounded to bfloat16: weights, Adam state, softmax and
    gradients stay float32, and validation is always scored in float32. ``"auto"``
    takes bfloat16 where the device computes it natively (a CPU with AVX-512 BF16 or
    AMX, whose bfloat16 matmuls run several times faster than float32; a CUDA card
    with bfloat16 tensor cores), else float32.
    """
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and _cpu_has_native_bf16()
        precision = "bf16" if native else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


@functools.cache  # the CPU does not change; every `train_nodes` call asks
def _cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (x86 AVX-512 BF16 or AMX, or Arm BF16).

    PyTorch's own check (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is also true on
    AVX-512 CPUs without them, where bfloat16 is emulated and slower than float32.
    """
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust PyTorch (Apple and Arm CPUs that it accepts have BF16 instructions)
        return platform.machine().lower() in ("arm64", "aarch64")
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16", " bf16"))


def measure_points(steps: int, measurements: int) -> np.ndarray:
    """The steps (1-based) after which a node is measured, evenly spaced; 0 is the initial weights."""
    points = np.ceil(steps * np.arange(1, measurements + 1) / measurements).astype(int)
    return np.concatenate([[0], points])


# ---------------------------------------------------------------- content keys
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _class_codes(num_classes: int) -> np.ndarray:
    """(V, 2) fixed random 64-bit codes per class (two lanes: 128-bit set hashes)."""
    ids = np.arange(num_classes, dtype=np.uint64)
    return np.stack([_splitmix(ids * np.uint64(2)), _splitmix(ids * np.uint64(2) + np.uint64(1))], axis=1)


def child_set_hashes(tree: Tree) -> np.ndarray:
    """(len(child_ids), 2) uint64: a 128-bit hash of the class set below each child slot of every node.

    Sums of fixed random class codes, so the hash of a set does not depend on how the
    tree arranges it.
    """
    codes = _class_codes(tree.num_classes)
    sets = np.zeros((tree.num_internal, 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(sets, tree.leaf_parent, codes)
        for level in reversed(tree.levels[1:]):
            np.add.at(sets, tree.node_parent[level], sets[level])
    V, ids = tree.num_classes, tree.child_ids
    return np.where((ids < V)[:, None], codes[np.minimum(ids, V - 1)], sets[np.maximum(ids - V, 0)])


def _mix(hashes: np.ndarray) -> np.ndarray:
    """(n, 2) -> (n, 2) a nonlinear mix of 128-bit hashes."""
    return np.stack([_splitmix(hashes[:, 0] ^ _splitmix(hashes[:, 1])), _splitmix(hashes[:, 1])], 1)


def node_keys(
    tree: Tree, projections: Mapping[int, int] | None = None, bias_free_nodes: Collection[int] | None = None
) -> np.ndarray:
    """(I, 2) uint64 content keys of the internal nodes.

    A node's key depends only on the class sets of its children (in any order), its
    projection size and whether it is bias-free: the same node in two trees has the same
    key. Each child's set hash (`child_set_hashes`) is mixed nonlinearly and the mixes are
    summed, so sibling order does not matter. A bias-free node's second lane is mixed once
    more, so the ordinary nodes' keys are the same with or without bias-free ones.
    """
    with np.errstate(over="ignore"):
        keys = np.add.reduceat(_mix(child_set_hashes(tree)), tree.child_ptr[:-1], axis=0)
        proj = np.zeros(tree.num_internal, dtype=np.uint64)
        for node, size in (projections or {}).items():
            proj[int(node)] = np.uint64(size)
        keys[:, 0] += _splitmix(proj + np.uint64(0x5EED))
        free = _bias_free_mask(tree, bias_free_nodes)
        keys[free, 1] = _splitmix(keys[free, 1] ^ np.uint64(0xB1A5F3EE))
    return keys


def _bias_free_mask(tree: Tree, bias_free_nodes: Collection[int] | None) -> np.ndarray:
    """(I,) bool: the internal nodes trained without biases.

    Raises:
        ValueError: for an id that is not an internal node.
    """
    free = np.zeros(tree.num_internal, dtype=bool)
    ids = np.asarray(sorted({int(n) for n in bias_free_nodes or ()}), dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= tree.num_internal)]
    if bad.size:
        raise ValueError(f"bias_free_nodes {bad[:5].tolist()} are not internal nodes (0..{tree.num_internal - 1})")
    free[ids] = True
    return free


# ---------------------------------------------------------------- samples
@dataclass(frozen=True)
class _Split:
    # (N, d) on the device: float16 when the dataset stores float16 (half the memory and the gathers' reads; every
    # use converts it, exactly, to float32 or the training dtype), else float32
    features: torch.Tensor
    labels: np.ndarray  # (N,) int64
    documents: np.ndarray  # (N,) int64: each row's document (`row_documents`)
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def features_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The features in ``dtype`` (a copy made once, kept with the sample)."""
        if dtype == self.features.dtype:
            return self.features
        if dtype not in self._cast:
            self._cast[dtype] = self.features.to(dtype)
        return self._cast[dtype]


_SAMPLES: OrderedDict[tuple, _Split] = OrderedDict()


def split_sample(dataset: FeatureDataset, split: str, size: int | None, seed: int, device: torch.device) -> _Split:
    """A seeded random sample of ``split`` (all rows, shuffled, when ``size`` is None or larger), kept on ``device``.

    The train sample's order is the order in which nodes see their tokens; the same
    (dataset, split, size, seed) always gives the same rows in the same order.
    """
    n = int(dataset.labels[split].shape[0])
    whole = split != "train" and (size is None or size >= n)  # every row, sorted: the seed does not matter
    key = (dataset.key, split, None if whole else size, None if whole else seed, str(device))
    if key in _SAMPLES:
        _SAMPLES.move_to_end(key)
        return _SAMPLES[key]
    salt = {"train": 1, "valid": 2, "test": 3}.get(split, 4)
    rows = np.random.default_rng([seed, salt]).permutation(n)
    if size is not None and size < n:
        rows = rows[:size]
    if split != "train":
        rows = np.sort(rows)  # order is irrelevant for scoring; sorted reads the memory map in order
    stored = dataset.features[split]
    kept = np.float16 if stored.dtype == np.float16 else np.float32
    features = torch.from_numpy(np.asarray(stored[np.sort(rows)], dtype=kept))
    features = features[torch.from_numpy(np.argsort(np.argsort(rows)))] if split == "train" else features
    documents = row_documents(dataset, split)[0][rows]
    sample = _Split(features.to(device), np.asarray(dataset.labels[split])[rows].astype(np.int64), documents)
    _SAMPLES[key] = sample
    while len(_SAMPLES) > 6:
        _SAMPLES.popitem(last=False)
    return sample


def release_samples() -> None:
    """Forget every cached sample (`split_sample`), to call between phases that train with different seeds.

    The final scoring would otherwise hold the searches' samples, hundreds of MB each, beside its own.
    """
    _SAMPLES.clear()


def _node_pairs(tree: Tree, labels: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, node, child index) for every token and every wanted node on its class's path, grouped by node.

    Within a node the tokens keep their order in ``labels``. Returns ``(rows, child,
    ptr)``: node ``wanted[i]``'s tokens are ``rows[ptr[i]:ptr[i + 1]]``.
    """
    ptr, path_nodes, path_codes = tree.packed_paths()
    local = np.full(tree.num_internal, -1, dtype=np.int64)
    local[wanted] = np.arange(wanted.size)
    start, length = ptr[labels], ptr[labels + 1] - ptr[labels]
    rows = np.repeat(np.arange(labels.size, dtype=np.int64), length)
    flat = np.arange(rows.size) - np.repeat(np.cumsum(length) - length - start, length)
    owner = local[path_nodes[flat]]
    keep = owner >= 0
    rows, owner, child = rows[keep], owner[keep], path_codes[flat][keep].astype(np.int64)
    # a stable sort by node; 16-bit keys take numpy's radix sort (several times faster than the default)
    order = np.argsort(owner.astype(np.uint16) if wanted.size <= 65_536 else owner, kind="stable")
    counts = np.bincount(owner, minlength=wanted.size)
    out_ptr = np.zeros(wanted.size + 1, dtype=np.int64)
    np.cumsum(counts, out=out_ptr[1:])
    return rows[order], child[order], out_ptr


# ---------------------------------------------------------------- training
@dataclass
class NodeOutcome:
    """What training a set of nodes gives, one row per node (in the order asked)."""

    keys: np.ndarray  # (n, 2) uint64 content keys
    losses: np.ndarray  # (n, 2M) float64: validation loss sums per measurement, half A's M then half B's M
    tokens: np.ndarray  # (n,) int64: validation tokens below the node
    train_tokens: np.ndarray  # (n,) int64: sampled train tokens below the node
    weights: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)  # row -> (W, b[, P]) at the best
    split_losses: np.ndarray | None = None  # (n,) loss sums on the scored split (``score_split``), at the best
    split_row_losses: np.ndarray | None = None  # (N,) each scored row's loss summed over the nodes asked, at the best
    flops: float = 0.0  # useful floating-point operations (2 per multiply-add) of the matmuls, padding excluded

    @property
    def best(self) -> np.ndarray:
        """(n,) each node's result (`node_results`)."""
        return node_results(self.losses)


def measurement_totals(losses: np.ndarray) -> np.ndarray:
    """(n, M) validation loss sums over the whole sample per measurement, from (n, 2M) per-half sums."""
    M = losses.shape[1] // 2
    return losses[:, :M] + losses[:, M:]


def node_results(losses: np.ndarray) -> np.ndarray:
    """(n,) each node's result from its (n, 2M) per-half measurement losses, cross-fitted.

    Half B's loss at the measurement best on half A, plus half A's loss at the measurement
    best on half B: each term is measured on tokens that took no part in choosing it, so
    the sum is not biased low by the choice (the lowest of M noisy measurements of the
    same tokens would be), and a tree's reward is still the sum of its nodes' results.
    """
    return node_result_halves(losses).sum(1)


def node_result_halves(losses: np.ndarray) -> np.ndarray:
    """(n, 2) the two terms of each node's result (`node_results`): measured on half A, and on half B.

    Half A's term is its loss at the measurement best on half B, and the other way round; a
    half with no tokens below a node chooses nothing, and the other half's term then takes the
    last measurement (the fully trained weights), so no choice is ever judged on its own tokens.
    """
    M = losses.shape[1] // 2
    half_a, half_b = losses[:, :M], losses[:, M:]
    rows = np.arange(losses.shape[0])
    best_a = np.where(np.all(half_a == 0, axis=1), M - 1, half_a.argmin(1))
    best_b = np.where(np.all(half_b == 0, axis=1), M - 1, half_b.argmin(1))
    return np.stack([half_a[rows, best_b], half_b[rows, best_a]], axis=1)


def _pow2_ceil(x: np.ndarray, log_step: int = 1) -> np.ndarray:
    """The smallest power of ``2 ** log_step`` at least ``x`` (at least 1)."""
    x = np.maximum(np.asarray(x, dtype=np.int64), 1)
    return (1 << (np.ceil(np.log2(x) / log_step).astype(np.int64) * log_step)).astype(np.int64)


def _seeded_uniform(seeds: np.ndarray, count: int) -> np.ndarray:
    """(n, count) uniform in [-1, 1), a stream per uint64 seed (no global random state)."""
    with np.errstate(over="ignore"):
        bits = _splitmix(seeds[:, None] + np.arange(count, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15))
    return (bits >> np.uint64(11)).astype(np.float64) / 2.0**52 - 1.0


def _init_seeds(keys: np.ndarray, seed: int, salt: int, child_hashes: np.ndarray | None = None) -> np.ndarray:
    """Per-node (or per node and child slot, (G, W)) uint64 seeds from content keys, the recipe's seed and a salt."""
    with np.errstate(over="ignore"):
        base = _splitmix(keys[:, 0] ^ _splitmix(keys[:, 1] + np.uint64(seed) * np.uint64(1_000_003) + np.uint64(salt)))
        if child_hashes is None:
            return base
        return _splitmix(base[:, None] ^ _mix(child_hashes.reshape(-1, 2))[:, 0].reshape(child_hashes.shape[:2]))


def train_nodes(
    tree: Tree,
    nodes: np.ndarray,
    dataset: FeatureDataset,
    recipe: NodeRecipe = NodeRecipe(),
    *,
    projections: Mapping[int, int] | None = None,
    device: torch.device | str = "cpu",
    keep_weights: bool = False,
    keys: np.ndarray | None = None,
    score_split: str | None = None,
    bias_free_nodes: Collection[int] | None = None,
) -> NodeOutcome:
    """Train the internal ``nodes`` of ``tree``, each on its own (see the module docstring).

    Args:
        tree: the tree the nodes belong to (only their content matters).
        nodes: internal node ids to train.
        dataset: frozen features.
        recipe: the node recipe (sample sizes, steps, learning rate, ...).
        projections: ``{node: projected dim}`` of the head.
        device: where to train.
        keep_weights: also return each node's weights at its best measurement.
        keys: the nodes' content keys, when the caller has them (else computed).
        score_split: also score each node, at its best measurement, on this whole split
            (``"test"`` for final reports): `NodeOutcome.split_losses`.
        bias_free_nodes: internal nodes trained without biases (theirs stay exactly zero), as
            PyTorch's adaptive softmax has none in its tails (`interop.adaptive_tail_nodes`).
            Such a node has its own key (`node_keys`).

    Raises:
        FloatingPointError: when a node's loss becomes NaN or infinite.
    """
    device = torch.device(device)
    nodes = np.asarray(nodes, dtype=np.int64)
    projections = {int(k): int(v) for k, v in (projections or {}).items()}
    keys = node_keys(tree, projections, bias_free_nodes)[nodes] if keys is None else keys
    M = recipe.measure_steps.size
    outcome = NodeOutcome(
        keys, np.zeros((nodes.size, 2 * M)), np.zeros(nodes.size, np.int64), np.zeros(nodes.size, np.int64)
    )
    if nodes.size == 0:
        return outcome
    train = split_sample(dataset, "train", recipe.train_tokens, recipe.seed, device)
    valid = split_sample(dataset, "valid", recipe.valid_tokens, recipe.seed, device)
    t_rows, t_child, t_ptr = _node_pairs(tree, train.labels, nodes)
    v_rows, v_child, v_ptr = _node_pairs(tree, valid.labels, nodes)
    m = np.diff(t_ptr)
    outcome.train_tokens[:] = m
    outcome.tokens[:] = np.diff(v_ptr)
    fanout = tree.fanout[nodes].astype(np.int64)
    proj = (
        np.array([projections.get(int(n), 0) for n in nodes], dtype=np.int64) if projections else np.zeros_like(fanout)
    )
    steps = recipe.node_steps(fanout)
    visits = np.minimum(np.ceil(recipe.epochs * m).astype(np.int64), steps * recipe.batch_size)
    own_batch = np.clip(np.ceil(visits / steps).astype(np.int64), 1, recipe.batch_size)  # tokens per step
    log_step = _BATCH_BUCKET[device.type == "cpu"]
    batch = np.minimum(_pow2_ceil(own_batch, log_step), recipe.batch_size)  # the group's (padded) batch
    width = np.where(fanout > 64, fanout, np.maximum(_pow2_ceil(fanout), 2))  # wide nodes: exact, no padding
    group_key = np.stack([batch, width, proj, steps], 1)
    unique, inverse = np.unique(group_key, axis=0, return_inverse=True)
    context = _Context(tree, nodes, keys, fanout, own_batch, recipe, device, train, valid, (t_rows, t_child, t_ptr),
                       (v_rows, v_child, v_ptr), keep_weights, training_dtype(recipe.precision, device),
                       bias_free=_bias_free_mask(tree, bias_free_nodes)[nodes])  # fmt: skip
    if score_split is not None:
        context.scored = split_sample(dataset, score_split, None, recipe.seed, device)
        s_rows, s_child, s_ptr = _node_pairs(tree, context.scored.labels, nodes)
        context.scored_pairs = (s_ptr, s_rows, s_child)
        outcome.split_losses = np.zeros(nodes.size)
        context.scored_row_losses = torch.zeros(context.scored.labels.size, dtype=torch.float64, device=device)
    if recipe.init == "random" or projections:
        context.child_hashes = child_set_hashes(tree)
    if recipe.init == "embeddings":
        E = class_embeddings(dataset)
        counts = np.asarray(dataset.counts, dtype=np.float64) + 0.5  # every class some mass
        context.embeddings = (E, counts, *subtree_embedding_sums(tree, E, counts))
    for g, (b, w, p, k) in enumerate(unique):
        members = np.flatnonzero(inverse.reshape(-1) == g)
        # Nodes are independent, so a group is trained in chunks: the batch of features and the score tensors
        # of one step stay a few MB whatever the group's size.
        chunk = max(1, _CHUNK_BYTES[device.type == "cpu"] // (int(b) * dataset.dim * 4))
        for lo in range(0, members.size, chunk):
            _train_group(context, members[lo : lo + chunk], int(b), int(w), int(p), int(k), outcome)
    if score_split is not None:
        outcome.split_row_losses = context.scored_row_losses.cpu().numpy()
    return outcome


# Batches of a group, by device: powers of 2 on a CPU (little padding); powers of 8 on a GPU, whose time goes to
# launching each step's kernels, so fewer groups (more padding) is faster. Padding never changes a node's result.
_BATCH_BUCKET = {True: 1, False: 3}
# The gathered batch of one step, by device: a few MB keeps a CPU in its caches; a GPU wants few, large kernels.
_CHUNK_BYTES = {True: 4 << 20, False: 1 << 30}


@dataclass
class _Context:
    """What every group of one `train_nodes` call shares."""

    tree: Tree
    nodes: np.ndarray
    keys: np.ndarray
    fanout: np.ndarray
    own_batch: np.ndarray  # each node's tokens per step (its group pads to a power of two)
    recipe: NodeRecipe
    device: torch.device
    train: _Split
    valid: _Split
    train_pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    valid_pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
    keep_weights: bool
    dtype: torch.dtype = torch.float32  # of the training matmuls (`training_dtype`)
    bias_free: np.ndarray | None = None  # (n,) bool per trained node: trained without biases
    embeddings: tuple | None = None  # (E, counts, subtree sums, subtree mass) for warm starts
    child_hashes: np.ndarray | None = None  # `child_set_hashes` of the tree (random initialisation)
    scored: _Split | None = None  # a split every node is scored on at its best measurement
    scored_pairs: tuple | None = None  # its (ptr, rows, child) per node
    scored_row_losses: torch.Tensor | None = None  # (N,) float64: each scored row's loss, summed over the nodes


def _stream(ptr: np.ndarray, rows: np.ndarray, child: np.ndarray, members: np.ndarray, steps: int, batch: int,
            own_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(G, steps, batch) token rows and child indices: step k of a node takes its next ``own_batch`` tokens.

    Slots past a node's own batch repeat its first token (a row already in cache; they are
    masked out of the gradient).
    """
    start, count = ptr[members], np.diff(ptr)[members]
    slot = np.arange(batch, dtype=np.int64)[None, None, :]
    own = own_batch[:, None, None]
    visit = np.arange(steps, dtype=np.int64)[None, :, None] * own + slot  # the node's visit number
    position = np.where(slot < own, visit % np.maximum(count, 1)[:, None, None], 0) + start[:, None, None]
    if rows.size == 0:
        zeros = np.zeros((members.size, steps, batch), dtype=np.int64)
        return zeros, zeros
    position = np.minimum(position, rows.size - 1)
    child_of = np.where((count > 0)[:, None, None], child[position], 0)  # a node without tokens: any valid index
    return rows[position], child_of


@dataclass(frozen=True)
class _HeldOut:
    """The held-out tokens of a group's nodes, one contiguous run per node in ``rows``/``child`` (never padded here).

    `_loss_sums` pads them window by window: a (nodes x tokens) padding of the whole group would
    take G x (the largest node's count) numbers, gigabytes when one node of a large group holds
    thousands of tokens (V = 300k: 12 GiB in a final scoring).
    """

    ptr: np.ndarray  # (n + 1,): node i's tokens are rows[ptr[i]:ptr[i + 1]], for every trained node
    rows: np.ndarray  # each pair's row in the split
    child: np.ndarray  # each pair's child index
    members: np.ndarray  # the group's nodes (positions into ``ptr``)
    odd: np.ndarray | None = None  # (N,) bool per row: its document is odd; None: one set, every real token

    @property
    def num_sets(self) -> int:
        return 1 if self.odd is None else 2

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """(G,) each member's number of tokens."""
        return self.ptr[self.members + 1] - self.ptr[self.members]

    def window(self, lo: int, hi: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Members ``lo:hi``'s tokens ``start:end``: (g, span) rows and child indices, padded, and each set's mask."""
        first, count = self.ptr[self.members[lo:hi]], self.counts[lo:hi]
        offset = np.arange(start, end)[None, :]
        mask = offset < count[:, None]
        position = np.where(mask, first[:, None] + offset, 0)
        if self.rows.size == 0:
            return np.zeros_like(position), np.zeros_like(position), [mask] * self.num_sets
        rows = self.rows[position]
        if self.odd is None:
            sets = [mask]
        else:  # the validation sample's halves: rows of even and of odd documents
            odd = self.odd[rows]
            sets = [mask & ~odd, mask & odd]
        return rows, np.where(mask, self.child[position], 0), sets

    def longest(self) -> int:
        """The largest token count of the group's nodes (at least 1)."""
        return max(int(self.counts.max(initial=0)), 1)


def _train_group(c: _Context, members: np.ndarray, B: int, Wd: int, P: int, S: int, outcome: NodeOutcome) -> None:
    """Train the nodes ``members`` (positions into ``c.nodes``) together: batch B, width Wd, projection P, S steps."""
    recipe, device = c.recipe, c.device
    G, d = members.size, c.train.features.shape[1]
    din = P or d
    fan = c.fanout[members]
    if c.embeddings is not None and not P:
        w0, b0 = child_centroids(c.tree, c.embeddings[2], c.embeddings[3], c.embeddings[0], c.embeddings[1],
                                 c.nodes[members], Wd)  # fmt: skip
    else:
        # seeded by each child's class set, so that the same node with its children in another order starts the same
        slots = np.minimum(c.tree.child_ptr[c.nodes[members]][:, None] + np.arange(Wd), c.tree.child_ids.size - 1)
        seeds = _init_seeds(c.keys[members], recipe.seed, 1, c.child_hashes[slots])
        w0 = _seeded_uniform(seeds.reshape(-1), din).reshape(G, Wd, din) / math.sqrt(din)
        b0 = np.zeros((G, Wd))
    # Parametrised as W = scale * W', b = scale * b' (scale by the node's exact fanout): Adam's steps on W'
    # are then scale * lr on W, the node's own learning rate, with one fused Adam over the whole group.
    free = c.bias_free[members] if c.bias_free is not None else np.zeros(G, dtype=bool)
    b0 = np.where(free[:, None], 0.0, b0)
    # a bias-free node's bias gradient is zeroed: Adam then never moves its bias from zero
    bias_keep = torch.from_numpy((~free)[:, None].astype(np.float32)).to(device) if free.any() else None
    scale = torch.from_numpy(step_scale(fan) * np.sqrt(recipe.steps / S)).float().to(device)
    params = [torch.tensor(w0, dtype=torch.float32, device=device) / scale[:, None, None],
              torch.tensor(b0, dtype=torch.float32, device=device) / scale[:, None]]  # fmt: skip
    if P:
        proj0 = _seeded_uniform(_init_seeds(c.keys[members], recipe.seed, 2), P * d).reshape(G, P, d) / math.sqrt(d)
        params.append(torch.tensor(proj0, dtype=torch.float32, device=device))
    column_mask = torch.from_numpy(np.where(np.arange(Wd)[None, :] < fan[:, None], 0.0, -math.inf)).float().to(device)
    trained = np.diff(c.train_pairs[2])[members] > 0  # a node without train tokens keeps its initial weights
    own = c.own_batch[members]
    factor = np.where(np.arange(B)[None, :] < own[:, None], 1.0 / own[:, None], 0.0) * trained[:, None]
    grad_factor = (scale[:, None] * torch.from_numpy(factor).float().to(device))[:, :, None]  # (G, B, 1)
    t_rows, t_child = _stream(c.train_pairs[2], c.train_pairs[0], c.train_pairs[1], members, S, B, own)
    t_rows, t_child = torch.from_numpy(t_rows).to(device), torch.from_numpy(t_child).to(device)
    measure = set(measure_points(S, recipe.measurements).tolist())
    snapshots = []  # the effective parameters at each measurement, scored together at the end (one pass)
    state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros((), device=device) for _ in params])  # fmt: skip
    # One buffer for the batch's features, reused every step: a fresh multi-MB tensor per step costs more in
    # page faults than the gather itself (measured: 5x on this machine's CPU).
    # float32 training gathers the sample's float16 rows and converts them (exact); bfloat16 training gathers a
    # bfloat16 copy of the sample. Only wide nodes' products are bound by arithmetic: narrow ones multiply in
    # float32 (bfloat16 products are slower there).
    features = c.train.features if c.dtype == torch.float32 else c.train.features_as(c.dtype)
    workspace = [torch.empty(G * B, d, device=device, dtype=features.dtype)]
    if features.dtype != torch.float32 and (c.dtype == torch.float32 or Wd < BF16_MIN_WIDTH):
        workspace.append(torch.empty(G * B, d, device=device))
    for k in range(-1, S):
        if k >= 0:
            _step(k, S, B, P, features, t_rows, t_child, params, scale, column_mask, grad_factor, state,
                  recipe, workspace, bias_keep)  # fmt: skip
        if k + 1 in measure:
            snapshots.append(
                [params[0] * scale[:, None, None], params[1] * scale[:, None], *[p.clone() for p in params[2:]]]
            )
    stacked = [torch.stack([snap[i] for snap in snapshots], 1) for i in range(len(params))]  # (G, M, ...)
    # the validation sample's two halves: the rows of its even and of its odd documents, so that a choice made on
    # one half is judged on documents that took no part in it (tokens of one document are correlated)
    valid = _HeldOut(c.valid_pairs[2], c.valid_pairs[0], c.valid_pairs[1], members, c.valid.documents % 2 == 1)
    losses = _loss_sums(stacked, column_mask, c.valid.features, valid, device)  # (G, 2M)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite validation loss in {int((~np.isfinite(losses)).any(1).sum())} node(s)")
    outcome.losses[members] = losses
    per_token = 2.0 * fan * din + (2.0 * P * d if P else 0.0)  # one token's scores (and projection)
    visits = S * own * (3.0 if P else 2.0)  # forward, gradient of W (and of the projection)
    outcome.flops += float(per_token @ visits + per_token @ (np.diff(c.valid_pairs[2])[members] * len(snapshots)))
    best = torch.from_numpy(measurement_totals(losses).argmin(1)).to(device)  # the weights kept and test-scored
    chosen = [p[torch.arange(G, device=device), best] for p in stacked]
    if c.scored is not None:
        ptr, rows, child = c.scored_pairs
        single = [p[:, None] for p in chosen]
        outcome.split_losses[members] = _loss_sums(single, column_mask, c.scored.features,
                                                   _HeldOut(ptr, rows, child, members), device,
                                                   row_totals=c.scored_row_losses)[:, 0]  # fmt: skip
    if c.keep_weights:
        arrays = [p.cpu().numpy() for p in chosen]  # one copy per tensor, then views per node
        for i, row in enumerate(members):
            f = int(fan[i])
            outcome.weights[int(row)] = (arrays[0][i, :f], arrays[1][i, :f], *[a[i] for a in arrays[2:]])


def _step(k: int, S: int, B: int, P: int, features, t_rows, t_child, params, scale, column_mask, grad_factor, state,
          recipe: NodeRecipe, workspace: torch.Tensor, bias_keep: torch.Tensor | None = None) -> None:  # fmt: skip
    """One Adam step of every node of a group on its k-th batch (the gradients written out by hand).

    The matmuls take their inputs in ``features.dtype`` (bfloat16 or float32, see
    `training_dtype`); scores, softmax, gradients and Adam are float32.
    """
    W, bias = params[0], params[1]
    G = W.shape[0]
    X = torch.index_select(features, 0, t_rows[:, k].reshape(-1), out=workspace[0])
    if len(workspace) > 1:
        X = workspace[1].copy_(X)  # a narrow group multiplies in float32
    X, low = X.view(G, B, -1), X.dtype  # (G, B, d)
    if low == torch.float32:
        W_low = W
        Z = torch.bmm(X, params[2].transpose(1, 2)) if P else X  # (G, B, din)
        scores = torch.baddbmm(bias[:, None, :], Z, W.transpose(1, 2))
        scores.mul_(scale[:, None, None]).add_(column_mask[:, None])
    else:  # bfloat16 products, float32 scores: ``(Z W'^T + b') * scale``, padded columns at -inf
        W_low = W.to(low)
        Z = torch.bmm(X, params[2].to(low).transpose(1, 2)) if P else X
        offset = torch.addcmul(column_mask, bias, scale[:, None])[:, None, :]  # (G, 1, Wd)
        scores = torch.bmm(Z, W_low.transpose(1, 2)).float().mul_(scale[:, None, None]).add_(offset)
    if scores.shape[2] == 2:  # the softmax of two scores is the logistic function of their difference (faster)
        upper = torch.sigmoid(scores[..., 1] - scores[..., 0])
        grad_scores = torch.stack([1.0 - upper, upper], dim=2)
    else:  # d(mean cross-entropy)/d(scores) = (softmax - onehot) / B
        grad_scores = torch.softmax(scores, dim=2)
    grad_scores.scatter_add_(2, t_child[:, k, :, None], torch.full_like(grad_scores[..., :1], -1.0))
    grad_scores.mul_(grad_factor)  # (G, B, Wd): mean over the node's own tokens, times its scale; pads zeroed
    grad_low = grad_scores.to(low)
    grads = [torch.bmm(grad_low.transpose(1, 2), Z).float(), grad_scores.sum(1)]  # (G, Wd, din), (G, Wd)
    if bias_keep is not None:
        grads[1].mul_(bias_keep)  # (G, 1): 0 for a bias-free node
    if P:
        grads.append(torch.bmm(torch.bmm(grad_low, W_low).transpose(1, 2), X).float())  # (G, P, d)
    warmup = max(1, round(recipe.warmup_fraction * S))
    if k < warmup:
        rate = (k + 1) / warmup
    else:
        rate = 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, S - warmup)))
    for step in state[2]:
        step += 1
    torch._fused_adam_(params, grads, state[0], state[1], [], state[2], amsgrad=False, lr=recipe.lr * rate,
                       beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)  # fmt: skip


def _loss_sums(params, column_mask, features, held_out: _HeldOut, device, budget: int | None = None,
               row_totals: torch.Tensor | None = None) -> np.ndarray:  # fmt: skip
    """(G, K*M) cross-entropy of each node at each of its M snapshots, summed over each of K sets of its tokens.

    ``held_out`` gives each node's held-out tokens and the K sets a sum takes (the two halves of the
    validation sample, or all real tokens). ``row_totals`` (one snapshot, one set): also add each
    token's loss, summed over the nodes, into this (N,) float64 tensor indexed by row.

    ``params`` hold the snapshots stacked: W (G, M, Wd, din), b (G, M, Wd)[, P (G, M, p, d)]. Work is
    chunked over nodes and tokens so that no score tensor exceeds about ``budget`` numbers (a full softmax
    over 10k classes scored on 50k tokens at 5 snapshots would otherwise take 10 GB); the padded token
    windows are built chunk by chunk, and a chunk whose nodes have no tokens left is skipped (it adds zeros).
    """
    budget = budget or (1 << 23 if device.type == "cpu" else 1 << 28)  # a GPU holds a GB of scores easily
    W, bias = params[0], params[1]
    G, M, Wd, din = W.shape
    K = held_out.num_sets
    if row_totals is not None and (M != 1 or K != 1):
        raise ValueError(f"row totals take one snapshot and one set of tokens, got {M} and {K}")
    L, counts = held_out.longest(), held_out.counts
    out = np.zeros((G, K * M))
    per_token = M * max(Wd, din, features.shape[1])
    span = max(1, min(L, budget // per_token))  # tokens per chunk
    step = max(1, budget // (per_token * span))  # nodes per chunk
    rows_at_most = min(G, step) * span
    workspace = torch.empty(rows_at_most, features.shape[1], device=device, dtype=features.dtype)  # see `_train_group`
    converted = torch.empty(rows_at_most, features.shape[1], device=device) if features.dtype != torch.float32 else None
    with torch.no_grad():
        for lo in range(0, G, step):
            hi = min(G, lo + step)
            longest = int(counts[lo:hi].max())
            for start in range(0, L, span):
                if start >= longest:
                    break  # every token of these nodes is scored: the rest would add zeros
                end = min(L, start + span)
                rows, child, masks = held_out.window(lo, hi, start, end)
                index = torch.from_numpy(rows.reshape(-1)).to(device)
                X = torch.index_select(features, 0, index, out=workspace[: index.numel()])
                if converted is not None:
                    X = converted[: index.numel()].copy_(X)
                X = X.view(hi - lo, end - start, -1)
                if len(params) > 2:
                    Z = torch.bmm(X, params[2][lo:hi].flatten(1, 2).transpose(1, 2)).view(hi - lo, end - start, M, din)
                    scores = torch.einsum("glmp,gmwp->glmw", Z, W[lo:hi])
                else:
                    scores = torch.bmm(X, W[lo:hi].flatten(1, 2).transpose(1, 2)).view(hi - lo, end - start, M, Wd)
                scores = scores + bias[lo:hi, None] + column_mask[lo:hi, None, None, :]
                target = torch.from_numpy(child).to(device)[:, :, None, None].expand(-1, -1, M, 1)
                logp = torch.log_softmax(scores, dim=3).gather(3, target).squeeze(3)  # (g, span, M)
                logp = logp.double()
                for j, mask in enumerate(masks):
                    keep = torch.from_numpy(mask).to(device)[:, :, None]
                    kept = torch.where(keep, logp, 0.0)
                    out[lo:hi, j * M : (j + 1) * M] -= kept.sum(1).cpu().numpy()
                    if row_totals is not None:
                        row_totals.index_add_(0, index, -kept.reshape(-1))
    return out
