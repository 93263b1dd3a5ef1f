"""The reward: the validation loss of a head trained on a tree, assembled node by node from the node bank.

`evaluate` is what every searcher calls. It trains (`tree_search.reward.node_train`)
only the tree's internal nodes that the `NodeBank` lacks, all of them in one batched
pass, stores them, and sums: ``NLL(T) = (1/N) sum_n L_n`` over the tree's nodes, on a
seeded random sample of the validation split. A genuine training failure (non-finite
loss, out of memory) is recorded in `Result.error`; any other exception is a bug and
propagates. `score_test` is the only function that touches the test split, for final
reports, with seeds the search never trained with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tree_search.builders import frequency_cutoffs, huffman
from tree_search.cost import CostProfile, full_softmax_macs, head_cost, node_costs
from tree_search.data.cache import cache_root
from tree_search.data.features import FeatureDataset, default_device
from tree_search.heads.train import Callback, EvalPoint
from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.reward import node_train
from tree_search.reward.node_bank import NodeBank
from tree_search.reward.node_train import (
    NodeRecipe,
    child_set_hashes,
    measurement_totals,
    node_keys,
    node_result_halves,
    node_results,
    split_sample,
    train_nodes,
)
from tree_search.tree import Tree

__all__ = [
    "FINAL_SEED_OFFSET",
    "Result",
    "evaluate",
    "head_cost",
    "full_softmax_cost",
    "huffman_cost",
    "node_costs",
    "node_nll_shares",
    "node_weights",
    "score_test",
    "training_failure",
]

FINAL_SEED_OFFSET = 1_000_000  # final test scoring uses seeds from here on: never a search's seed


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


def huffman_cost(dataset: FeatureDataset, model: CostProfile | None = None) -> float:
    """Binary Huffman's `head_cost` under the dataset's counts (uniform when it has none): the unit of cost caps.

    In multiply-adds, or in ``model``'s seconds per token (`tree_search.cost`).
    """
    counts = dataset.class_weights
    return head_cost(huffman(counts, 2), counts, dataset.dim, model=model)


def full_softmax_cost(dataset: FeatureDataset, model: CostProfile | None = None) -> float:
    """The full softmax's cost per token (one node over every class): V x dim multiply-adds, or ``model``'s time."""
    if model is None:
        return full_softmax_macs(dataset.num_classes, dataset.dim)
    return head_cost(frequency_cutoffs(np.ones(dataset.num_classes), []), None, dataset.dim, model=model)


def node_nll_shares(
    tree: Tree,
    dataset: FeatureDataset,
    recipe: NodeRecipe,
    *,
    seeds: int = 1,
    projections: Mapping[int, int] | None = None,
    device: torch.device,
    node_bank: bool = True,
    nodes: np.ndarray | None = None,
    halves: bool = False,
) -> tuple[np.ndarray, dict[str, int]]:
    """Each node's share of the validation NLL: its cross-fitted result (`node_results`) per token, mean over seeds.

    `evaluate`'s arithmetic, node by node: a tree's NLL is the sum of its nodes' shares.
    ``nodes`` restricts it to some internal nodes (as `node_losses`). ``halves``: (I, 2) shares,
    the terms measured on each validation half (`node_result_halves`), which sum to the share.
    Returns the shares and the node counters summed over the seeds (trained now, reused from the bank).
    """
    shares, counters = [], {"nodes_trained": 0, "nodes_reused": 0}
    for seed in range(recipe.seed, recipe.seed + seeds):
        seeded = replace(recipe, seed=seed)
        losses, used = node_losses(tree, dataset, seeded, projections=projections, device=device,
                                   node_bank=node_bank, nodes=nodes)  # fmt: skip
        rows = split_sample(dataset, "valid", seeded.valid_tokens, seed, device).labels.size
        shares.append((node_result_halves(losses) if halves else node_results(losses)) / rows)
        counters = {k: counters[k] + int(used[k]) for k in counters}
    return np.mean(shares, axis=0), counters


_BANKS: dict[tuple, NodeBank] = {}


def open_node_bank(
    dataset: FeatureDataset, recipe: NodeRecipe, device: torch.device, root: Path | None = None
) -> NodeBank:
    """The (process-wide) bank of ``dataset`` and ``recipe`` on this device class."""
    root = Path(root) if root is not None else cache_root() / "nodes"
    key = (dataset.key, recipe, device.type, str(root), node_train.training_code_identity())
    if key not in _BANKS:
        _BANKS[key] = NodeBank(dataset, recipe, device.type, root)
    return _BANKS[key]


def training_failure(error: BaseException) -> bool:
    """Whether ``error`` is a genuine training failure (a penalty reward), not a bug (which must raise)."""
    if isinstance(error, (FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def node_losses(
    tree: Tree,
    dataset: FeatureDataset,
    recipe: NodeRecipe,
    *,
    projections: Mapping[int, int] | None = None,
    device: torch.device,
    node_bank: bool = True,
    bank_root: Path | None = None,
    nodes: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """(I, 2M) validation loss sums of every internal node per measurement and half, from the bank or trained now.

    ``nodes`` restricts this to some internal nodes: (len(nodes), 2M) for them alone (a dense
    reward asks for the one node a decision fixed). Returns the losses and counters: nodes
    trained, nodes reused, seconds, useful FLOPs of the training.
    """
    keys = node_keys(tree, projections)
    subset = np.arange(tree.num_internal) if nodes is None else np.asarray(nodes, dtype=np.int64)
    keys = keys[subset]
    started = time.perf_counter()
    if node_bank:
        bank = open_node_bank(dataset, recipe, device, bank_root)
        record = bank.lookup(keys)
        found, losses = record.found, record.losses
    else:
        found, losses = (
            np.zeros(subset.size, dtype=bool),
            np.zeros((subset.size, 2 * recipe.measure_steps.size)),
        )
    missing = np.flatnonzero(~found)
    flops = 0.0
    if missing.size:
        outcome = train_nodes(
            tree, subset[missing], dataset, recipe, projections=projections, device=device, keys=keys[missing]
        )
        losses[missing] = outcome.losses
        flops = outcome.flops
        if node_bank:
            bank.store(outcome)
    counters = {"nodes_trained": int(missing.size), "nodes_reused": int(found.sum()),
                "node_seconds": time.perf_counter() - started, "flops": flops}  # fmt: skip
    return losses, counters


def evaluate(
    tree: Tree,
    dataset: FeatureDataset,
    config: NodeRecipe = NodeRecipe(),
    *,
    seeds: int | Sequence[int] = 1,
    device: torch.device | str | None = None,
    top_k_samples: int = 0,
    node_bank: bool = True,
    callbacks: Sequence[Callback] = (),
    projections: Mapping[int, int] | None = None,
    bank_root: Path | None = None,
) -> Result:
    """The validation loss and cost of a head on ``tree``, assembled from its nodes' results.

    Args:
        tree: the tree over the dataset's classes.
        dataset: frozen features (see `tree_search.data.prepare_dataset`).
        config: the node recipe; ``config.seed`` is the first seed.
        seeds: how many seeds (``config.seed, config.seed + 1, ...``) or which seeds;
            the result is their mean with its standard error.
        device: default CUDA when available.
        top_k_samples: validation rows (a seeded random sample) on which top-1/top-5
            accuracy are measured; 0 (the default of searches) skips it.
        node_bank: read and extend the node bank (else every node is trained).
        callbacks: see each measurement of the first seed (the tree's NLL after each
            of its nodes' measurement points); one returning True stops there, and the
            result is that partial (pruned) measurement.
        projections: optional ``{internal node: projected dim}`` (adaptive tail clusters).
        bank_root: the bank's folder (default under the cache folder).

    Returns:
        A `Result`; ``error`` says why when training failed (non-finite loss, out of
        memory). Other exceptions propagate: they are bugs, not properties of the tree.
    """
    if tree.num_classes != dataset.num_classes:
        raise ValueError(f"the tree has {tree.num_classes} classes, the dataset {dataset.num_classes}")
    seed_list = tuple(range(config.seed, config.seed + seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not seed_list:
        raise ValueError(f"evaluate needs at least one seed, got seeds={seeds!r}")
    device = torch.device(device) if device is not None else default_device()
    counts = dataset.class_weights
    projections = {int(node): int(size) for node, size in (projections or {}).items()}
    cost = head_cost(tree, counts, dataset.dim, projections)
    ratio = cost / full_softmax_cost(dataset)
    started = time.perf_counter()
    per_seed, history, error, pruned = [], [], None, False
    counters = {"nodes_trained": 0, "nodes_reused": 0, "node_seconds": 0.0, "flops": 0.0}
    steps = [int(s) for s in config.measure_steps]
    try:
        for index, seed in enumerate(seed_list):
            recipe = replace(config, seed=seed)
            losses, used = node_losses(tree, dataset, recipe, projections=projections, device=device,
                                       node_bank=node_bank, bank_root=bank_root)  # fmt: skip
            counters = {k: counters[k] + used[k] for k in counters}
            rows = split_sample(dataset, "valid", recipe.valid_tokens, seed, device).labels.size
            curve = measurement_totals(losses).sum(0) / rows  # the tree's NLL at each measurement point
            best = float(node_results(losses).sum() / rows)  # each node's cross-fitted result
            if index == 0:
                history = [
                    [step, step / config.steps, float(v), math.nan, 0.0] for step, v in zip(steps, curve, strict=True)
                ]
                for j, point in enumerate(history):
                    if any([bool(callback(EvalPoint(*point))) for callback in callbacks]):
                        best, pruned = float(min(curve[: j + 1])), j + 1 < len(history)
                        break
            per_seed.append(best)
            if pruned:
                break
    except Exception as err:  # noqa: BLE001 - only genuine training failures become a result
        if not training_failure(err):
            raise
        error = f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - started
    top1 = top5 = math.nan
    if error is None and top_k_samples and not pruned:
        top1, top5 = top_k_accuracy(tree, dataset, config, top_k_samples, projections=projections, device=device,
                                    node_bank=node_bank, bank_root=bank_root)  # fmt: skip
    if error is None:
        mean = float(np.mean(per_seed))
        stderr = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else 0.0
    else:
        mean, stderr = math.inf, math.inf
    return Result(
        tree_hash=tree.canonical_hash,
        valid_nll=mean,
        valid_nll_stderr=stderr,
        perplexity=math.exp(mean) if mean < 700 else math.inf,
        top1=top1,
        top5=top5,
        expected_cost=cost,
        cost_ratio=ratio,
        train_seconds=seconds,
        steps=config.steps,
        device=str(device),
        seeds=seed_list,
        per_seed_nll=tuple(per_seed),
        error=error,
        cached=counters["nodes_trained"] == 0 and error is None,
        extra={"history": history, **counters, **({"pruned": True} if pruned else {})},
    )


def node_weights(
    tree: Tree,
    dataset: FeatureDataset,
    recipe: NodeRecipe = NodeRecipe(),
    *,
    projections: Mapping[int, int] | None = None,
    device: torch.device | str | None = None,
    node_bank: bool = True,
    bank_root: Path | None = None,
    bias_free_nodes: Collection[int] | None = None,
) -> dict[int, tuple[np.ndarray, ...]]:
    """``{node: (W (fanout, d'), b (fanout,)[, P (d', d)])}``: every internal node's weights at its best measurement.

    Rows follow the tree's own child order. Nodes whose weights the node bank holds are not
    trained again; the others are trained now (same numbers as in `evaluate`: the recipe
    decides them) and stored with their weights. ``bias_free_nodes`` are trained without
    biases (their ``b`` is zero; see `train_nodes`).
    """
    device = torch.device(device) if device is not None else default_device()
    keys = node_keys(tree, projections, bias_free_nodes)
    # The bank stores each node's rows (one per child) in a canonical child order, since the same node
    # may list its children in another order in another tree: sorted by the children's class-set hashes.
    hashes = child_set_hashes(tree)
    owner = np.repeat(np.arange(tree.num_internal), tree.fanout)
    canonical = np.lexsort((hashes[:, 1], hashes[:, 0], owner)) - tree.child_ptr[owner]  # tree slot of each rank
    bank = open_node_bank(dataset, recipe, device, bank_root) if node_bank else None
    weights = {}
    for node, value in (bank.weights(keys) if bank is not None else {}).items():
        order = np.argsort(canonical[tree.child_ptr[node] : tree.child_ptr[node + 1]])  # canonical rank of each slot
        weights[node] = (value[0][order], value[1][order], *value[2:])
    missing = np.array([n for n in range(tree.num_internal) if n not in weights], dtype=np.int64)
    if missing.size:
        outcome = train_nodes(tree, missing, dataset, recipe, projections=projections, device=device,
                              keep_weights=True, keys=keys[missing], bias_free_nodes=bias_free_nodes)  # fmt: skip
        for row, value in outcome.weights.items():
            node = int(missing[row])
            weights[node] = value
            order = canonical[tree.child_ptr[node] : tree.child_ptr[node + 1]]
            outcome.weights[row] = (value[0][order], value[1][order], *value[2:])
        if bank is not None:
            bank.store(outcome)
    return weights


def trained_head(
    tree: Tree,
    dataset: FeatureDataset,
    recipe: NodeRecipe = NodeRecipe(),
    *,
    projections: Mapping[int, int] | None = None,
    device: torch.device | str | None = None,
    node_bank: bool = True,
    bank_root: Path | None = None,
    bias_free_nodes: Collection[int] | None = None,
) -> TreeSoftmaxHead:
    """A `TreeSoftmaxHead` holding every node's weights at its best measurement under ``recipe`` (`node_weights`).

    ``bias_free_nodes`` are trained without biases and are bias-free in the head
    (``interop.adaptive_tail_nodes(tree)`` makes a head `interop.to_torch_adaptive` exports).
    """
    device = torch.device(device) if device is not None else default_device()
    weights = node_weights(tree, dataset, recipe, projections=projections, device=device, node_bank=node_bank,
                           bank_root=bank_root, bias_free_nodes=bias_free_nodes)  # fmt: skip
    head = TreeSoftmaxHead(tree, dataset.dim, projections=projections, bias_free_nodes=bias_free_nodes)
    for node, value in weights.items():  # once per node, when a head is built; never on the reward's path
        head.set_node_parameters(node, *[torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in value])
    return head.to(device)


def top_k_accuracy(
    tree: Tree,
    dataset: FeatureDataset,
    recipe: NodeRecipe,
    samples: int,
    *,
    projections: Mapping[int, int] | None = None,
    device: torch.device,
    node_bank: bool = True,
    bank_root: Path | None = None,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy on a seeded random sample of ``samples`` validation rows."""
    head = trained_head(tree, dataset, recipe, projections=projections, device=device, node_bank=node_bank,
                        bank_root=bank_root)  # fmt: skip
    sample = split_sample(dataset, "valid", samples, recipe.seed + 7, device)
    return _top_k_accuracy(head, sample.features.float(), torch.from_numpy(sample.labels).to(device))


