"""Is the reward worth optimising? Noise floor, rank fidelity, recipe fairness, throughput.

On the built-in default dataset (prepared if needed):

1. Eight varied trees (Huffman 2/4/16, balanced 2, frequency cutoffs, PCA-split fanout 2,
   k-means fanout 4 and 16 of the class embeddings): valid NLL under the default budget
   and under a full budget; the Spearman correlation between the two orders.
2. Noise floor: the standard deviation over 5 seeds of the default reward for Huffman-2
   and balanced-2, against the gap between them.
3. Recipe fairness: for five shapes, the default recipe's valid NLL against the best of a
   learning-rate sweep under the same budget.
4. Evaluations per minute of `evaluate` with the default budget.

    python benchmarks/bench_reward.py [--full-epochs 3] [--skip-sweep] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from tree_search import builders
from tree_search.data import prepare_dataset
from tree_search.heads import TrainConfig, evaluate


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-epochs", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    dataset = prepare_dataset()
    counts, embeddings = dataset.counts, dataset.class_embeddings
    default = TrainConfig()
    full = dataclasses.replace(default, epochs=args.full_epochs, patience=3)
    classic = builders.classic_trees(counts, arities=(4, 16))
    trees = {
        "huffman-2": classic["huffman-2"][0],
        "huffman-4": classic["huffman-4"][0],
        "huffman-16": classic["huffman-16"][0],
        "balanced-2": classic["balanced-2"][0],
        "cutoffs": classic["cutoffs"][0],
        "pca-2": builders.cluster_tree(embeddings, counts, fanout=2, method="pca"),
        "kmeans-4": builders.cluster_tree(embeddings, counts, fanout=4, method="kmeans"),
        "kmeans-16": builders.cluster_tree(embeddings, counts, fanout=16, method="kmeans"),
    }
    print(f"dataset {dataset.info.get('cache', dataset.key)}; default budget {default}")
    print(f"\n{'tree':<12} {'cost ratio':>10} {'default NLL':>12} {'s':>6} {'full NLL':>9} {'s':>6}")
    short, long, seconds = [], [], []
    for name, tree in trees.items():
        quick = evaluate(tree, dataset, default, device=args.device, use_cache=False)
        slow = evaluate(tree, dataset, full, device=args.device, use_cache=False)
        short.append(quick.valid_nll)
        long.append(slow.valid_nll)
        seconds.append(quick.train_seconds)
        print(f"{name:<12} {quick.cost_ratio:>10.4f} {quick.valid_nll:>12.4f} {quick.train_seconds:>6.1f} "
              f"{slow.valid_nll:>9.4f} {slow.train_seconds:>6.1f}", flush=True)  # fmt: skip
    print(f"Spearman(default, full) over {len(trees)} trees: {spearman(short, long):.3f}")
    print(f"evaluations per minute with the default budget: {60 / np.mean(seconds):.1f} "
          f"(mean {np.mean(seconds):.1f} s per evaluation, device {quick.device})")  # fmt: skip

    print(f"\nnoise floor over {args.seeds} seeds (default budget)")
    spread = {}
    for name in ("huffman-2", "balanced-2"):
        result = evaluate(trees[name], dataset, default, seeds=args.seeds, device=args.device, use_cache=False)
        spread[name] = (result.valid_nll, float(np.std(result.per_seed_nll, ddof=1)))
        print(f"  {name:<12} mean {result.valid_nll:.4f}  std {spread[name][1]:.4f}  "
              f"per seed {[round(x, 4) for x in result.per_seed_nll]}")  # fmt: skip
    gap = abs(spread["huffman-2"][0] - spread["balanced-2"][0])
    worst = max(s for _, s in spread.values())
    print(f"  gap huffman-2 vs balanced-2: {gap:.4f} nats = {gap / worst:.1f}x the larger seed std")

    if args.skip_sweep:
        return
    print("\nrecipe fairness: default lr vs the best of a sweep (same budget)")
    for name in ("huffman-2", "balanced-2", "kmeans-4", "huffman-16", "cutoffs"):
        results = {}
        for lr in (0.003, 0.005, 0.01, 0.02):
            config = dataclasses.replace(default, lr=lr)
            results[lr] = evaluate(trees[name], dataset, config, device=args.device, use_cache=False).valid_nll
        best_lr = min(results, key=results.get)
        print(f"  {name:<12} default (lr {default.lr}) {results.get(default.lr, float('nan')):.4f}  best lr {best_lr} "
              f"{results[best_lr]:.4f}  gap {results.get(default.lr, np.nan) - results[best_lr]:.4f}  "
              f"sweep {[round(v, 4) for v in results.values()]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
