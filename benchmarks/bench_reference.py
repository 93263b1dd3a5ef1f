"""How far the report's full-softmax reference is from the converged full softmax.

The report scores the full softmax as a one-node tree under the final node recipe (the same
budget as every tree). `tree_search.reward.converged.train_reference` (``tree-search
reference``) trains the same model to convergence instead (`heads.train.fit` on every train
row: Adam, cosine schedule, early stopping on validation) and caches it for the reports.
This prints both, timed side by side in one run (the converged one is trained again unless
the cache has it: ``--fresh`` points the cache at a new folder).

    python benchmarks/bench_reference.py [--dataset FOLDER] [--fresh]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

from tree_search.builders import frequency_cutoffs
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.timing import tune_allocator
from tree_search.reward.converged import ReferenceRecipe, train_reference
from tree_search.reward.reward import FINAL_SEED_OFFSET, score_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--fresh", action="store_true", help="train the converged reference even when it is cached")
    args = parser.parse_args()
    tune_allocator()
    config = TreeEnvConfig(dataset=args.dataset)
    dataset = load_env_dataset(config)
    started = time.perf_counter()
    recipe = dataclasses.replace(config.train, seed=FINAL_SEED_OFFSET)
    node = score_test(frequency_cutoffs(np.asarray(dataset.counts, dtype=np.float64), []), dataset, recipe)
    node_seconds = time.perf_counter() - started
    print(f"V = {dataset.num_classes:,}, d = {dataset.dim}")
    print(f"node recipe ({recipe.epochs:g} epoch over {recipe.train_tokens:,} tokens): valid {node['valid_nll']:.4f}, "
          f"test {node['test_nll']:.4f}, {node_seconds:.0f} s")  # fmt: skip
    if args.fresh:
        os.environ["TREE_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="tree_search_reference_")
    found = train_reference(dataset, ReferenceRecipe(), log=print)
    print(f"converged ({ReferenceRecipe()}): valid {found.valid_nll:.4f}, test {found.test_nll:.4f}, "
          f"best at epoch {found.epochs:.2f}, {found.seconds:.0f} s, stopped early: {found.stopped_early}")  # fmt: skip
    print(f"the node recipe's reference is {node['test_nll'] - found.test_nll:+.4f} nats/token on test from the "
          "converged one")  # fmt: skip


if __name__ == "__main__":
    main()