def score_test(
    tree: Tree,
    dataset: FeatureDataset,
    config: NodeRecipe = NodeRecipe(),
    *,
    device: torch.device | str | None = None,
    projections: Mapping[int, int] | None = None,
    bias_free_nodes: Collection[int] | None = None,
) -> dict[str, Any]:
    """Final-report scoring: train every node with ``config`` (pass a final seed, see `FINAL_SEED_OFFSET`), score test.

    The nodes keep their best validation measurement; the test NLL is measured on the
    whole test split. Searches select on validation and never call this. Returns
    ``valid_nll``, ``test_nll``, ``test_perplexity`` and ``test_row_nll``: (N,) float64, the
    NLL of each test row in the split's order (its mean is ``test_nll``).
    """
    device = torch.device(device) if device is not None else default_device()
    outcome = train_nodes(tree, np.arange(tree.num_internal), dataset, config, projections=projections, device=device,
                          score_split="test", bias_free_nodes=bias_free_nodes)  # fmt: skip
    rows = split_sample(dataset, "valid", config.valid_tokens, config.seed, device).labels.size
    test_rows = split_sample(dataset, "test", None, config.seed, device).labels.size
    test_nll = float(outcome.split_losses.sum() / test_rows)
    return {"valid_nll": float(outcome.best.sum() / rows), "test_nll": test_nll, "test_perplexity": math.exp(test_nll),
            "test_row_nll": outcome.split_row_losses}  # fmt: skip
