"""The reward: train a head on a tree and score it on validation data, cached.

`evaluate` is what every searcher calls: it never raises for a failed training (NaN,
out of memory); the failure is recorded in `Result.error`. `score_test` is the only
function that touches the test split, for final reports; searches never call it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tree_search.data.cache import atomic_write_bytes, cache_root, content_key
from tree_search.data.features import FeatureDataset, default_device
from tree_search.heads.train import Callback, EvalPoint, TrainConfig, device_split, fit, validation_nll
from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.tree import Tree

__all__ = ["Result", "evaluate", "head_cost", "score_test"]

_REWARD_VERSION = "reward/2"  # 2: results carry the first seed's validation history
_MEMORY: dict[str, Result] = {}


@dataclass(frozen=True)
class Result:
    """One evaluated tree. Losses in nats/token; ``error`` is set when training failed."""

    tree_hash: str
    valid_nll: float  # mean over seeds of the best validation NLL (inf when failed)
    valid_nll_stderr: float  # standard error over seeds (0 with one seed)
    perplexity: float
    top1: float  # accuracy of the head's top-1 prediction on the top-k subset
    top5: float
    expected_cost: float  # multiply-adds per token under the training counts
    cost_ratio: float  # expected_cost / full softmax cost
    train_seconds: float
    steps: int
    device: str
    seeds: tuple[int, ...]
    per_seed_nll: tuple[float, ...] = ()
    error: str | None = None
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when training succeeded."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (infinities as null)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        """Inverse of `to_json`."""
        values = dict(data)
        for key in ("valid_nll", "valid_nll_stderr", "perplexity"):
            if values.get(key) is None:
                values[key] = math.inf
        values["seeds"] = tuple(values["seeds"])
        values["per_seed_nll"] = tuple(values.get("per_seed_nll", ()))
        return cls(**values)


@torch.no_grad()
def _top_k_accuracy(head: TreeSoftmaxHead, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    hits1 = hits5 = 0
    for start in range(0, labels.shape[0], 4096):
        h, y = features[start : start + 4096], labels[start : start + 4096]
        classes, _ = head.predict(h, k=min(5, head.num_classes))
        hits1 += int((classes[:, 0] == y).sum())
        hits5 += int((classes == y[:, None]).any(1).sum())
    n = max(1, labels.shape[0])
    return hits1 / n, hits5 / n


def head_cost(
    tree: Tree,
    counts: np.ndarray | None,
    dim: int,
    projections: Mapping[int, int] | None = None,
) -> float:
    """Expected multiply-adds per token of a `TreeSoftmaxHead`, projections included.

    A node without a projection costs ``fanout * dim`` per visit (`Tree.expected_cost`);
    a node projected to ``p`` dimensions costs ``dim * p + fanout * p`` (the projection,
    then its children's scores), as a tail cluster of ``AdaptiveLogSoftmaxWithLoss`` does.
    """
    cost = tree.expected_cost(counts, dim)
    if projections:
        nodes = np.fromiter(projections.keys(), dtype=np.int64)
        sizes = np.fromiter(projections.values(), dtype=np.float64)
        bad = (nodes < 0) | (nodes >= tree.num_internal) | (sizes < 1)
        if bad.any():
            node, size = int(nodes[bad][0]), int(sizes[bad][0])
            raise ValueError(f"projection {node}: {size} must name an internal node (0..{tree.num_internal - 1}) "
                             f"and a size >= 1")  # fmt: skip
        V = tree.num_classes
        leaf_visits = np.full(V, 1.0 / V) if counts is None else np.asarray(counts, np.float64) / np.sum(counts)
        visits = tree.subtree_sums(leaf_visits)[nodes]  # probability that a token's path passes each node
        fanout = tree.fanout[nodes]
        cost += float(visits @ (dim * sizes + fanout * sizes - fanout * dim))
    return cost


def _cache_path(key: str) -> Path:
    return cache_root() / "evaluations" / key[:2] / f"{key}.json"


def evaluate(
    tree: Tree,
    dataset: FeatureDataset,
    config: TrainConfig = TrainConfig(),
    *,
    seeds: int | Sequence[int] = 1,
    device: torch.device | str | None = None,
    top_k_samples: int = 5_000,
    use_cache: bool = True,
    callbacks: Sequence[Callback] = (),
    projections: Mapping[int, int] | None = None,
) -> Result:
    """Train a `TreeSoftmaxHead` on ``tree`` and report its validation loss and cost.

    Args:
        tree: the tree over the dataset's classes.
        dataset: frozen features (see `tree_search.data.prepare_dataset`).
        config: the training budget; ``config.seed`` is the first seed.
        seeds: how many seeds (``config.seed, config.seed + 1, ...``) or which seeds;
            the result is their mean with its standard error.
        device: default CUDA when available.
        top_k_samples: validation rows on which top-1/top-5 accuracy are measured.
        use_cache: reuse results keyed by (canonical tree hash, dataset key, budget,
            seeds), in memory and on disk under the cache folder.
        callbacks: per-measurement callbacks of the first seed's training (pruners). A
            run a callback stopped is returned with ``extra["pruned"] = True`` and is
            not cached, since it is a partial measurement.
        projections: optional ``{internal node: projected dim}`` of the head (the
            adaptive-softmax tail clusters); part of the cache key and of the cost.

    Returns:
        A `Result`; ``error`` says why when training failed (nothing is raised).
    """
    if tree.num_classes != dataset.num_classes:
        raise ValueError(f"the tree has {tree.num_classes} classes, the dataset {dataset.num_classes}")
    seed_list = tuple(range(config.seed, config.seed + seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not seed_list:
        raise ValueError(f"evaluate needs at least one seed, got seeds={seeds!r}")
    key = content_key(
        {
            "reward": _REWARD_VERSION,
            "tree": tree.canonical_hash,
            "dataset": dataset.key,
            "config": {k: v for k, v in asdict(config).items() if k != "seed"},
            "seeds": seed_list,
            "top_k_samples": top_k_samples,
            # Projections name nodes by id, which the canonical hash ignores: key those trees by exact structure.
            **(
                {
                    "projections": sorted((int(n), int(d)) for n, d in projections.items()),
                    "structure": content_key({"ptr": tree.child_ptr.tolist(), "ids": tree.child_ids.tolist()}),
                }
                if projections
                else {}
            ),
        }
    )
    if use_cache:
        cached = _MEMORY.get(key)
        path = _cache_path(key)
        if cached is None and path.exists():
            cached = _MEMORY[key] = Result.from_json(json.loads(path.read_text(encoding="utf-8")))
        if cached is not None:
            return _replay(cached, callbacks)
    device = torch.device(device) if device is not None else default_device()
    counts = dataset.counts if dataset.counts.sum() > 0 else None
    projections = {int(node): int(size) for node, size in (projections or {}).items()}
    cost = head_cost(tree, counts, dataset.dim, projections)
    ratio = cost / tree.full_softmax_cost(dataset.dim)
    started = time.perf_counter()
    per_seed, steps, top1, top5, error, pruned, history = [], 0, math.nan, math.nan, None, False, []
    try:
        for index, seed in enumerate(seed_list):
            run_config = replace(config, seed=seed)
            torch.manual_seed(seed)
            head = TreeSoftmaxHead(tree, dataset.dim, projections=projections, sparse=config.sparse)
            outcome = fit(head, dataset, run_config, device=device, callbacks=callbacks if index == 0 else ())
            per_seed.append(outcome.best_valid_nll)
            steps += outcome.steps
            if index == 0:
                history = [[point.step, point.epoch, point.valid_nll, point.train_loss, point.seconds]
                           for point in outcome.history]  # fmt: skip
            if outcome.stopped_by_callback:  # a pruned run is a partial measurement: report it, never cache it
                pruned = True
                break
            if index == 0 and top_k_samples:
                features, labels = device_split(dataset, "valid", device, config.max_valid_samples)
                top1, top5 = _top_k_accuracy(head, features[:top_k_samples], labels[:top_k_samples])
    except (FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError, RuntimeError) as err:
        error = f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - started
    if error is None:
        mean = float(np.mean(per_seed))
        stderr = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    else:
        mean, stderr = math.inf, math.inf
    result = Result(
        tree_hash=tree.canonical_hash,
        valid_nll=mean,
        valid_nll_stderr=stderr,
        perplexity=math.exp(mean) if mean < 700 else math.inf,
        top1=top1,
        top5=top5,
        expected_cost=cost,
        cost_ratio=ratio,
        train_seconds=seconds,
        steps=steps,
        device=str(device),
        seeds=seed_list,
        per_seed_nll=tuple(per_seed),
        error=error,
        extra={"pruned": True, "history": history} if pruned else {"history": history},
    )
    if use_cache and error is None and not pruned:  # failures may be transient (memory); pruned runs are partial
        _MEMORY[key] = result
        atomic_write_bytes(_cache_path(key), json.dumps(result.to_json()).encode())
    return result


def _replay(result: Result, callbacks: Sequence[Callback]) -> Result:
    """A cached result as the callbacks would have seen it.

    Each stored measurement of the first seed is passed to them in order; if one stops
    training, the result is the same partial (pruned) measurement a fresh training would
    have given. So a search decides the same way whether or not a tree was cached.
    """
    history = result.extra.get("history") or []
    for index, values in enumerate(history):
        point = EvalPoint(*values)
        if any(callback(point) for callback in callbacks):
            best = min(v[2] for v in history[: index + 1])
            return replace(
                result,
                valid_nll=best,
                valid_nll_stderr=0.0,
                perplexity=math.exp(best) if best < 700 else math.inf,
                per_seed_nll=(best,),
                steps=int(point.step),
                top1=math.nan,
                top5=math.nan,
                cached=True,
                extra={**result.extra, "pruned": True},
            )
    return replace(result, cached=True)


def score_test(
    tree: Tree,
    dataset: FeatureDataset,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str | None = None,
    projections: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """Final-report scoring: train as `evaluate` does (seed ``config.seed``), then measure the test split.

    Searches select on validation and never call this.
    """
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(config.seed)
    head = TreeSoftmaxHead(tree, dataset.dim, projections=projections, sparse=config.sparse)
    outcome = fit(head, dataset, config, device=device)
    features, labels = device_split(dataset, "test", device)
    test_nll = validation_nll(head, features, labels)
    return {"valid_nll": outcome.best_valid_nll, "test_nll": test_nll, "test_perplexity": math.exp(test_nll)}
