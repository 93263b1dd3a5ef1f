"""How far the report's full-softmax reference is from a converged full softmax.

The report scores the full softmax as a one-node tree under the final node recipe (the same
budget as every tree). This trains the same head to convergence instead (`heads.train.fit`
on every train row: Adam, cosine schedule, early stopping on validation with patience) and
prints the validation and test NLL along the way, beside the node recipe's, timed side by
side in one run.

    python benchmarks/bench_reference.py --epochs 8 [--dataset FOLDER]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from tree_search.builders import frequency_cutoffs
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.reference import FullSoftmaxHead
from tree_search.heads.reward import FINAL_SEED_OFFSET, score_test
from tree_search.heads.timing import tune_allocator
from tree_search.heads.train import TrainConfig, fit, validation_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    config = TreeEnvConfig(dataset=args.dataset)
    dataset = load_env_dataset(config)
    test_h = torch.from_numpy(np.asarray(dataset.features["test"], dtype=np.float32))
    test_y = torch.from_numpy(np.asarray(dataset.labels["test"], dtype=np.int64))
    started = time.perf_counter()
    recipe = dataclasses.replace(config.train, seed=FINAL_SEED_OFFSET)
    node = score_test(frequency_cutoffs(np.asarray(dataset.counts, dtype=np.float64), []), dataset, recipe)
    node_seconds = time.perf_counter() - started
    print(f"V = {dataset.num_classes:,}, d = {dataset.dim}")
    print(f"node recipe ({recipe.epochs:g} epoch over {recipe.train_tokens:,} tokens): valid {node['valid_nll']:.4f}, "
          f"test {node['test_nll']:.4f}, {node_seconds:.0f} s")  # fmt: skip
    head = FullSoftmaxHead(dataset.num_classes, dataset.dim)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, evals_per_epoch=2,
                        patience=args.patience, max_valid_samples=None, sparse=False,
                        seed=FINAL_SEED_OFFSET)  # fmt: skip

    def show(point) -> bool:
        print(f"  epoch {point.epoch:5.2f}: valid {point.valid_nll:.4f}, train {point.train_loss:.4f}, "
              f"{point.seconds:.0f} s", flush=True)  # fmt: skip
        return False

    result = fit(head, dataset, train, device="cpu", callbacks=[show])
    test = validation_nll(head, test_h, test_y)
    print(f"converged (fit, {args.epochs:g} epochs at most, patience {args.patience}): "
          f"valid {result.best_valid_nll:.4f}, test {test:.4f}, {result.seconds:.0f} s, "
          f"stopped early: {result.stopped_early}")  # fmt: skip
    print(f"the node recipe's reference is {node['test_nll'] - test:+.4f} nats/token on test from the converged one")


if __name__ == "__main__":
    main()
