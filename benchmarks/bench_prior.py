"""Issue 24: the learned policy as dp's prior, and the node trainings it saves dp on instances it never saw.

On each held-out instance of ``bench_policy.py`` (planted ones, and with ``--real`` Python's
documentation, PostgreSQL's manual and the built-in code corpus at V = 10,000) and each cap, dp
searches twice with ``--budget`` evaluations, each with an evaluator of its own: alone (its fixed
order: the widest root rules first, each ranked by one measurement, then the best completed) and
with the policy as its prior (`tree_search.agents.imitation.PolicyPrior`: the policy's order of
root rules, only its first `PRIOR_ROOTS` ranked before completing the best, and its order of
completions). For each it prints the evaluations and the node trainings (distinct nodes of the
trees evaluated so far: what an empty node bank would train) until the search first reaches dp's
own best validation NLL at that budget (within `REACH`, 1e-4 nats), and the best each reaches.
The node bank on disk is shared (the counts do not depend on what it holds).

    python benchmarks/bench_prior.py --budget 25 --real --out runs/bench-prior
    TREE_SEARCH_CACHE=CACHE python benchmarks/bench_prior.py --dataset FOLDER --caps 2 --out runs/bench-prior-100k
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from bench_policy import CAPS, HELD_OUT, REAL_HELD_OUT, _config, _name

from tree_search.agents.dp_search import DPSearcher
from tree_search.agents.imitation import SHIPPED_POLICY, PolicyPrior, load_policy
from tree_search.cost import head_cost
from tree_search.envs import load_env_dataset
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.reward.node_train import node_keys
from tree_search.reward.reward import huffman_cost


def _search(config, dataset, budget: int, prior) -> list[tuple[int, float, int]]:
    """(counted evaluations so far, the tree's NLL or inf over the cap, distinct nodes so far) per evaluation."""
    unit = huffman_cost(dataset)
    limit = config.cost_cap * unit * (1 + 1e-9)
    nodes: set = set()
    trace: list[tuple[int, float, int]] = []
    counted = [0]

    def listen(evaluation, tree) -> None:
        if not evaluation.ok:
            return
        counted[0] += bool(evaluation.counted)
        nodes.update(map(bytes, np.asarray(node_keys(tree, evaluation.projections or None))))
        within = head_cost(tree, dataset.class_weights, dataset.dim, evaluation.projections or None) <= limit
        trace.append((counted[0], evaluation.valid_nll if within else math.inf, len(nodes)))

    evaluator = LocalEvaluator(dataset, config.train, budget=budget, listeners=[listen])
    searcher = DPSearcher(evaluator, dataset, config, prior=prior)
    for _ in searcher.search():
        pass
    return trace


REACH = 1e-4  # "reaches dp's best": within this many nats of it (two trees may differ by 1e-5; seeds by 1e-2)


def _reach(trace: list[tuple[int, float, int]], target: float) -> tuple[int, int] | None:
    """(evaluations, nodes) when the best so far first comes within `REACH` of ``target`` (None: never)."""
    for evaluations, nll, nodes in trace:
        if nll <= target + REACH:
            return evaluations, nodes
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=25, help="evaluations per search")
    parser.add_argument("--policy", type=Path, default=SHIPPED_POLICY)
    parser.add_argument("--real", action="store_true", help="also the real held-out corpora (prepared by name)")
    parser.add_argument("--only-real", action="store_true", help="the real held-out corpora alone")
    parser.add_argument("--caps", default=",".join(f"{c:g}" for c in CAPS))
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="instead of the held-out instances: a prepared dataset (name or feature folder)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-prior"))
    args = parser.parse_args()
    instances = [] if args.only_real else list(HELD_OUT)
    instances += REAL_HELD_OUT if args.real or args.only_real else []
    instances = args.dataset or instances
    caps = [float(c) for c in args.caps.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.time(), []
    for instance in instances:
        base = _config(instance)
        dataset = load_env_dataset(base)
        for cap in caps:
            config = dataclasses.replace(base, cost_cap=cap)
            module = load_policy(args.policy, config, dataset)
            alone = _search(config, dataset, args.budget, None)
            guided = _search(config, dataset, args.budget, PolicyPrior(module, config, dataset))
            best = min(nll for _, nll, _ in alone)
            best_guided = min(nll for _, nll, _ in guided)
            dp_at, prior_at = _reach(alone, best), _reach(guided, best)
            row = {"instance": _name(instance), "cap": cap, "dp_best": best, "prior_best": best_guided,
                   "dp_evaluations": dp_at[0], "dp_nodes": dp_at[1],
                   "prior_evaluations": prior_at[0] if prior_at else None,
                   "prior_nodes": prior_at[1] if prior_at else None,
                   "dp_nodes_total": alone[-1][2], "prior_nodes_total": guided[-1][2],
                   "dp_trace": alone, "prior_trace": guided}  # fmt: skip
            rows.append(row)
            reached = f"does not reach it (best {best_guided:.4f})"
            if prior_at:
                ratio = prior_at[1] / dp_at[1]
                reached = f"reaches it after {prior_at[0]} evaluations, {prior_at[1]} nodes ({ratio:.2f}x)"
            print(f"[{time.time() - start:6.0f}s] {_name(instance)} cap {cap:g}x: dp's best {best:.4f} after "
                  f"{dp_at[0]} evaluations, {dp_at[1]} nodes; with the prior {reached}", flush=True)  # fmt: skip
            (args.out / "bench_prior.json").write_text(json.dumps(rows, indent=1))
    ratios = [r["prior_nodes"] / r["dp_nodes"] for r in rows if r["prior_nodes"] is not None]
    print(f"{len(rows)} instance-caps: the prior reaches dp's best in {len(ratios)}; node trainings needed, prior / "
          f"alone: median {np.median(ratios) if ratios else math.nan:.2f}; with the prior better than dp's best in "
          f"{sum(r['prior_best'] < r['dp_best'] - REACH for r in rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
