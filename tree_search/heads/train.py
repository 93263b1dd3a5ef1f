"""Training a head on cached features: `fit`, its `TrainConfig`, and per-evaluation callbacks.

The recipe (chosen to be fair to every tree shape, see the README's heads section):
Adam for dense parameters and SparseAdam for the packed nodes' sparse gradients (Adam's
per-parameter step sizes make one learning rate work across fanouts and depths), a short
linear warm-up then cosine decay to zero, minibatches drawn by a seeded permutation,
validation NLL measured on a fixed validation subset a few times per epoch, and early
stopping when it stops improving; the best validation NLL seen is the result.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tree_search.data.features import FeatureDataset, default_device

__all__ = ["EvalPoint", "FitResult", "TrainConfig", "device_split", "fit", "validation_nll"]


@dataclass(frozen=True)
class TrainConfig:
    """How a head is trained on cached features (the reward's budget)."""

    epochs: float = 0.5  # passes over the train split (fractions allowed)
    batch_size: int = 1024  # samples per step
    lr: float = 0.01  # peak learning rate of Adam / SparseAdam
    warmup_fraction: float = 0.05  # share of steps with a linear warm-up
    evals_per_epoch: int = 4  # validation measurements per epoch (at least one at the end)
    patience: int = 2  # stop after this many measurements without improvement
    max_train_samples: int | None = None  # use only the first N train rows (None: all)
    max_valid_samples: int | None = 50_000  # validation rows used for the reward (None: all)
    sparse: bool = True  # sparse gradients for packed nodes (SparseAdam)
    seed: int = 0  # initialisation and batch order

    def __post_init__(self) -> None:
        if not self.epochs > 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("TrainConfig needs epochs > 0, batch_size >= 1 and lr > 0")
        if self.evals_per_epoch < 1 or self.patience < 1:
            raise ValueError("TrainConfig needs evals_per_epoch >= 1 and patience >= 1")


@dataclass(frozen=True)
class EvalPoint:
    """One validation measurement during training, as passed to callbacks."""

    step: int
    epoch: float
    valid_nll: float
    train_loss: float
    seconds: float


@dataclass(frozen=True)
class FitResult:
    """What `fit` returns."""

    best_valid_nll: float
    steps: int
    seconds: float
    device: str
    stopped_early: bool  # by early stopping or by a callback
    stopped_by_callback: bool
    history: list[EvalPoint] = field(default_factory=list)


# A callback sees each measurement; returning True stops training (e.g. an Optuna pruner).
Callback = Callable[[EvalPoint], "bool | None"]

_DEVICE_CACHE: OrderedDict[tuple[str, str, str, int | None], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def device_split(
    dataset: FeatureDataset, split: str, device: torch.device, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and labels (int64) of a split on ``device``, moved there once and reused."""
    key = (dataset.key, split, str(device), limit)
    if key in _DEVICE_CACHE:
        _DEVICE_CACHE.move_to_end(key)
        return _DEVICE_CACHE[key]
    features = np.array(dataset.features[split][:limit])  # a writable copy of the (memory-mapped) rows
    labels = np.asarray(dataset.labels[split][:limit])
    pair = (
        torch.from_numpy(features).to(device=device, dtype=torch.float32),
        torch.from_numpy(labels.astype(np.int64)).to(device),
    )
    _DEVICE_CACHE[key] = pair
    while len(_DEVICE_CACHE) > 4:
        _DEVICE_CACHE.popitem(last=False)
    return pair


@torch.no_grad()
def validation_nll(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> float:
    """Mean negative log-likelihood (nats/token) of ``labels`` under ``head``."""
    was_training = head.training
    head.eval()
    total = 0.0
    for start in range(0, labels.shape[0], chunk):
        total -= float(head.log_prob(features[start : start + chunk], labels[start : start + chunk]).sum())
    head.train(was_training)
    return total / max(1, labels.shape[0])


def _optimizers(head: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    sparse = list(getattr(head, "sparse_parameters", list)())
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in head.parameters() if p.requires_grad and id(p) not in sparse_ids]
    optimizers: list[torch.optim.Optimizer] = []
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr))
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    return optimizers


def fit(
    head: nn.Module,
    dataset: FeatureDataset,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``head`` on the train split of ``dataset``; early-stop on validation NLL.

    The head is moved to ``device`` (default: CUDA when available) and left holding the
    weights of its best validation measurement. ``config.seed`` fixes the batch order;
    the head's initialisation is the caller's (`evaluate` seeds it with the same seed).
    Deterministic on the CPU for a seed.

    Raises:
        FloatingPointError: if the training loss or validation NLL becomes NaN/infinite.
    """
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(config.seed)
    head.to(device)
    train_h, train_y = device_split(dataset, "train", device, config.max_train_samples)
    valid_h, valid_y = device_split(dataset, "valid", device, config.max_valid_samples)
    if train_y.shape[0] == 0 or valid_y.shape[0] == 0:
        raise ValueError(f"dataset {dataset.key}: the train and valid splits need rows to train and score a head")
    n = train_y.shape[0]
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    warmup = max(1, round(config.warmup_fraction * total_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    optimizers = _optimizers(head, config.lr)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    best, best_state, since_best, history = math.inf, None, 0, []
    stopped_early, stop, running = False, False, []
    order = torch.randperm(n, generator=generator).to(device)
    head.train()
    for step in range(total_steps):
        position = (step % steps_per_epoch) * config.batch_size
        if step and position == 0:
            order = torch.randperm(n, generator=generator).to(device)
        batch = order[position : position + config.batch_size]
        loss = head(train_h[batch], train_y[batch]).loss
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        running.append(loss.detach())
        if (step + 1) % eval_every and step + 1 != total_steps:
            continue
        train_loss = float(torch.stack(running).mean())
        running = []
        nll = validation_nll(head, valid_h, valid_y)
        if not (math.isfinite(nll) and math.isfinite(train_loss)):
            raise FloatingPointError(f"non-finite loss at step {step + 1} (train {train_loss}, valid {nll})")
        point = EvalPoint(step + 1, (step + 1) / steps_per_epoch, nll, train_loss, time.perf_counter() - started)
        history.append(point)
        if nll < best - 1e-6:
            best, since_best = nll, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            since_best += 1
        stop = any([bool(callback(point)) for callback in callbacks])  # every callback sees every point
        if stop or since_best >= config.patience:
            stopped_early = step + 1 < total_steps
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    seconds = time.perf_counter() - started
    return FitResult(best, history[-1].step, seconds, str(device), stopped_early, stop, history)
