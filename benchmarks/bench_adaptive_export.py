"""What exporting to PyTorch's adaptive softmax costs: tail biases dropped, test NLL with and without them.

`torch.nn.AdaptiveLogSoftmaxWithLoss` has no biases in its tail layers, so a head exported
to it trains its tail nodes bias-free (``trained_head(..., bias_free_nodes=...)``, what a
run's ``best_head_adaptive.pt`` holds). On the built-in corpus, for the adaptive-shape
classic trees, this prints the test NLL of the node-exact final scoring with tail biases
and without them (same recipe, final seeds), and checks that the bias-free head exported
to the real PyTorch module gives the same log-probabilities.

    python benchmarks/bench_adaptive_export.py [--trees adaptive,grave-2,grave-3] [--seeds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from tree_search.builders import classic_trees
from tree_search.data import prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.interop import adaptive_tail_nodes, to_torch_adaptive
from tree_search.reward import NodeRecipe, trained_head
from tree_search.reward.node_train import split_sample
from tree_search.reward.reward import FINAL_SEED_OFFSET, score_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="adaptive,grave-2,grave-3")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    dataset = prepare_dataset()
    names = tuple(args.trees.split(","))
    trees = classic_trees(dataset.counts, names, embeddings=class_embeddings(dataset), dim=dataset.dim)
    valid = split_sample(dataset, "valid", 2048, 0, torch.device("cpu"))
    print(f"V = {dataset.num_classes:,}, d = {dataset.dim}; test NLL (nats/token), {args.seeds} final seeds")
    print(f"{'tree':<10s} {'with tail biases':>17s} {'bias-free tails':>16s} {'difference':>11s}  export check")
    for name, classic in trees.items():
        tails = adaptive_tail_nodes(classic.tree)
        projections = classic.projections or None
        scores = {False: [], True: []}
        for seed in range(args.seeds):
            recipe = dataclasses.replace(NodeRecipe(), seed=FINAL_SEED_OFFSET + seed)
            for free in (False, True):
                result = score_test(classic.tree, dataset, recipe, device="cpu", projections=projections,
                                    bias_free_nodes=tails if free else None)  # fmt: skip
                scores[free].append(result["test_nll"])
        recipe = dataclasses.replace(NodeRecipe(), seed=FINAL_SEED_OFFSET)
        head = trained_head(classic.tree, dataset, recipe, projections=projections, device="cpu",
                            bias_free_nodes=tails).eval()  # fmt: skip
        exported = to_torch_adaptive(head)
        with torch.no_grad():
            gap = exported.module.log_prob(valid.features)[:, exported.permutation] - head.log_probs_all(valid.features)
        with_b, without = statistics.mean(scores[False]), statistics.mean(scores[True])
        print(f"{name:<10s} {with_b:17.4f} {without:16.4f} {without - with_b:+11.4f}  "
              f"max |log p PyTorch - log p head| = {gap.abs().max().item():.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
