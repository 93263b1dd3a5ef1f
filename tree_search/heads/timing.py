"""Measured time of `TreeSoftmaxHead`'s training step, and the calibration of a `tree_search.cost.CostProfile`.

``tree-search cost calibrate`` calls `calibrate`: it times forward + backward of heads on a
fitting set of trees (flat, balanced, Huffman and head-and-tail shapes of many fanouts, with
and without projections), fits the profile's coefficients (`tree_search.cost.fit_coefficients`)
and reports how well it predicts a held-out set it never saw (the classic front: Huffman of
fanouts 2-32, clustered, head-and-tail, adaptive shapes, Grave's cutoffs; and trees of the
split grammar as a search builds them). All trees are built on synthetic Zipf(1) counts and
seeded clustered class embeddings at the requested V, so a profile needs no dataset.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tree_search import builders
from tree_search.cost import (
    DECODE_SETTINGS,
    LAYOUT_DEFAULTS,
    CostProfile,
    DecodeCost,
    ProfileError,
    decode_features,
    fit_coefficients,
    head_layout,
    layout_features,
    load_profile,
    parse_cost_spec,
)
from tree_search.data.cache import cache_root
from tree_search.data.features import FeatureDataset
from tree_search.heads import native
from tree_search.heads.centroid import centroid_head
from tree_search.heads.decode_replay import DecodeReplay, decode_scores_for_dataset
from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.split_grammar import Plan, SplitRule, huffman_rule, plan_tree
from tree_search.tree import Tree

__all__ = [
    "HELD_OUT_CLASSICS",
    "REFERENCE_HEADS",
    "CalibrationTree",
    "TimedTree",
    "calibrate",
    "calibration_trees",
    "reference_head",
    "check_cost_spec",
    "decoding_cost",
    "default_profile_path",
    "device_name",
    "resolve_cost",
    "synthetic_classes",
    "time_decoding",
    "time_training_step",
    "release_free_memory",
    "tune_allocator",
]

# The held-out trees of a calibration: the classic front (no tree of the fitting set is among them).
HELD_OUT_CLASSICS = (
    "huffman-2", "huffman-3", "huffman-4", "huffman-6", "huffman-8", "huffman-12", "huffman-16", "huffman-32",
    "balanced-16", "cutoffs-80", "cutoffs", "cutoffs-95", "adaptive-50", "adaptive", "adaptive-10", "grave-2",
    "grave-3", "grave-4", "pca-4", "pca-16", "kmeans-4", "kmeans-16", "kmeans-32", "headtail-kmeans-4",
    "headtail-kmeans-16", "headtail-pca-4", "two-level",
)  # fmt: skip

# PyTorch's `AdaptiveLogSoftmaxWithLoss` with its usual cutoffs (V/25, V/5; div_value 4), timed beside our
# head on the same shape (the held-out tree named here)
REFERENCE_HEADS = {"torch AdaptiveLogSoftmaxWithLoss": "adaptive"}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_REPLAYS: dict = {}  # (dataset key, k, batch) -> the dataset's decoding replay (`decode_scores_for_dataset`)
CACHE_SIZES = (*(float(1 << k) * 2**20 for k in range(9)), math.inf)  # 1 MB .. 256 MB, or no cache effect


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Keep freed blocks below ``threshold`` bytes in the heap instead of returning them to the OS (glibc only).

    A training step of a tree head allocates and frees tensors of tens of MB; glibc hands
    blocks above 32 MB-ish back to the kernel at once, so every step page-faults them in
    again. On the 2-core VM this project is measured on that doubled a binary Huffman step
    at V = 50k. A process-wide setting, so the command line sets it, not the library.
    Returns whether it was applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold))


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (its allocator's settings), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc's ``malloc_trim``); whether it could.

    With `tune_allocator`'s thresholds freed blocks stay in the process: between two phases
    (the search, then the final scoring) the first one's free memory would add to the second
    one's peak. Returns False off glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    gc.collect()  # the search's objects first, so that their blocks are free
    return bool(libc.malloc_trim(0))


def reference_head(name: str, num_classes: int, dim: int) -> torch.nn.Module:
    """The `REFERENCE_HEADS` module ``name`` at this size: PyTorch's adaptive softmax with its usual cutoffs."""
    from tree_search.heads.reference import AdaptiveSoftmaxHead

    if name not in REFERENCE_HEADS:
        raise ValueError(f"no reference head {name!r}; known: {sorted(REFERENCE_HEADS)}")

    V = int(num_classes)
    cutoffs = sorted({c for c in (V // 25, 5 * V // 25) if 1 <= c <= V - 1})
    return AdaptiveSoftmaxHead(V, dim, cutoffs, div_value=4.0)


def device_name(device: torch.device) -> str:
    """A readable name of ``device``: the CPU model and thread count, or the GPU's name."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 (a tiny read)
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def synthetic_classes(
    num_classes: int, seed: int = 0, dim: int = 32, exponent: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Zipf counts (``1 / rank**exponent``) and seeded class embeddings (sqrt(V) Gaussian clusters) for timing."""
    rng = np.random.default_rng(seed)
    counts = 1.0 / np.arange(1, num_classes + 1) ** exponent
    centres = rng.standard_normal((max(2, int(np.sqrt(num_classes))), dim))
    embeddings = centres[rng.integers(0, centres.shape[0], num_classes)] + 0.3 * rng.standard_normal((num_classes, dim))
    return counts, embeddings.astype(np.float32)


def time_training_step(
    head: TreeSoftmaxHead,
    h: torch.Tensor,
    y: torch.Tensor,
    *,
    repeats: int = 5,
    precision: str = "fp32",
) -> float:
    """Median seconds of one forward + backward of ``head`` on ``(h, y)`` (after one warm-up step).

    The gradient flows into ``h`` when it requires grad (as when an encoder is trained with
    the head). ``precision`` "bf16" runs the forward under autocast.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    autocast = torch.autocast(h.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        for p in params:
            p.grad = None
        h.grad = None
        with autocast:
            loss = head(h, y).loss
        loss.backward()
        if h.device.type == "cuda":
            torch.cuda.synchronize(h.device)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_decoding(
    head: TreeSoftmaxHead, queries: torch.Tensor, *, k: int = 5, batch: int = 256, repeats: int = 5, single: int = 16
) -> dict[str, float]:
    """Seconds per query of ``head.predict(h, k)`` (exact top-k), measured on ``queries`` (N, d).

    Returns ``{"batch": ...}``: the median over ``repeats`` calls on ``batch`` queries at once,
    per query (throughput), and ``{"single": ...}``: the median over ``single`` calls on one
    query each (latency; NaN when ``single`` is 0). One warm-up call first. The time depends
    on the head's weights (a node is scored only while it can still hold a top-k class), so
    time trained heads.
    """
    h = queries[:batch]

    def timed(x: torch.Tensor) -> float:
        start = time.perf_counter()
        head.predict(x, k)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - start

    with torch.no_grad():
        timed(h)
        per_batch = float(np.median([timed(h) for _ in range(repeats)])) / h.shape[0]
        singles = [timed(queries[i : i + 1]) for i in range(min(single, queries.shape[0]))]
        per_query = float(np.median(singles)) if singles else math.nan
    return {"batch": per_batch, "single": per_query}


def default_profile_path(device_type: str, dim: int, batch: int = 4096, precision: str = "fp32") -> Path:
    """Where ``tree-search cost calibrate`` writes (and ``--cost measured`` reads) this device's profile."""
    return cache_root() / "cost_profiles" / f"{device_type}-d{int(dim)}-b{int(batch)}-{precision}.json"


def check_cost_spec(spec: str, device_type: str = "cpu") -> None:
    """Fail early on a ``--cost`` value `resolve_cost` would refuse without the data.

    Checks the syntax, an explicit profile file, and that ``measured`` alone has a profile
    of this device type at some dimension (its dimension is checked once the data is known).

    Raises:
        ProfileError: as `resolve_cost`.
    """
    kind, path = parse_cost_spec(spec)
    if kind == "macs":
        return
    if path:
        profile = load_profile(path)
        if kind == "decode":
            _decoding_of(profile, path)
        return
    folder = default_profile_path(device_type, 1).parent
    if not any(folder.glob(f"{device_type}-d*.json")):
        raise ProfileError(f"--cost {kind}: no cost profile of this {device_type} in {folder}; "
                           "write one with `tree-search cost calibrate` (about a minute)")  # fmt: skip


FAR_V = 5.0  # a profile is used at most this many times above or below the V it was calibrated at without a warning
# (measured: a 10k profile errs by 8% in the median at 100k and 19% at 500k, a 100k profile by 3% and 5%)


def resolve_cost(
    spec: str, *, dim: int, device_type: str = "cpu", dataset: FeatureDataset | None = None
) -> CostProfile | DecodeCost | None:
    """The cost model a ``--cost`` value names: None, a `CostProfile`, or its decoding side (`DecodeCost`).

    ``"macs"``: None; ``"measured[:PATH]"``: the profile (training time); ``"decode[:PATH]"``:
    `CostProfile.decoding` (decoding time), bound to ``dataset``'s decoding replay when given.
    Without a path it reads this device type's profile at ``dim``: the default one (batch
    4096, fp32; `default_profile_path`) when it exists, else the newest written at ``dim``.

    Raises:
        ProfileError: an unknown value, a missing or unusable profile (or one without decoding, for
        ``decode``), or one measured at another dim.
    """
    kind, path = parse_cost_spec(spec)
    if kind == "macs":
        return None
    if not path:
        default = default_profile_path(device_type, dim)
        others = sorted(default.parent.glob(f"{device_type}-d{int(dim)}-*.json"), key=lambda p: p.stat().st_mtime)
        path = default if default.exists() or not others else others[-1]
    profile = load_profile(path)
    if profile.dim != int(dim):
        raise ProfileError(f"{path}: measured at dim {profile.dim}, the data has dim {dim}; "
                           f"run `tree-search cost calibrate --dim {dim}`")  # fmt: skip
    if dataset is not None and not 1 / FAR_V <= dataset.num_classes / profile.num_classes <= FAR_V:
        warnings.warn(f"{path}: calibrated at V = {profile.num_classes:,}, the data has V = {dataset.num_classes:,}; "
                      f"its predictions carry less far (docs/cost-in-time.md): `tree-search cost calibrate "
                      f"--classes {dataset.num_classes} --dim {dim}` measures this size", UserWarning,
                      stacklevel=2)  # fmt: skip
    in_use = native.kernels_in_use(device_type)
    if profile.pair_kernels != in_use:
        warnings.warn(f"{path}: measured with the packed nodes' {profile.pair_kernels or 'torch'} kernels, this "
                      f"process runs the {in_use} ones, so its times do not hold here: `tree-search cost calibrate` "
                      f"measures them", UserWarning, stacklevel=2)  # fmt: skip
    if kind == "decode":
        decoding = _decoding_of(profile, path)
        return decoding if dataset is None else decoding_cost(profile, dataset)
    return profile


def _decoding_of(profile: CostProfile, path) -> DecodeCost:
    """``profile.decoding``, its error naming the file."""
    try:
        return profile.decoding
    except ProfileError as err:
        raise ProfileError(f"{path}: {err}") from None


def decoding_cost(profile: CostProfile, dataset: FeatureDataset) -> DecodeCost:
    """``profile``'s decoding model bound to ``dataset``'s decoding replay (one replay memo per dataset and process).

    Raises:
        ProfileError: a profile without decoding.
    """
    key = (dataset.key, profile.decode_k, profile.decode_batch)
    if key not in _REPLAYS:
        _REPLAYS[key] = decode_scores_for_dataset(dataset, k=profile.decode_k, batch=profile.decode_batch)
    return profile.decoding.bound(_REPLAYS[key])


@dataclass(frozen=True)
class TimedTree:
    """A tree of a calibration, its head's measured and predicted seconds per token."""

    name: str
    role: str  # "fit" or "held out"
    measured: float
    predicted: float

    @property
    def relative_error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted - self.measured) / self.measured


@dataclass(frozen=True)
class CalibrationTree:
    """A tree of a calibration: its role, its projections, and the synthetic classes it was built on."""

    name: str
    role: str  # "fit" or "held out"
    tree: Tree
    projections: dict[int, int]
    classes: str  # "a" (Zipf 1, the held-out trees' classes) or "b" (Zipf 0.8, another seed: fitting only)


FIT_EXPONENT = 0.8  # the Zipf exponent of the fitting set's second class distribution
DECODE_TEMPERATURE = 16.0  # the centroid heads' scale: scores are T x cosine + log share (bench_decode's too)


def calibration_trees(num_classes: int, dim: int, seed: int = 0) -> list[CalibrationTree]:
    """The fitting and held-out trees of a calibration, on two sets of `synthetic_classes`.

    Held out: `HELD_OUT_CLASSICS` and four trees of the split grammar (a root rule with
    completions, as ``dp`` builds them), on classes "a" (Zipf 1). Fitting: the same
    families built on other classes "b" (Zipf 0.8, another seed: other trees), plus on "a"
    the flat tree (one node), balanced trees, Huffman trees of fanouts the held-out trees do
    not use, head-and-tail shapes of three head sizes with unprojected, half- and
    eighth-size tails, and random deep trees. No held-out tree is among the fitting trees.
    """
    V = int(num_classes)
    counts, embeddings = synthetic_classes(V, seed)
    counts_b, embeddings_b = synthetic_classes(V, seed + 1, exponent=FIT_EXPONENT)
    out = [CalibrationTree("flat", "fit", builders.from_children(V, [list(range(V))]), {}, "a")]
    by_count = np.argsort(-counts, kind="stable")
    for k in (2, 4, 32, 128):
        out.append(CalibrationTree(f"balanced-{k}", "fit", builders.balanced(V, k, order=by_count), {}, "a"))
    for k in (5, 10, 24, 48, 96, 256):
        out.append(CalibrationTree(f"huffman-{k}", "fit", builders.huffman(counts, k), {}, "a"))
    for head in (V // 200, V // 50, V // 10):
        cuts = [max(2, head), min(V - 1, 6 * max(2, head))]
        for divisor in (1, 2, 8):
            sizes = [dim // divisor, dim // (divisor * 4) or 1]
            tree, projections = builders.projected_cutoffs(counts, cuts, sizes, dim)
            out.append(CalibrationTree(f"cutoffs-{cuts[0]}/{cuts[1]}-div{divisor}", "fit", tree, projections, "a"))
    for arity in (2, 6):
        out.append(CalibrationTree(f"random-{arity}", "fit", builders.random_tree(V, seed, max_arity=arity), {}, "a"))
    plans = {
        "split: headtail-kmeans-8 / huffman-4": Plan(SplitRule("kmeans", "headtail", 8), {}),
        "split: kmeans-16 / huffman-2": Plan(SplitRule("kmeans", "count", 16),
                                             {i: Plan(huffman_rule(2)) for i in range(16)}),
        "split: pca-4 / kmeans-8": Plan(SplitRule("pca", "mass", 4),
                                        {i: Plan(SplitRule("kmeans", "count", 8)) for i in range(4)}),
        "split: headtail-frequency-4 / huffman-8": Plan(SplitRule("frequency", "headtail", 4),
                                                        {i: Plan(huffman_rule(8)) for i in range(1, 4)}),
    }  # fmt: skip
    for role, classes, (c, e) in (("fit", "b", (counts_b, embeddings_b)), ("held out", "a", (counts, embeddings))):
        prefix = "b: " if classes == "b" else ""
        for name, built in builders.classic_trees(c, HELD_OUT_CLASSICS, embeddings=e, dim=dim, seed=seed).items():
            out.append(CalibrationTree(prefix + name, role, built.tree, built.projections, classes))
        for name, plan in plans.items():
            out.append(CalibrationTree(prefix + name, role, plan_tree(c, e, plan, seed=seed), {}, classes))
    return out


def calibrate(
    *,
    num_classes: int = 10_000,
    dim: int = 256,
    batch: int = 4096,
    precision: str = "fp32",
    sparse: bool = True,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    passes: int = 2,
    seed: int = 0,
    head_settings: Mapping[str, int] | None = None,
    decode: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[CostProfile, list[TimedTree]]:
    """Time the fitting and held-out trees on ``device``, fit a `CostProfile`, and check it on the held-out ones.

    Training: forward + backward of an untrained head per tree. Decoding (``decode``): exact
    top-k (`TreeSoftmaxHead.predict`, k and batch from `DECODE_SETTINGS`) of a head holding
    centroid-classifier weights (`heads.centroid.centroid_head`: a decoder's time depends on
    its weights), on queries near the classes' embeddings, drawn by count; the embeddings the
    heads score are the trees' building embeddings mapped to ``dim`` by a seeded random matrix,
    so clustered trees group classes the head finds alike. Decoding's features count the
    pairs the search scored (`DecodeReplay` on the head's own distributions: exact), so its
    fit prices scored pairs and levels; how well a search predicts those counts on its data is
    checked where trained heads are timed (the report). Each side gets its own fit.

    Returns the profile (its ``fit`` and ``decode_fit`` hold the median and largest relative
    errors on both sets) and every tree's measured and predicted time (decoding rows are named
    ``"decode: NAME"``). ``progress(name, done, total)`` is called before each timing
    (``passes`` rounds over all trees; each keeps its fastest).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    settings = {**LAYOUT_DEFAULTS, **(head_settings or {})}
    trees = calibration_trees(num_classes, dim, seed)
    counts = {"a": synthetic_classes(num_classes, seed)[0],
              "b": synthetic_classes(num_classes, seed + 1, exponent=FIT_EXPONENT)[0]}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for key, c in counts.items():  # targets drawn from each tree's own class counts
        y = torch.multinomial(torch.from_numpy(c / c.sum()), batch, replacement=True, generator=generator)
        h = torch.randn(batch, dim, generator=generator).to(device).requires_grad_(True)
        inputs[key] = (h, y.to(device))
    measured = {t.name: math.inf for t in trees}
    decoded = {t.name: math.inf for t in trees}
    decode_batch, decode_k = DECODE_SETTINGS["decode_batch"], DECODE_SETTINGS["decode_k"]
    queries, embeddings, replayed = {}, {}, {}
    for key, (s_, exponent) in (("a", (seed, 1.0)), ("b", (seed + 1, FIT_EXPONENT))):
        c, e = synthetic_classes(num_classes, s_, exponent=exponent)
        rng = np.random.default_rng(seed + 7)
        E = e @ rng.standard_normal((e.shape[1], dim)).astype(np.float32)
        E /= np.linalg.norm(E, axis=1, keepdims=True)
        y = rng.choice(num_classes, size=decode_batch, p=c / c.sum())
        q = E[y] + rng.standard_normal((decode_batch, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
        queries[key] = torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True)).to(device)
        embeddings[key] = E

    def features_at(cache_bytes: float) -> dict[str, np.ndarray]:
        return {t.name: layout_features(t.tree, counts[t.classes], dim, t.projections,
                                        head_layout(t.tree, t.projections, **settings), batch=batch, sparse=sparse,
                                        cache_bytes=cache_bytes).sum(0) for t in trees}  # fmt: skip

    # Every tree is timed in each of `passes` rounds and keeps its fastest median: a drift of the machine's
    # speed (another process, the clock) then hits one round of one tree, not the fit.
    references = {name: math.inf for name in REFERENCE_HEADS}
    shuffle = np.random.default_rng(seed)
    for round_ in range(passes):
        # each round in its own seeded order: a drift of the machine within a round (allocator, heat) then falls
        # on different trees in each, not always on the held-out ones, which come last in the list
        for done, t in enumerate([trees[i] for i in shuffle.permutation(len(trees))]):
            if progress is not None:
                progress(t.name, round_ * len(trees) + done, passes * len(trees))
            torch.manual_seed(seed)
            head = TreeSoftmaxHead(t.tree, dim, projections=t.projections, sparse=sparse, **settings).to(device)
            seconds = time_training_step(head, *inputs[t.classes], repeats=repeats, precision=precision) / batch
            measured[t.name] = min(measured[t.name], seconds)
            del head
            if decode:
                head = centroid_head(t.tree, embeddings[t.classes], counts[t.classes], projections=t.projections,
                                     temperature=DECODE_TEMPERATURE, **settings).to(device)  # fmt: skip
                seconds = time_decoding(head, queries[t.classes], k=decode_k, batch=decode_batch, repeats=repeats,
                                        single=0)["batch"]  # fmt: skip
                decoded[t.name] = min(decoded[t.name], seconds)
                if t.name not in replayed:  # the pairs the search scored, replayed on the head's own distributions
                    with torch.no_grad():
                        own = head.log_probs_all(queries[t.classes]).float().cpu()
                    replayed[t.name] = DecodeReplay(t.tree, own).replay(decode_k, decode_batch)
                del head
        for name in REFERENCE_HEADS:  # PyTorch's own module, timed the same way
            head = reference_head(name, num_classes, dim).to(device)
            seconds = time_training_step(head, *inputs["a"], repeats=repeats, precision=precision) / batch
            references[name] = min(references[name], seconds)
    fit_names = [t.name for t in trees if t.role == "fit"]
    times = np.array([measured[n] for n in fit_names])
    best = None
    for cache_bytes in CACHE_SIZES:  # the cache size is fitted too: the one whose fit errs least on the fitting set
        features = features_at(cache_bytes)
        rows = np.array([features[n] for n in fit_names])
        coefficients = fit_coefficients(rows, times)
        error = float(np.mean((rows @ coefficients / times - 1) ** 2))
        if best is None or error < best[0]:
            best = (error, cache_bytes, features, coefficients)
    _, cache_bytes, features, coefficients = best
    timed = [TimedTree(t.name, t.role, measured[t.name], float(features[t.name] @ coefficients)) for t in trees]

    decode_fields: dict = {}
    if decode:
        rows_at = {}
        for t in trees:
            layout = head_layout(t.tree, t.projections, **settings)
            rows_at[t.name] = decode_features(t.tree, replayed[t.name], dim, t.projections, layout,
                                              batch=decode_batch, k=decode_k).sum(0)  # fmt: skip
        decode_coefficients = fit_coefficients(np.array([rows_at[n] for n in fit_names]),
                                               np.array([decoded[n] for n in fit_names]))  # fmt: skip
        decode_timed = [TimedTree(t.name, t.role, decoded[t.name], float(rows_at[t.name] @ decode_coefficients))
                        for t in trees]  # fmt: skip
        decode_fields = {
            "decode_coefficients": tuple(float(c) for c in decode_coefficients),
            "decode_batch": decode_batch, "decode_k": decode_k,
            "decode_fit": {"fit": _errors(decode_timed, "fit"), "held_out": _errors(decode_timed, "held out"),
                           "temperature": DECODE_TEMPERATURE,
                           "trees": {t.name: {"role": t.role, "measured": t.measured, "predicted": t.predicted}
                                     for t in decode_timed}},
        }  # fmt: skip
        timed += [TimedTree(f"decode: {t.name}", t.role, t.measured, t.predicted) for t in decode_timed]

    profile = CostProfile(
        device=device_name(device),
        device_type=device.type,
        dim=int(dim),
        batch=int(batch),
        precision=precision,
        sparse=bool(sparse),
        num_classes=int(num_classes),
        coefficients=tuple(float(c) for c in coefficients),
        cache_bytes=float(cache_bytes),
        torch_version=torch.__version__,
        pair_kernels=native.kernels_in_use(device.type),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        fit={"fit": _errors(timed, "fit"), "held_out": _errors(timed, "held out"), "repeats": int(repeats),
             "passes": int(passes),
             "references": {name: {"measured": seconds, "same_shape": REFERENCE_HEADS[name],
                                   "same_shape_measured": measured[REFERENCE_HEADS[name]]}
                            for name, seconds in references.items()},
             "trees": {t.name: {"role": t.role, "measured": t.measured, "predicted": t.predicted}
                       for t in timed if not t.name.startswith("decode: ")}},
        head_settings={k: int(v) for k, v in settings.items()},
        **decode_fields,
    )  # fmt: skip
    return profile, timed


def _errors(timed: list[TimedTree], role: str) -> dict[str, float]:
    """The median and largest absolute relative errors of the training rows of ``role`` in ``timed``."""
    rel = np.abs([t.relative_error for t in timed if t.role == role and not t.name.startswith("decode: ")])
    return {"trees": int(rel.size), "median_abs_relative_error": float(np.median(rel)),
            "max_abs_relative_error": float(rel.max())}  # fmt: skip
