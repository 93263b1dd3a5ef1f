"""The packed nodes' C kernels against the torch path, interleaved in one process (a paired A/B).

    python benchmarks/bench_pair_kernels.py [--sizes 10000,50000] [--trees huffman-2,...] [--rounds 6]

For each tree: `TreeSoftmaxHead`'s training step (forward + backward, sparse gradients, the
gradient into h, batch 4,096, d = 256, targets from Zipf(1) counts, allocator tuned) timed
with ``TREE_SEARCH_NATIVE`` on and off in alternating order, ``--rounds`` rounds of 3 steps
each; the medians and their ratio. The switch is read at every call, so both sides run the
same head on the same batch in the same process: only the packed nodes' kernels differ
(docs/cost-in-time.md, "The packed nodes' C kernels").
"""

from __future__ import annotations

import argparse
import os
import statistics

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


if __name__ == "__main__":
    main()
