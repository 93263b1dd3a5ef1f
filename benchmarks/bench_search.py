"""Search benchmark on the built-in code corpus: searched trees vs every classic tree, on the test split.

Runs each searcher (default: TPE and PPO on the split environment) with the same budget
of tree evaluations, evaluates all classic baselines with the same head training, then
re-trains every finalist with several seeds and scores it once on the test split. Prints
the table and the verdicts (significant only beyond twice the combined standard error)
and writes report.md with the plots.

    python benchmarks/bench_search.py --budget 30 --agents tpe ppo

With ``--cost-caps 1,1.5,2,4`` every searcher runs one search per cap (each with the
budget), and an equal-budget table prints, per cap, each searcher's best validation NLL
within the cap beside the best classic tree's; ``--no-test`` skips the test scoring. Each
cap's search pays for every tree it asks for (``SearchConfig.share_caps=False``: only the
baselines are free), and node losses that dense rewards reveal outside evaluations are charged
to the budget (`Evaluator.charge_nodes`); ``--share-caps`` lets a cap reuse the others' trees
for free, as the product's front search does.

    python benchmarks/bench_search.py --budget 25 --agents random tpe ppo dp --cost-caps 1,1.5,2,4 --no-test

``ppo-dense`` is PPO with dense (per-node) rewards; ``--equal-test-seeds 3`` also scores each
searcher's best tree per cap (chosen on validation) on the test split with 3 fresh seeds:

    python benchmarks/bench_search.py --budget 25 --agents random tpe ppo ppo-dense dp jtm \\
        --cost-caps 1,1.5,2,4 --baselines front --no-test --equal-test-seeds 3

``--tables-only`` prints both tables from the runs already in ``--out`` (searched by several
processes, one agent each) without resuming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.reward.reward import FINAL_SEED_OFFSET, huffman_cost, score_test
from tree_search.search import SearchConfig, run_search
from tree_search.search.report import compare_runs
from tree_search.search.runs import Run


def _test_score(tree, projections, dataset, train, seeds: int, cache: dict, key: str) -> tuple[float, float]:
    """Mean and standard error of the test NLL over ``seeds`` final seeds (cached by tree key)."""
    values = cache.setdefault(key, [])
    for seed in range(len(values), seeds):
        final = dataclasses.replace(train, seed=FINAL_SEED_OFFSET + seed)  # seeds no search trained with
        values.append(score_test(tree, dataset, final, projections=projections or None)["test_nll"])
    mean = float(np.mean(values[:seeds]))
    return mean, float(np.std(values[:seeds], ddof=1) / math.sqrt(seeds)) if seeds > 1 else 0.0


def equal_budget_table(folders: list[Path], agents: list[str], test_seeds: int = 0, out: Path | None = None) -> None:
    """Per cap: each searcher's best validation NLL within the cap, and the best classic tree's (same reward).

    With ``test_seeds``, each of these trees (chosen on validation) is also re-trained with that
    many fresh seeds and scored on the test split: a second table, mean +- standard error.
    """
    runs = [Run(folder) for folder in folders]
    config = SearchConfig.from_json(runs[0].config)
    dataset = load_env_dataset(config.env_config)
    unit = huffman_cost(dataset) / (dataset.num_classes * dataset.dim)  # binary Huffman's cost / full softmax
    caps = config.caps()
    within = lambda e, cap: e.ok and e.cost_ratio <= cap * unit * (1 + 1e-9)  # noqa: E731
    classic = [e for e in runs[0].evaluations() if e.searcher.startswith("baseline:")]
    print(f"\nequal budget ({config.budget} evaluations per cap), best validation NLL within each cap:")
    print("(ch.: evaluations charged for node losses dense rewards revealed outside evaluations)")
    print(f"{'cap':>6s} {'classic':>22s} " + " ".join(f"{a:>17s}" for a in agents))
    for cap in sorted(set(caps.values())):
        fits = [e for e in classic if within(e, cap)]
        best = min(fits, key=lambda e: e.valid_nll) if fits else None
        name = best.searcher.removeprefix("baseline:") if best else "-"
        line = f"{cap:5g}x {name:>14s} " + (f"{best.valid_nll:7.4f}" if best else f"{'':7s}")
        for agent, run in zip(agents, runs, strict=True):
            label = f"{agent.split('-')[0]}@{cap:g}x"  # "ppo-dense" searches as "ppo"
            found = [e.valid_nll for e in run.evaluations() if e.counted and e.searcher == label and within(e, cap)]
            charged = (run.read_json(Run.CHARGES) or {}).get(label, {}).get("charged", 0.0)
            cell = (f"{min(found):.4f}" if found else "-") + (f" ({charged:.1f} ch.)" if charged else "")
            line += f" {cell:>17s}"
        print(line, flush=True)
    if not test_seeds:
        return
    train = dataclasses.replace(config.env_config.train, epochs=2 * config.env_config.train.epochs)
    cache_path = (out or folders[0].parent) / "equal_budget_test.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    print(f"\nthe same trees on the test split ({test_seeds} fresh seeds, twice the search's epochs), test NLL +- SE:")
    print(f"{'cap':>6s} {'classic':>30s} " + " ".join(f"{a:>17s}" for a in agents))
    for cap in sorted(set(caps.values())):
        fits = [e for e in classic if within(e, cap)]
        best = min(fits, key=lambda e: e.valid_nll) if fits else None
        cells = []
        if best is not None:
            mean, se = _test_score(runs[0].tree(best.key), best.projections, dataset, train, test_seeds, cache,
                                   best.key)  # fmt: skip
            cells.append(f"{best.searcher.removeprefix('baseline:'):>14s} {mean:7.4f}+-{se:.4f}")
        else:
            cells.append(f"{'-':>30s}")
        for agent, run in zip(agents, runs, strict=True):
            label = f"{agent.split('-')[0]}@{cap:g}x"
            found = [e for e in run.evaluations() if e.counted and e.searcher == label and within(e, cap)]
            if not found:
                cells.append(f"{'-':>17s}")
                continue
            pick = min(found, key=lambda e: e.valid_nll)
            mean, se = _test_score(run.tree(pick.key), pick.projections, dataset, train, test_seeds, cache, pick.key)
            cells.append(f"{mean:8.4f}+-{se:.4f}")
            cache_path.write_text(json.dumps(cache))
        print(f"{cap:5g}x " + " ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=["tpe", "ppo"])
    parser.add_argument("--env", default="split")
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the final test scoring")
    parser.add_argument("--final-epochs", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--cost-caps", default="", help="comma-separated caps (multiples of binary Huffman's cost)")
    parser.add_argument("--baselines", default="all", help="classic set: core, all, front")
    parser.add_argument("--no-test", action="store_true", help="skip the final test scoring (compare_runs)")
    parser.add_argument(
        "--share-caps", action="store_true", help="a tree evaluated under one cap is free for the others (not equal)"
    )
    parser.add_argument(
        "--equal-test-seeds",
        type=int,
        default=0,
        help="also score each searcher's best tree per cap on test with this many seeds",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="print the equal-budget tables of the runs in --out without searching (no resume)",
    )
    args = parser.parse_args()
    if args.tables_only:
        equal_budget_table([args.out / spec for spec in args.agents], args.agents, args.equal_test_seeds, args.out)
        return
    folders = []
    for spec in args.agents:  # an agent, or "ppo-dense": PPO on dense (per-node) rewards
        agent, _, mode = spec.partition("-")
        folder = args.out / spec
        caps = tuple(float(c) for c in args.cost_caps.split(",") if c)
        config = SearchConfig(
            agent=agent, env=args.env, budget=args.budget, baselines=args.baselines, cost_caps=caps,
            env_config=TreeEnvConfig(reward_mode=mode or "terminal"), share_caps=args.share_caps,
        )  # fmt: skip
        started = time.perf_counter()
        run = run_search(config, folder, resume=args.resume or (folder / "config.json").exists(), log=print)
        rows = [e for e in run.evaluations() if e.counted]
        seconds = time.perf_counter() - started
        print(
            f"{spec}: {len(rows)} evaluations in {seconds:.0f} s ({len(rows) / seconds * 60:.1f}/min incl. baselines)"
        )
        folders.append(folder)
    if args.cost_caps:
        equal_budget_table(folders, args.agents, args.equal_test_seeds, args.out)
    if args.no_test:
        return
    rows = compare_runs(folders, seeds=args.seeds, epochs=args.final_epochs, out=args.out, log=print).rows
    header = f"{'tree':<24s} {'kind':<22s} {'valid':>8s} {'test NLL':>9s} {'±':>7s} {'ppl':>7s}"
    print(f"\n{header} {'cost/full':>10s} {'cost/Huff':>9s}")
    for r in rows:
        kind = r["kind"] + ("" if r["within_cap"] else " (over cap)")
        valid = "" if r["valid_nll"] != r["valid_nll"] else f"{r['valid_nll']:.4f}"  # NaN: the reference
        print(f"{r['name']:<24s} {kind:<22s} {valid:>8s} {r['test_nll']:9.4f} {r['test_stderr']:7.4f} "
              f"{r['perplexity']:7.2f} {r['cost_ratio']:10.3%} {r['cost_vs_huffman']:9.2f}")  # fmt: skip
    import json

    for line in json.loads((args.out / "comparison.json").read_text())["verdicts"]:
        print(line)


if __name__ == "__main__":
    main()
