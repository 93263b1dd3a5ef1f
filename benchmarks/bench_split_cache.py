"""The split cache when full: `SplitCache` (an OrderedDict) against the same cache on a plain dict, side by side.

A search at V = 100k fills the cache's 50M class ids; from then on every new split evicts the
oldest ones. A plain dict finds its oldest entry by scanning past every entry deleted before it,
so evicting k entries in a row costs O(k^2): the search stalled for minutes in that loop (seen
with py-spy in `benchmarks/bench_search_overhead.py`'s search at 100k). The cache is filled with
small splits (50 ids, as a search's deep groups), then takes large ones (100k ids, as its top
splits at 100k), each evicting 2,000 small splits.

    python benchmarks/bench_split_cache.py [--large 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tree_search.split_grammar import SplitCache


class _PlainDictCache(dict):
    """The reference: `SplitCache`'s logic on a plain dict, its oldest entry found by ``next(iter(self))``."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.held = budget, 0

    def __setitem__(self, key, split) -> None:
        if key in self:
            self.held -= SplitCache._size(self[key])
        super().__setitem__(key, split)
        self.held += SplitCache._size(split)
        while self.held > self.budget and len(self) > 1:
            self.held -= SplitCache._size(super().pop(next(iter(self))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=200, help="large splits put into the full cache")
    args = parser.parse_args()
    small = (np.arange(10), [np.arange(40)])
    large = (np.empty(0, np.int64), [np.arange(50_000), np.arange(50_000)])
    seconds = {}
    for cache in (SplitCache(), _PlainDictCache(50_000_000)):
        for i in range(cache.budget // 50):
            cache[i] = small
        started = time.perf_counter()
        for j in range(args.large):
            cache["large", j] = large
            cache["small", j] = small
        name = type(cache).__name__
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {args.large} large splits into a full cache in {seconds[name]:.2f} s ({len(cache):,} held)")
    print(f"plain dict / SplitCache: {seconds['_PlainDictCache'] / seconds['SplitCache']:.0f}x")


if __name__ == "__main__":
    main()
