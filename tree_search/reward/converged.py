"""The converged full softmax: the reference a report measures gaps against, trained once per dataset and cached.

The report's own full softmax is a one-node tree trained by the final recipe, the same
budget as every tree, so it is undertrained (on the built-in data it is worse than the
adaptive shapes). This one is `FullSoftmaxHead` trained by `heads.train.fit` on every train
row until validation stops improving (`ReferenceRecipe`). It does not depend on any tree,
so it is trained once per dataset (``tree-search reference``) and kept in the cache, keyed
by the dataset, the recipe, the device type and the source of the code that trains it; a
report uses it when it is there and says so when it is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tree_search.data.cache import cache_root, content_key, publish_folder, read_info, source_identity
from tree_search.data.features import FeatureDataset, default_device
from tree_search.heads.reference import FullSoftmaxHead
from tree_search.heads.train import TrainConfig, fit
from tree_search.reward.reward import FINAL_SEED_OFFSET

__all__ = ["ConvergedReference", "ReferenceRecipe", "cached_reference", "train_reference"]

_SOURCES = ("tree_search.reward.converged", "tree_search.heads.reference", "tree_search.heads.train")


@dataclass(frozen=True)
class ReferenceRecipe:
    """How the converged full softmax is trained: Adam over a whole cosine schedule, the best of its measurements.

    The learning rate decays to zero over the schedule, so its end is the converged model; the
    weights kept are those of the best validation measurement (on every validation row).
    Early stopping only ends a run that has stopped improving for three whole epochs: stopped
    sooner, while the rate is still high, it would keep an undertrained model.
    """

    epochs: float = 6.0  # passes over every train row ...
    min_steps: int = 3000  # ... or this many steps, when more (a small train split needs many passes to converge)
    batch_size: int = 1024
    lr: float = 3e-3
    evals_per_epoch: int = 2
    patience: int = 6  # measurements without improvement before stopping (three epochs)
    seed: int = FINAL_SEED_OFFSET  # a seed no search trains with

    def train_config(self, train_rows: int) -> TrainConfig:
        """The `TrainConfig` of `fit` on a train split of ``train_rows`` rows."""
        epochs = max(self.epochs, self.min_steps * self.batch_size / max(1, train_rows))
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr,
                           evals_per_epoch=self.evals_per_epoch, patience=self.patience, max_valid_samples=None,
                           sparse=False, seed=self.seed)  # fmt: skip


@dataclass(frozen=True)
class ConvergedReference:
    """The converged full softmax's scores: validation and test NLL, and each test row's NLL (for the bootstrap)."""

    valid_nll: float
    test_nll: float
    test_row_nll: np.ndarray  # (N,) float64, the test split's rows in order
    epochs: float  # passes over the train split until the best validation measurement
    stopped_early: bool
    seconds: float


def _folder(dataset: FeatureDataset, recipe: ReferenceRecipe, device_type: str) -> Path:
    key = content_key({"reference": "full-softmax/1", "dataset": dataset.key, "recipe": dataclasses.asdict(recipe),
                       "device_type": device_type, "code": source_identity(_SOURCES)})  # fmt: skip
    return cache_root() / "references" / key


def cached_reference(
    dataset: FeatureDataset, recipe: ReferenceRecipe = ReferenceRecipe(), device_type: str | None = None
) -> ConvergedReference | None:
    """The converged reference of ``dataset`` from the cache, or None when it was never trained (nothing is trained)."""
    folder = _folder(dataset, recipe, device_type or default_device().type)
    info = read_info(folder)
    if info is None:
        return None
    rows = np.load(folder / "test_row_nll.npy", allow_pickle=False)
    return ConvergedReference(info["valid_nll"], info["test_nll"], rows, info["epochs"], info["stopped_early"],
                              info["seconds"])  # fmt: skip


def train_reference(
    dataset: FeatureDataset,
    recipe: ReferenceRecipe = ReferenceRecipe(),
    *,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> ConvergedReference:
    """Train the converged full softmax of ``dataset`` (or return the cached one) and cache its scores."""
    device = torch.device(device) if device is not None else default_device()
    found = cached_reference(dataset, recipe, device.type)
    if found is not None:
        return found
    started = time.perf_counter()
    config = recipe.train_config(int(dataset.labels["train"].shape[0]))
    torch.manual_seed(recipe.seed)
    head = FullSoftmaxHead(dataset.num_classes, dataset.dim)
    total = math.ceil(config.epochs * recipe.evals_per_epoch)

    def show(point) -> bool:
        if log:
            elapsed = time.perf_counter() - started
            done = point.epoch * recipe.evals_per_epoch
            log(f"reference: epoch {point.epoch:.2f}/{config.epochs:g}, valid NLL {point.valid_nll:.4f} "
                f"({elapsed:.0f} s, at most {elapsed / max(done, 1e-9) * (total - done):.0f} s left)")  # fmt: skip
        return False

    result = fit(head, dataset, config, device=device, callbacks=[show])
    test_h = torch.from_numpy(np.asarray(dataset.features["test"], dtype=np.float32)).to(device)
    test_y = torch.from_numpy(np.asarray(dataset.labels["test"], dtype=np.int64)).to(device)
    with torch.no_grad():
        rows = np.concatenate([-head.log_prob(test_h[lo : lo + 8192], test_y[lo : lo + 8192]).double().cpu().numpy()
                               for lo in range(0, test_y.shape[0], 8192)])  # fmt: skip
    test_nll = float(rows.mean())
    best = min(result.history, key=lambda point: point.valid_nll)
    reference = ConvergedReference(result.best_valid_nll, test_nll, rows, float(best.epoch),
                                   bool(result.stopped_early), time.perf_counter() - started)  # fmt: skip
    folder = _folder(dataset, recipe, device.type)
    with publish_folder(folder) as staging:
        np.save(staging / "test_row_nll.npy", rows, allow_pickle=False)
        info = {"valid_nll": reference.valid_nll, "test_nll": test_nll, "epochs": reference.epochs,
                "stopped_early": reference.stopped_early, "seconds": round(reference.seconds, 1),
                "dataset": dataset.key, "recipe": dataclasses.asdict(recipe), "device_type": device.type}  # fmt: skip
        (staging / "info.json").write_text(json.dumps(info, indent=1))
    return reference
