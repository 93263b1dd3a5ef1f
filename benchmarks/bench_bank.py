"""A TPE search with and without the node bank: evaluations per minute and node trainings saved.

The same search (TPE, split environment, built-in corpus, default reward, no baselines)
runs twice from an empty node bank: once reusing trained nodes (the default), once
training every node of every tree (``node_bank=False``). The reward's numbers are the
same either way, so TPE proposes the same trees; only the time differs.

    python benchmarks/bench_bank.py --budget 100 [--eval-workers 2]

With ``--eval-workers N`` the trees train on N Ray actors (one CPU each) sharing the bank,
N trials at once; the time includes starting Ray.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tree_search.data.cache import cache_root
from tree_search.envs import TreeEnvConfig
from tree_search.search import SearchConfig, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--agent", default="tpe")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bank"))
    parser.add_argument("--eval-workers", type=int, default=0, help="Ray evaluation actors (0: in this process)")
    args = parser.parse_args()
    features = cache_root() / "features"  # prepared once (`tree-search data prepare`); the bank starts empty
    results = {}
    for use_bank in (False, True):
        scratch = Path(tempfile.mkdtemp(prefix="bench-bank-cache-"))
        (scratch / "features").symlink_to(features.resolve(), target_is_directory=True)
        os.environ["TREE_SEARCH_CACHE"] = str(scratch)
        label = "with the bank" if use_bank else "without the bank"
        config = SearchConfig(agent=args.agent, env="split", budget=args.budget, baselines="none",
                              env_config=TreeEnvConfig(), node_bank=use_bank,
                              eval_workers=args.eval_workers)  # fmt: skip
        started = time.perf_counter()
        run = run_search(config, args.out / ("bank" if use_bank else "no-bank"), log=None)
        seconds = time.perf_counter() - started
        rows = [e for e in run.evaluations() if e.counted]
        trained = sum(e.nodes_trained for e in rows)
        reused = sum(e.nodes_reused for e in rows)
        best = min(e.valid_nll for e in rows if e.ok)
        results[use_bank] = (len(rows) / seconds * 60, seconds)
        print(f"{label}: {len(rows)} trees in {seconds:.0f} s = {len(rows) / seconds * 60:.1f} evaluations/min; "
              f"nodes trained {trained:,}, reused {reused:,} ({reused / max(1, trained + reused):.1%} of node "
              f"trainings saved); best valid NLL {best:.4f}", flush=True)  # fmt: skip
    print(f"speed-up from the bank: {results[True][0] / results[False][0]:.2f}x")


if __name__ == "__main__":
    main()
