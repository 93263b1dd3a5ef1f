"""Search benchmark on the built-in code corpus: searched trees vs every classic tree, on the test split.

Runs each searcher (default: TPE and PPO on the split environment) with the same budget
of tree evaluations, evaluates all classic baselines with the same head training, then
re-trains every finalist with several seeds and scores it once on the test split. Prints
the table and the verdicts (significant only beyond twice the combined standard error)
and writes report.md with the plots.

    python benchmarks/bench_search.py --budget 30 --agents tpe ppo

With ``--cost-caps 1,1.5,2,4`` every searcher runs one search per cap (each with the
budget), and an equal-budget table prints, per cap, each searcher's best validation NLL
within the cap beside the best classic tree's; ``--no-test`` skips the test scoring.

    python benchmarks/bench_search.py --budget 25 --agents random tpe ppo dp --cost-caps 1,1.5,2,4 --no-test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tree_search.agents import SearchConfig, run_search
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.reward import huffman_cost
from tree_search.report import compare_runs
from tree_search.runs import Run


def equal_budget_table(folders: list[Path], agents: list[str]) -> None:
    """Per cap: each searcher's best validation NLL within the cap, and the best classic tree's (same reward)."""
    runs = [Run(folder) for folder in folders]
    config = SearchConfig.from_json(runs[0].config)
    dataset = load_env_dataset(config.env_config)
    unit = huffman_cost(dataset) / (dataset.num_classes * dataset.dim)  # binary Huffman's cost / full softmax
    caps = config.caps()
    within = lambda e, cap: e.ok and e.cost_ratio <= cap * unit * (1 + 1e-9)  # noqa: E731
    classic = [e for e in runs[0].evaluations() if e.searcher.startswith("baseline:")]
    print(f"\nequal budget ({config.budget} evaluations per cap), best validation NLL within each cap:")
    print(f"{'cap':>6s} {'classic':>22s} " + " ".join(f"{a:>10s}" for a in agents))
    for cap in sorted(set(caps.values())):
        fits = [e for e in classic if within(e, cap)]
        best = min(fits, key=lambda e: e.valid_nll) if fits else None
        name = best.searcher.removeprefix("baseline:") if best else "-"
        line = f"{cap:5g}x {name:>14s} " + (f"{best.valid_nll:7.4f}" if best else f"{'':7s}")
        for agent, run in zip(agents, runs, strict=True):
            label = f"{agent}@{cap:g}x"
            found = [e.valid_nll for e in run.evaluations() if e.counted and e.searcher == label and within(e, cap)]
            line += f" {min(found):10.4f}" if found else f" {'-':>10s}"
        print(line, flush=True)


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
    parser.add_argument("--no-test", action="store_true", help="skip the final test scoring")
    args = parser.parse_args()
    folders = []
    for agent in args.agents:
        folder = args.out / agent
        caps = tuple(float(c) for c in args.cost_caps.split(",") if c)
        config = SearchConfig(
            agent=agent, env=args.env, budget=args.budget, env_config=TreeEnvConfig(), baselines=args.baselines,
            cost_caps=caps,
        )  # fmt: skip
        started = time.perf_counter()
        run = run_search(config, folder, resume=args.resume or (folder / "config.json").exists(), log=print)
        rows = [e for e in run.evaluations() if e.counted]
        seconds = time.perf_counter() - started
        print(
            f"{agent}: {len(rows)} evaluations in {seconds:.0f} s ({len(rows) / seconds * 60:.1f}/min incl. baselines)"
        )
        folders.append(folder)
    if args.cost_caps:
        equal_budget_table(folders, args.agents)
    if args.no_test:
        return
    rows = compare_runs(folders, seeds=args.seeds, epochs=args.final_epochs, out=args.out, log=print)
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
