"""The packed nodes' C kernels against the torch path, interleaved in one process (a paired A/B).

    python benchmarks/bench_pair_kernels.py [--sizes 10000,50000] [--trees huffman-2,...] [--rounds 6] [--breakdown]

For each tree: `TreeSoftmaxHead`'s training step (forward + backward, sparse gradients, the
gradient into h, batch 4,096, d = 256, targets from Zipf(1) counts, allocator tuned) timed
with ``TREE_SEARCH_NATIVE`` on and off in alternating order, ``--rounds`` rounds of 3 steps
each; the medians and their ratio. The switch is read at every call, so both sides run the
same head on the same batch in the same process: only the packed nodes' kernels differ
(docs/cost-in-time.md, "The packed nodes' C kernels").

--breakdown also prints, for each tree with the C kernels, the ms per step inside each of the
three kernels (timed around their calls during 10 steps) and the six torch operators with the
most time of their own (`torch.profiler`, 3 steps).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from tree_search import builders
from tree_search.heads import TreeSoftmaxHead, native
from tree_search.heads.timing import synthetic_classes, time_training_step, tune_allocator

TREES = "huffman-2,huffman-8,huffman-32,kmeans-16,headtail-kmeans-16,grave-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--trees", default=TREES)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--breakdown", action="store_true", help="where each step's time goes, with the C kernels")
    args = parser.parse_args()
    tune_allocator()
    if not native.available():
        raise SystemExit("the C kernels did not build here: nothing to compare")
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, d = {args.dim}, sparse gradients; "
          f"median ms of {args.rounds} rounds of 3 steps, torch and C alternating")  # fmt: skip
    for V in (int(v) for v in args.sizes.split(",")):
        counts, embeddings = synthetic_classes(V)
        trees = builders.classic_trees(counts, args.trees.split(","), embeddings=embeddings, dim=args.dim)
        generator = torch.Generator().manual_seed(0)
        y = torch.multinomial(torch.from_numpy(counts / counts.sum()), args.batch, replacement=True,
                              generator=generator)  # fmt: skip
        h = torch.randn(args.batch, args.dim, generator=generator).requires_grad_(True)
        for name, classic in trees.items():
            head = TreeSoftmaxHead(classic.tree, args.dim, projections=classic.projections, sparse=True)
            seconds = {"0": [], "auto": []}
            for r in range(args.rounds):
                for mode in ("0", "auto") if r % 2 == 0 else ("auto", "0"):
                    os.environ[native.NATIVE_ENV] = mode
                    seconds[mode].append(time_training_step(head, h, y, repeats=3))
            os.environ.pop(native.NATIVE_ENV)
            torch_ms, c_ms = (1e3 * statistics.median(seconds[m]) for m in ("0", "auto"))
            print(f"V = {V:>9,}  {name:<20} torch {torch_ms:7.2f} ms   C {c_ms:7.2f} ms   "
                  f"speed-up {torch_ms / c_ms:.2f}x", flush=True)  # fmt: skip
            if args.breakdown:
                breakdown(head, h, y)


def breakdown(head: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor, steps: int = 10) -> None:
    """Print the ms per step spent inside each C kernel, and the torch operators with the most time of their own."""
    spent: dict[str, float] = {}
    originals = {name: getattr(native, name) for name in ("pair_scores", "pair_grad_rows", "pair_grad_nodes")}

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    try:
        for name, function in originals.items():
            setattr(native, name, timed(name, function))
        time_training_step(head, h, y, repeats=1)  # warm-up
        spent.clear()
        step = time_training_step(head, h, y, repeats=steps - 1)
        calls = {name: 1e3 * seconds / steps for name, seconds in spent.items()}
    finally:
        for name, function in originals.items():
            setattr(native, name, function)
    print(f"      a step {1e3 * step:.2f} ms; in the C kernels (ms per step): "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in calls.items()))  # fmt: skip
    with torch.profiler.profile() as profiler:
        for _ in range(3):
            head.zero_grad(set_to_none=True)
            h.grad = None
            head(h, y).loss.backward()
    ops = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    print("      torch operators, ms of their own per step: "
          + ", ".join(f"{e.key} {e.self_cpu_time_total / 3e3:.2f}" for e in ops))  # fmt: skip


if __name__ == "__main__":
    main()
