"""Search benchmark on the built-in code corpus: searched trees vs every classic tree, on the test split.

Runs each searcher (default: TPE and PPO on the split environment) with the same budget
of tree evaluations, evaluates all classic baselines with the same head training, then
re-trains every finalist with several seeds and scores it once on the test split. Prints
the table and the verdicts (significant only beyond twice the combined standard error)
and writes report.md with the plots.

    python benchmarks/bench_search.py --budget 30 --agents tpe ppo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tree_search.agents import SearchConfig, run_search
from tree_search.envs import TreeEnvConfig
from tree_search.report import compare_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=["tpe", "ppo"])
    parser.add_argument("--env", default="split")
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the final test scoring")
    parser.add_argument("--final-epochs", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    folders = []
    for agent in args.agents:
        folder = args.out / agent
        config = SearchConfig(
            agent=agent, env=args.env, budget=args.budget, env_config=TreeEnvConfig(), baselines="all"
        )
        started = time.perf_counter()
        run = run_search(config, folder, resume=args.resume or (folder / "config.json").exists(), log=print)
        rows = [e for e in run.evaluations() if e.counted]
        seconds = time.perf_counter() - started
        print(
            f"{agent}: {len(rows)} evaluations in {seconds:.0f} s ({len(rows) / seconds * 60:.1f}/min incl. baselines)"
        )
        folders.append(folder)
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
