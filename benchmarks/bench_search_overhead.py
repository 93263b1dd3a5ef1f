"""The search's own work: what a search spends outside node training, and on what, at any V.

Issue 26 asks that a search's own work (start-up, the clustered splits of groups, planning,
writing the run) stay under 10% of its wall time at every V, with the dominant term named.

1. From a finished run (``--run RUN``, searched with node training as usual): the search's
   wall time (its evaluator's clock, to the last result) against its evaluations' seconds
   (node training and the node bank), so the share of its own work, as measured.
2. The same search again (``RUN/config.json``, one process, no final scoring, into ``--out``)
   with node training stood in: each node's loss is a deterministic function of its size,
   fanout and content key, no node is trained and no node bank is read or written. What is
   left is the search's own work, and its wall time is split by kind: each instrumented
   function's exclusive seconds (time in an instrumented function called from another goes to
   the inner one). The stand-in's losses are not the run's, so dp explores other trees than
   the run did: the same kind and amount of work (budget, caps, grammar), not the same trees.

    python benchmarks/bench_search_overhead.py --run runs/main-job [--out runs/bench-overhead]
        [--budget 25] [--caps 1,1.5,2,4]

A run stopped early (or still running) gives the share of what it had done; ``--budget`` and
``--caps`` shorten the second search (its seconds per result are the figure to compare).

The run's dataset is read from the cache the run used: set ``TREE_SEARCH_CACHE`` as it was.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import tree_search.builders.classics
import tree_search.builders.cluster
import tree_search.builders.frequency
import tree_search.cost
import tree_search.reward.reward
import tree_search.split_grammar
from tree_search.reward.evaluator import Evaluator
from tree_search.reward.node_train import NodeOutcome, node_keys
from tree_search.search import SearchConfig, run_search
from tree_search.search.runs import Run

# (owner, attribute, kind): each function's exclusive seconds go to its kind
_INSTRUMENTED = (
    (tree_search.builders.cluster, "order_groups", "k-means and PCA orderings of the grammar's groups"),
    (tree_search.builders.cluster, "_reorder_by_clusters", "k-means and PCA orderings of the clustered classic trees"),
    (tree_search.builders.classics, "classic_trees", "classic trees, the rest of their building"),
    (tree_search.builders.frequency, "huffman", "Huffman trees and subtrees"),
    (tree_search.split_grammar, "group_rng", "seeding each group's generator (from its content)"),
    (tree_search.split_grammar, "partition_groups", "splits other than orderings (cuts, frequency orders)"),
    (tree_search.split_grammar, "split_groups", "the split cache (content hashes, lookups)"),
    (tree_search.split_grammar, "plan_head", "grammar trees assembled from their splits"),
    (tree_search.cost, "node_costs", "node costs"),
    (Evaluator, "evaluate", "evaluations' bookkeeping (keys, results, budget)"),
    (Run, "record", _RECORD := "writing the run (leaderboard, tree files, TensorBoard)"),
    (tree_search.reward.reward, "train_nodes", "node training (the stand-in)"),
)
_OTHER = "the rest (dp's planning, loading, Python)"


class _Clock:
    """Exclusive seconds per kind: a stack of the instrumented calls in progress."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.first_call: dict[str, float] = {}  # kind -> when (perf_counter) it was first called
        self._stack: list[list[float]] = []  # [start, seconds of instrumented calls inside]

    def wrap(self, function, kind: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            frame = [time.perf_counter(), 0.0]
            self.first_call.setdefault(kind, frame[0])
            self._stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = time.perf_counter() - frame[0]
                self.seconds[kind] += elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed

        return timed


def _rebind(original, replacement) -> None:
    """Replace ``original`` wherever a loaded module or class of the package binds it (imports copy names)."""
    for module in [m for name, m in sys.modules.items() if name.startswith("tree_search") and m is not None]:
        for name, value in list(vars(module).items()):
            if value is original:
                setattr(module, name, replacement)


def _stand_in_training(tree, nodes, dataset, recipe, *, projections=None, keys=None, **_):
    """`train_nodes` without training: each node's loss sums from its size, fanout and key, in every measurement."""
    keys = node_keys(tree, projections)[nodes] if keys is None else keys
    nodes = np.asarray(nodes, dtype=np.int64)
    size = tree.subtree_size[nodes].astype(np.float64)
    jitter = 1.0 + 0.1 * (keys[:, 0] % 1000) / 1000.0
    sums = np.log1p(tree.fanout[nodes]) * size * jitter
    count = np.ones(nodes.size, dtype=np.int64)
    losses = np.repeat(sums[:, None], 2 * recipe.measure_steps.size, axis=1)
    return NodeOutcome(keys=keys, losses=losses, tokens=count, train_tokens=count)


class _NoBank:
    """A node bank that holds nothing and keeps nothing: the stand-in's losses never reach a real bank."""

    def __init__(self, dataset, recipe, *_, **__) -> None:
        self._width = 2 * recipe.measure_steps.size

    def lookup(self, keys):
        class Found:
            found = np.zeros(len(keys), dtype=bool)
            losses = np.zeros((len(keys), self._width))

        return Found

    def store(self, outcome) -> None:
        pass


def measured_share(run: Path) -> dict[str, float]:
    """The run's search wall time (its evaluator's clock at its last result) and its evaluations' seconds."""
    rows = [json.loads(line) for line in (run / "leaderboard.jsonl").read_text().splitlines() if line.strip()]
    sessions = json.loads((run / "evaluator.json").read_text())["sessions"]
    if len(sessions) != 1:
        raise SystemExit(f"{run}: searched in {len(sessions)} sessions (resumed); its clock restarted: measure a "
                         "run searched in one go")  # fmt: skip
    wall, evaluating = max(r["wall_seconds"] for r in rows), sessions[0]["worker_seconds"]
    return {"wall": wall, "evaluating": evaluating, "own": wall - evaluating, "evaluations": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run (its config is searched again)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-overhead"))
    parser.add_argument("--budget", type=int, default=None, help="evaluations per cap (default: the run's)")
    parser.add_argument("--caps", default=None, help="comma-separated cost caps (default: the run's)")
    args = parser.parse_args()

    share = measured_share(args.run)
    print(f"{args.run}: {share['evaluations']} results in {share['wall']:.1f} s of search wall time, "
          f"{share['evaluating']:.1f} s evaluating (node training, node bank): its own work "
          f"{share['own']:.1f} s, {share['own'] / share['wall']:.1%}")  # fmt: skip

    data = json.loads((args.run / "config.json").read_text())
    data.update(eval_workers=0, ray_address=None)  # one process: the stand-in replaces training here only
    if args.budget is not None:
        data["budget"] = args.budget
    if args.caps is not None:
        data["cost_caps"] = [float(cap) for cap in args.caps.split(",")]
    config = SearchConfig.from_json(data)
    clock = _Clock()
    for owner, name, kind in _INSTRUMENTED:
        original = getattr(owner, name)
        timed = clock.wrap(_stand_in_training if name == "train_nodes" else original, kind)
        _rebind(original, timed)
        setattr(owner, name, timed)
    _rebind(tree_search.reward.reward.open_node_bank, _NoBank)
    shutil.rmtree(args.out, ignore_errors=True)
    started = time.perf_counter()
    run_search(config, args.out, log=None)
    wall = time.perf_counter() - started
    seconds = dict(clock.seconds)
    seconds[_OTHER] = wall - sum(seconds.values())
    evaluations = sum(1 for line in (args.out / "leaderboard.jsonl").read_text().splitlines() if line.strip())
    start_up = clock.first_call[_RECORD] - started
    print(f"\nThe same search with node training stood in: {wall:.1f} s for {evaluations} results "
          f"({(wall - start_up) / max(evaluations, 1):.2f} s each after a start-up of {start_up:.1f} s "
          "to the first result)\n")  # fmt: skip
    print("| own work, by kind | seconds | share |")
    print("|---|---|---|")
    for kind, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {kind} | {value:.1f} | {value / wall:.0%} |")
    dominant = max(seconds, key=seconds.get)
    print(f"\ndominant: {dominant} ({seconds[dominant] / wall:.0%} of the search's own work)")


if __name__ == "__main__":
    main()
