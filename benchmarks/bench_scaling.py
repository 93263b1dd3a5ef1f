"""Evaluation throughput with 1 and 2 Ray evaluation workers (and in process), side by side.

Each configuration trains heads on the same 8 trees of the built-in corpus with the
default reward budget, from an empty evaluation cache (a fresh cache folder and a fresh
Ray instance per configuration), and reports evaluations per minute and the scaling
ratio against perfectly linear scaling. Each Ray worker holds one CPU and one torch
thread; on a CUDA machine pass --gpus-per-eval to share one GPU between workers.

    python benchmarks/bench_scaling.py [--workers 1 2] [--gpus-per-eval 0.25]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from tree_search.agents.baselines import classic_baselines
from tree_search.data import prepare_dataset
from tree_search.heads.evaluator import LocalEvaluator
from tree_search.heads.ray_evaluator import RayEvaluator, ensure_ray

TREES = ("huffman-2", "huffman-3", "huffman-4", "huffman-8", "balanced-2", "balanced-3", "balanced-4", "balanced-8")


def timed(evaluator, trees) -> tuple[float, int]:
    started = time.perf_counter()
    for tree, projections in trees:
        evaluator.submit(tree, projections, counted=False)
    done = {}
    while len(done) < len(trees):
        done.update(evaluator.collect(wait=True))
    failed = sum(not e.ok for e in done.values())
    return time.perf_counter() - started, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus-per-eval", type=float, default=0.0)
    parser.add_argument("--in-process", action="store_true", help="also time the in-process evaluator")
    args = parser.parse_args()
    dataset = prepare_dataset()
    trees = list(classic_baselines(dataset, TREES).values())
    rates = {}
    if args.in_process:
        os.environ["TREE_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="bench-scaling-")
        seconds, failed = timed(LocalEvaluator(dataset), trees)
        rates["in process"] = len(trees) / seconds * 60
        print(
            f"in process (torch threads {os.cpu_count()}): {rates['in process']:.2f} evaluations/min, {failed} failed"
        )
    for workers in args.workers:
        os.environ["TREE_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="bench-scaling-")  # inherited by the workers
        ray.shutdown()
        ensure_ray()
        evaluator = RayEvaluator(dataset, workers=workers, gpus_per_eval=args.gpus_per_eval)
        seconds, failed = timed(evaluator, trees)
        evaluator.close()
        rates[workers] = len(trees) / seconds * 60
        print(f"{workers} Ray worker(s): {rates[workers]:.2f} evaluations/min ({seconds:.0f} s for {len(trees)}), "
              f"{failed} failed")  # fmt: skip
    if 1 in rates:
        for workers in args.workers:
            if workers > 1:
                ratio = rates[workers] / rates[1]
                print(f"{workers} workers vs 1: {ratio:.2f}x ({ratio / workers:.2f} of linear)")
    ray.shutdown()


if __name__ == "__main__":
    main()
