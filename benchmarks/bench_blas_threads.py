"""Torch training interleaved with numpy products, with numpy's BLAS threads as numpy starts them and held to one.

A search alternates numpy work (the grammar's k-means and PCA orderings, costs) with node
training in torch, in one process. After each numpy product OpenBLAS's idle threads spin for a
while on the cores torch's threads train on; `tree_search.reward.blas.one_blas_thread` holds
numpy's BLAS to one thread wherever torch trains. This times, in alternating rounds in one
process, the same torch steps (a `TreeSoftmaxHead` on binary Huffman, forward, backward, SGD)
and the same orderings (balanced k-means of a group, as the grammar splits them):

1. torch steps alone (the reference),
2. interleaved, numpy's BLAS with the threads numpy starts with,
3. interleaved, numpy's BLAS on one thread,

and prints each mode's torch and numpy seconds and their ratios to the reference.

    python benchmarks/bench_blas_threads.py [--rounds 4] [--classes 10000] [--group 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from tree_search.builders import huffman
from tree_search.builders.cluster import order_groups
from tree_search.heads import TreeSoftmaxHead
from tree_search.reward.blas import one_blas_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each mode, alternating")
    parser.add_argument("--classes", type=int, default=10_000, help="the head's classes (V)")
    parser.add_argument("--group", type=int, default=2_000, help="classes of each ordered group")
    parser.add_argument("--steps", type=int, default=10, help="torch steps between two orderings")
    parser.add_argument("--orderings", type=int, default=30, help="orderings per round")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    counts = rng.zipf(1.2, args.classes).astype(np.float64)
    dim = 256
    head = TreeSoftmaxHead(huffman(counts, 2), dim, sparse=True)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    features = torch.randn(4096, dim)
    targets = torch.from_numpy(rng.choice(args.classes, 4096, p=counts / counts.sum()))
    embeddings = rng.standard_normal((args.classes, dim))
    groups = [np.sort(rng.choice(args.classes, args.group, replace=False)) for _ in range(args.orderings)]

    def step() -> None:
        optimizer.zero_grad()
        head(features, targets)[1].backward()
        optimizer.step()

    def round_(numpy_work: bool) -> tuple[float, float]:
        torch_seconds = numpy_seconds = 0.0
        for group in groups:
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch_seconds += time.perf_counter() - started
            if numpy_work:
                started = time.perf_counter()
                order_groups(embeddings, [group], counts, "kmeans", 8, [np.random.default_rng(1)])
                numpy_seconds += time.perf_counter() - started
        return torch_seconds, numpy_seconds

    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    print(f"torch threads {torch.get_num_threads()}, numpy's BLAS threads {blas}; {args.rounds} rounds of "
          f"{args.orderings} x ({args.steps} steps of binary Huffman, V = {args.classes:,}, batch 4,096, d = {dim}; "
          f"balanced 8-means of {args.group:,} classes)\n")  # fmt: skip
    modes = {"torch steps alone": (False, None), "interleaved, BLAS threads as started": (True, None),
             "interleaved, one BLAS thread": (True, 1)}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    round_(True)  # warm-up: compiled kernels, page faults
    for _ in range(args.rounds):
        for mode, (numpy_work, limit) in modes.items():
            with one_blas_thread() if limit == 1 else threadpool_limits(limits=None):
                times[mode].append(round_(numpy_work))
    reference = np.median([t for t, _ in times["torch steps alone"]])
    ordering_reference = np.median([n for _, n in times["interleaved, one BLAS thread"]])
    print("| mode | torch s (median) | / alone | orderings s (median) | / one thread |")
    print("|---|---|---|---|---|")
    for mode, values in times.items():
        torch_s, numpy_s = np.median([t for t, _ in values]), np.median([n for _, n in values])
        ordering = f"{numpy_s:.2f} | {numpy_s / ordering_reference:.2f}" if modes[mode][0] else "- | -"
        print(f"| {mode} | {torch_s:.2f} | {torch_s / reference:.2f} | {ordering} |")


if __name__ == "__main__":
    main()
