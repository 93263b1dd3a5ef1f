"""Time the tree builders for V = 10^4, 10^5, 10^6 (Zipf(1.1) counts, seeded).

Reference: a textbook heap-based binary Huffman (``heapq``, merges only, no tree object),
timed in the same run, so the ratio says what the vectorized construction buys.

    python benchmarks/bench_builders.py [--sizes 10000,100000,1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import heapq
import time

import numpy as np

from tree_search import builders


def heapq_huffman_merges(counts: np.ndarray) -> list[tuple[int, int]]:
    """The reference: textbook binary Huffman with a binary heap; returns the merges."""
    heap = [(float(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    merges, next_id = [], len(counts)
    while len(heap) > 1:
        (wa, a), (wb, b) = heapq.heappop(heap), heapq.heappop(heap)
        merges.append((a, b))
        heapq.heappush(heap, (wa + wb, next_id))
        next_id += 1
    return merges


def builder_cases(counts: np.ndarray) -> dict[str, object]:
    """What is timed, by name."""
    V = counts.size
    return {
        "huffman binary (validated Tree)": lambda: builders.huffman(counts, 2),
        "huffman 4-ary": lambda: builders.huffman(counts, 4),
        "huffman 16-ary": lambda: builders.huffman(counts, 16),
        "balanced binary": lambda: builders.balanced(V, 2),
        "balanced 16-ary": lambda: builders.balanced(V, 16),
        "frequency cutoffs (90%/99% mass)": lambda: builders.frequency_cutoffs(
            counts, builders.cutoffs_by_mass(counts)
        ),
        "huffman binary + canonical hash": lambda: builders.huffman(counts).canonical_hash,
        "huffman binary + padded paths": lambda: builders.huffman(counts).paths(),
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'V':>9} {'what':<34} {'seconds':>9} {'vs heapq ref':>13}")
    for V in (int(s) for s in args.sizes.split(",")):
        counts = np.random.default_rng(0).zipf(1.1, size=V).astype(np.float64)
        repeats = args.repeats if V < 1_000_000 else max(1, args.repeats - 1)
        reference = best_time(lambda c=counts: heapq_huffman_merges(c), repeats)
        tree = builders.huffman(counts)
        cases = builder_cases(counts)
        print(f"{V:>9,} {'reference: heapq huffman merges':<34} {reference:>9.3f} {'1.00x':>13}")
        for name, fn in cases.items():
            seconds = best_time(fn, repeats)
            print(f"{V:>9,} {name:<34} {seconds:>9.3f} {reference / seconds:>12.2f}x")
        balanced_depth = builders.balanced(V, 2).expected_path_length(counts)
        print(
            f"{'':>9} huffman binary: max depth {tree.max_depth}, expected depth "
            f"{tree.expected_path_length(counts):.3f} (balanced: {balanced_depth:.3f})"
        )


if __name__ == "__main__":
    main()
