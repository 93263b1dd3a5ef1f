"""Evaluation throughput with 1 and 2 Ray evaluation workers (and in process), side by side.

Each configuration trains heads on the same 8 trees of the built-in corpus with the
default reward budget, from an empty evaluation cache (a fresh cache folder and a fresh
Ray instance per configuration), and reports evaluations per minute and the scaling
ratio against perfectly linear scaling. Each Ray worker holds one CPU and one torch
thread; on a CUDA machine pass --gpus-per-eval to share one GPU between workers. The
clock starts once the actors are up (their start-up, about 2 s, is printed apart).

``--batch 1 4`` times small evaluations (planted data, V=64, one epoch) on one worker,
``--batch-count`` (96) submitted at once, with that many evaluations per actor call.

``--rllib ppo appo --runners 0 2`` times whole searches (split environment, built-in
data, ``--search-budget`` evaluations) on ``max(runners, 1)`` evaluation workers: with 0
the episodes are sampled in the driver, one at a time; with N, N remote env runners
sample N episodes at once.

    python benchmarks/bench_scaling.py [--workers 1 2] [--gpus-per-eval 0.25] [--in-process]
    python benchmarks/bench_scaling.py --workers --batch 1 4
    python benchmarks/bench_scaling.py --workers --rllib ppo appo --runners 0 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from tree_search.agents.baselines import dataset_classics
from tree_search.builders import random_tree
from tree_search.data.planted import PlantedConfig
from tree_search.distributed.ray_evaluator import RayEvaluator, ensure_ray
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.train import TrainConfig
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.search import SearchConfig, run_search

TREES = ("huffman-2", "huffman-3", "huffman-4", "huffman-8", "balanced-2", "balanced-3", "balanced-4", "balanced-8")


def fresh_cache() -> None:
    """An empty evaluation cache (inherited by Ray workers started afterwards); the dataset is already loaded."""
    os.environ["TREE_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="bench-scaling-")


def timed(evaluator, trees) -> tuple[float, int]:
    started = time.perf_counter()
    for tree, projections in trees:
        evaluator.submit(tree, projections, counted=False)
    done = {}
    while len(done) < len(trees):
        done.update(evaluator.collect(wait=True))
    failed = sum(not e.ok for e in done.values())
    return time.perf_counter() - started, failed


def ray_pool(dataset, **kwargs) -> RayEvaluator:
    """A fresh Ray instance and pool, its actors up (the clock starts after this)."""
    ray.shutdown()
    ensure_ray()
    started = time.perf_counter()
    evaluator = RayEvaluator(dataset, **kwargs)
    ray.get([actor.pid.remote() for actor in evaluator.actors])
    print(f"  ({len(evaluator.actors)} actor(s) up in {time.perf_counter() - started:.1f} s)")
    return evaluator


def worker_scaling(dataset, workers_list: list[int], gpus_per_eval: float, in_process: bool) -> None:
    trees = [(c.tree, c.projections) for c in dataset_classics(dataset, TREES).values()]
    rates = {}
    if in_process:
        fresh_cache()
        seconds, failed = timed(LocalEvaluator(dataset), trees)
        rates["in process"] = len(trees) / seconds * 60
        print(f"in process (torch threads {os.cpu_count()}): {rates['in process']:.2f} evaluations/min, "
              f"{failed} failed")  # fmt: skip
    for workers in workers_list:
        fresh_cache()
        evaluator = ray_pool(dataset, workers=workers, gpus_per_eval=gpus_per_eval)
        seconds, failed = timed(evaluator, trees)
        evaluator.close()
        rates[workers] = len(trees) / seconds * 60
        print(f"{workers} Ray worker(s): {rates[workers]:.2f} evaluations/min ({seconds:.0f} s for {len(trees)}), "
              f"{failed} failed")  # fmt: skip
    if 1 in rates:
        for workers in workers_list:
            if workers > 1:
                ratio = rates[workers] / rates[1]
                print(f"{workers} workers vs 1: {ratio:.2f}x ({ratio / workers:.2f} of linear)")


def batching(batches: list[int], count: int) -> None:
    config = TreeEnvConfig(dataset="planted", planted=PlantedConfig(num_classes=64, dim=16, num_train=4000,
                           num_valid=1000, num_test=1000))  # fmt: skip
    dataset = load_env_dataset(config)
    train = TrainConfig(epochs=1, batch_size=512, evals_per_epoch=1)
    rates = {}
    for batch in batches:
        fresh_cache()
        evaluator = ray_pool(dataset, train=train, workers=1, batch=batch)
        trees = [(random_tree(dataset.num_classes, seed=1000 * batch + k, max_arity=4), None) for k in range(count)]
        seconds, failed = timed(evaluator, trees)
        calls = evaluator.stats()["batched_calls"] or count
        evaluator.close()
        rates[batch] = count / seconds * 60  # a batch size given twice keeps its last rate
        print(f"batch {batch}: {rates[batch]:.1f} small evaluations/min ({seconds:.2f} s for {count}, "
              f"{calls} actor calls, {failed} failed)")  # fmt: skip
    if 1 in rates:
        for batch in batches:
            if batch > 1:
                print(f"batch {batch} vs 1: {rates[batch] / rates[1]:.2f}x")


def rllib_search(agent: str, runners: int, budget: int, gpus_per_eval: float) -> float:
    """Evaluations per minute of a whole search with ``runners`` remote env runners (0: in the driver)."""
    fresh_cache()
    ray.shutdown()
    ensure_ray()
    workers = max(1, runners)
    config = SearchConfig(agent=agent, budget=budget, baselines="none", eval_workers=workers, env_runners=runners,
                          gpus_per_eval=gpus_per_eval)  # fmt: skip
    started = time.perf_counter()
    run = run_search(config, tempfile.mkdtemp(prefix="bench-scaling-run-"), log=None)
    seconds = time.perf_counter() - started
    rows = [e for e in run.evaluations() if e.counted]
    busy = sum(e.train_seconds for e in rows)
    rate = len(rows) / seconds * 60
    print(f"{agent}, {runners} env runner(s), {workers} evaluation worker(s): {rate:.2f} evaluations/min "
          f"({len(rows)} in {seconds:.0f} s, RLlib start included; head training {busy:.0f} s, "
          f"{busy / seconds:.2f} trainings running on average)")  # fmt: skip
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray workers to time (none: skip)")
    parser.add_argument("--gpus-per-eval", type=float, default=0.0)
    parser.add_argument("--in-process", action="store_true", help="also time the in-process evaluator")
    parser.add_argument("--batch", type=int, nargs="*", default=[], help="evaluations per actor call to time")
    parser.add_argument("--batch-count", type=int, default=96, help="small evaluations timed per batch size")
    parser.add_argument("--rllib", nargs="*", default=[], choices=["ppo", "appo"], help="RLlib searches to time")
    parser.add_argument("--runners", type=int, nargs="*", default=[0, 2], help="env runners of the RLlib searches")
    parser.add_argument("--search-budget", type=int, default=8, help="evaluations of each RLlib search")
    args = parser.parse_args()
    dataset = load_env_dataset(TreeEnvConfig())  # prepared (or read) once, before the caches are swapped
    if args.workers:
        worker_scaling(dataset, args.workers, args.gpus_per_eval, args.in_process)
    if args.batch:
        batching(args.batch, args.batch_count)
    for agent in args.rllib:
        rates = {
            runners: rllib_search(agent, runners, args.search_budget, args.gpus_per_eval) for runners in args.runners
        }
        for runners, rate in rates.items():
            if runners and 0 in rates:
                print(f"{agent}: {runners} env runners vs sampling in the driver: {rate / rates[0]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
