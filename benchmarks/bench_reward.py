"""Reward benchmark: evaluations per minute, rank fidelity, FLOP rate and memory of the node-exact reward.

On the built-in corpus, for classic trees and trees from random episodes of the split
environment (the shapes a search proposes), every node new (an empty node bank):

- seconds per evaluation at the default recipe (`NodeRecipe()`), hence evaluations/min;
- the validation NLL at the default recipe and at the full budget (3 epochs over all
  train positions, 256 steps of up to 16,384 tokens per node), and the Spearman rank
  correlation between the two orders;
- with ``--fp32``: the default recipe with float32 products (``precision="fp32"``) timed side
  by side, where the default resolves to bfloat16 (`training_dtype`);
- with ``--old``: the previous reward (a whole `TreeSoftmaxHead` trained with `fit` at
  `TrainConfig()`, 0.5 epoch) timed side by side and scored on the same validation sample;
- useful GFLOP/s of the default reward's matmuls against a plain float32 matmul and a
  batched skinny matmul of the reward's typical shape, timed in the same run;
- the same trees again with the bank filled (what a search pays for a known node);
- the process's peak RSS;
- with ``--evaluators 1,2,4``: that many evaluator processes sharing the device (one GPU, or the
  CPU cores), each evaluating every tree into its own empty bank; the aggregate evaluations/min.

    python benchmarks/bench_reward.py [--old] [--fp32] [--device cuda] [--evaluators 1,2,4] [--no-full]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import tree_search.envs  # noqa: F401 - registers the environments
from tree_search.builders import classic_trees
from tree_search.data import prepare_dataset
from tree_search.data.features import class_embeddings
from tree_search.envs import SearchStopped, TreeEnvConfig
from tree_search.heads import TrainConfig, TreeSoftmaxHead, fit, validation_nll
from tree_search.reward import NodeRecipe, evaluate
from tree_search.reward.node_train import split_sample, training_dtype

CLASSIC = ("huffman-2", "huffman-3", "huffman-4", "huffman-8", "huffman-16", "balanced-2", "balanced-16", "pca-2",
           "kmeans-2", "kmeans-4", "kmeans-16", "two-level", "random", "adaptive", "cutoffs")  # fmt: skip
FULL = NodeRecipe(train_tokens=None, epochs=3, steps=256, batch_size=16384, precision="fp32")


def searched_shapes(count: int) -> dict:
    """Trees of random legal episodes of the split environment (their reward is not computed)."""

    def no_reward(tree, projections=None):
        raise SearchStopped("shapes only")  # the episode ends truncated; the tree is kept in `last_tree`

    env = gym.make("TreeSearch/Split-v1", config=TreeEnvConfig(cost_mode="tradeoff", cost_weight=0.0),
                   reward_fn=no_reward)  # fmt: skip
    trees = {}
    for seed in range(count):
        _, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        done = truncated = False
        while not (done or truncated):
            _, _, done, truncated, info = env.step(env.action_space.sample(mask=info["action_mask"]))
        trees[f"split-episode-{seed}"] = (env.unwrapped.last_tree, {})
    return trees


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731 - no ties in these losses
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def matmul_rates(device: torch.device) -> dict[str, float]:
    """GFLOP/s of a plain matmul (float32 and bfloat16) and of a batched skinny one (the reward's binary nodes)."""
    out = {}
    for name, (a, b) in {
        "plain matmul 4096x256 @ 256x2048": (torch.randn(4096, 256), torch.randn(256, 2048)),
        "plain bfloat16 matmul 4096x256 @ 256x2048": (
            torch.randn(4096, 256).bfloat16(),
            torch.randn(256, 2048).bfloat16(),
        ),
        "batched 64 x (1024x256 @ 256x2)": (torch.randn(64, 1024, 256), torch.randn(64, 256, 2)),
    }.items():
        a, b = a.to(device), b.to(device)
        product = (lambda: a @ b) if a.dim() == 2 else (lambda: torch.bmm(a, b))  # noqa: B023
        product()
        started, repeats = time.perf_counter(), 20
        for _ in range(repeats):
            product()
        if device.type == "cuda":
            torch.cuda.synchronize()
        flops = 2 * a.numel() * b.shape[-1]
        out[name] = flops * repeats / (time.perf_counter() - started) / 1e9
    return out


def _evaluator_process(trees: dict, device: str, bank: str, threads: int, barrier, results) -> None:
    """One evaluator sharing the device: load the data, wait for the others, evaluate every tree (all nodes new)."""
    torch.set_num_threads(threads)  # the evaluators share the CPU cores too
    dataset = prepare_dataset()
    first = next(iter(trees.values()))
    evaluate(first[0], dataset, NodeRecipe(), device=device, projections=first[1], node_bank=False)  # warm-up
    barrier.wait()
    started = time.time()
    for tree, projections in trees.values():
        evaluate(tree, dataset, NodeRecipe(), device=device, projections=projections, bank_root=Path(bank))
    results.put((started, time.time()))


def evaluator_scaling(trees: dict, device: str, counts: list[int]) -> None:
    """Aggregate evaluations/min of 1, 2, 4, ... evaluator processes sharing ``device``."""
    context = multiprocessing.get_context("spawn")
    base = None
    for n in counts:
        barrier, results = context.Barrier(n), context.Queue()
        threads = max(1, torch.get_num_threads() // n)
        workers = [
            context.Process(
                target=_evaluator_process,
                args=(trees, device, tempfile.mkdtemp(prefix=f"bench-eval{n}-{i}-"), threads, barrier, results),
            )
            for i in range(n)
        ]
        for worker in workers:
            worker.start()
        spans = [results.get() for _ in workers]
        for worker in workers:
            worker.join()
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        rate = 60 * n * len(trees) / wall
        base = base or rate
        print(f"{n} evaluator(s) sharing {device}: {n * len(trees)} evaluations in {wall:.1f} s, "
              f"{rate:.1f} evaluations/min ({rate / base:.2f}x one evaluator)", flush=True)  # fmt: skip


def old_reward(tree, dataset, valid_h, valid_y, device) -> tuple[float, float]:
    """The previous reward: one whole head trained by `fit` (0.5 epoch), scored on the same validation rows."""
    started = time.perf_counter()
    torch.manual_seed(0)
    head = TreeSoftmaxHead(tree, dataset.dim, sparse=True)
    fit(head, dataset, TrainConfig(), device=device)
    return validation_nll(head, valid_h, valid_y), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", action="store_true", help="also time the previous whole-head reward")
    parser.add_argument("--episodes", type=int, default=3, help="trees from random split-environment episodes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluators", help="comma-separated counts of evaluator processes sharing the device")
    parser.add_argument("--no-full", action="store_true", help="skip the full-budget references (and Spearman)")
    parser.add_argument("--fp32", action="store_true", help="also time the default recipe with float32 products")
    args = parser.parse_args()
    device = torch.device(args.device)
    dataset = prepare_dataset()
    classics = classic_trees(dataset.counts, CLASSIC, embeddings=class_embeddings(dataset), dim=dataset.dim)
    trees = {**{k: (c.tree, c.projections) for k, c in classics.items()}, **searched_shapes(args.episodes)}
    default, fp32 = NodeRecipe(), NodeRecipe(precision="fp32")
    print(f"default recipe's products on {device.type}: {training_dtype(default.precision, device)}", flush=True)
    valid = split_sample(dataset, "valid", default.valid_tokens, default.seed, device)
    valid_h, valid_y = valid.features.float(), torch.from_numpy(valid.labels).to(device)
    rates = matmul_rates(device)
    bank = Path(tempfile.mkdtemp(prefix="bench-reward-bank-"))
    evaluate(trees["huffman-4"][0], dataset, default, device=device, node_bank=False)  # samples loaded once
    # Phase 1, what a search pays: every tree at the default recipe, one after the other, every node new.
    rows = []
    for name, (tree, projections) in trees.items():
        fresh = evaluate(tree, dataset, default, device=device, projections=projections, bank_root=bank)
        rows.append({"tree": name, "nodes": tree.num_internal, "default": fresh.valid_nll,
                     "seconds": fresh.train_seconds,
                     "gflops": fresh.extra["flops"] / fresh.extra["node_seconds"] / 1e9})  # fmt: skip
        if args.fp32:
            reference = evaluate(tree, dataset, fp32, device=device, projections=projections, node_bank=False)
            rows[-1].update(fp32=reference.valid_nll, fp32_seconds=reference.train_seconds)
    if args.evaluators:
        evaluator_scaling(trees, args.device, [int(n) for n in args.evaluators.split(",")])
    # Phase 2, the references: the full budget, and the previous reward.
    print(f"{'tree':<18s} {'nodes':>6s} {'default':>8s} {'s':>6s} {'GFLOP/s':>8s} {'full':>8s} {'s':>6s}"
          + (f" {'old':>8s} {'s':>6s}" if args.old else ""))  # fmt: skip
    for row, (name, (tree, projections)) in zip(rows, trees.items(), strict=True):
        if args.no_full:
            full = None
        else:
            full = evaluate(tree, dataset, FULL, device=device, projections=projections, node_bank=False)
        row.update(full=full.valid_nll if full else math.nan, full_seconds=full.train_seconds if full else math.nan)
        if args.old and not projections:
            row["old"], row["old_seconds"] = old_reward(tree, dataset, valid_h, valid_y, device)
        line = (f"{name:<18s} {tree.num_internal:6d} {row['default']:8.4f} {row['seconds']:6.2f} {row['gflops']:8.1f} "
                f"{row['full']:8.4f} {row['full_seconds']:6.1f}")  # fmt: skip
        if "old" in row:
            line += f" {row['old']:8.4f} {row['old_seconds']:6.1f}"
        print(line, flush=True)
    warm = [evaluate(t, dataset, default, device=device, projections=p, bank_root=bank).train_seconds
            for t, p in trees.values()]  # fmt: skip
    seconds = np.array([r["seconds"] for r in rows])
    default_nll, full_nll = np.array([r["default"] for r in rows]), np.array([r["full"] for r in rows])
    print(f"\n{len(rows)} trees, every node new: {seconds.mean():.2f} s per evaluation on average "
          f"({60 / seconds.mean():.1f} evaluations/min; median {np.median(seconds):.2f} s, slowest "
          f"{rows[int(seconds.argmax())]['tree']} {seconds.max():.2f} s)")  # fmt: skip
    cheap = seconds[[r["tree"] not in ("adaptive", "cutoffs") for r in rows]]
    print(f"without the two adaptive shapes (35x and 74x Huffman's cost): {cheap.mean():.2f} s "
          f"({60 / cheap.mean():.1f} evaluations/min)")  # fmt: skip
    print(f"with the bank filled: {np.mean(warm) * 1000:.0f} ms per evaluation")
    if not args.no_full:
        print(f"Spearman (default vs full budget, {len(rows)} trees): {spearman(default_nll, full_nll):.3f}")
    if args.fp32:
        fp32_seconds, fp32_nll = np.array([r["fp32_seconds"] for r in rows]), np.array([r["fp32"] for r in rows])
        print(f"float32 products, timed alternately with the default: {fp32_seconds.mean():.2f} s per evaluation "
              f"({60 / fp32_seconds.mean():.1f}/min); the default is {fp32_seconds.sum() / seconds.sum():.2f}x "
              f"faster; NLL difference default - float32: mean {np.mean(default_nll - fp32_nll):+.4f}, largest "
              f"{np.abs(default_nll - fp32_nll).max():.4f}; "
              f"Spearman between them {spearman(default_nll, fp32_nll):.3f}")  # fmt: skip
        if not args.no_full:
            print(f"Spearman (float32 products vs full budget): {spearman(fp32_nll, full_nll):.3f}")
    with_old = [r for r in rows if "old" in r]
    if with_old:
        old_nll = np.array([r["old"] for r in with_old])
        same = np.array([r["full"] for r in with_old])
        old_seconds = np.mean([r["old_seconds"] for r in with_old])
        new_seconds = np.mean([r["seconds"] for r in with_old])
        print(f"previous reward on the same {len(with_old)} trees: {old_seconds:.2f} s per evaluation "
              f"({60 / old_seconds:.1f}/min), new {new_seconds:.2f} s: {old_seconds / new_seconds:.1f}x faster; "
              f"Spearman of the previous reward vs the full budget: {spearman(old_nll, same):.3f}")  # fmt: skip
    achieved = np.sum([r["gflops"] * r["seconds"] for r in rows]) / seconds.sum()
    for name, rate in rates.items():
        print(f"{name}: {rate:.1f} GFLOP/s; the reward's matmuls achieve {achieved:.1f} ({achieved / rate:.2f}x)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB (dataset samples, all trees, the full-budget runs)")


if __name__ == "__main__":
    main()
