"""Storage cost of an Optuna trial as the searchers play one: in memory, in a journal file, in SQLite.

Each trial is what `OptunaSearcher` does for an episode: ask, an owner attribute, one integer
parameter per step, the tree's hash, tell. The three storages are timed side by side, in
turns, in one run; the ratios are to the journal file (a run's default study).

    python benchmarks/bench_optuna_storage.py [--trials 200] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from tree_search.agents.optuna_search import open_storage


def seconds_per_trial(storage: str | None, name: str, trials: int, steps: int) -> float:
    study = optuna.create_study(storage=open_storage(storage), sampler=optuna.samplers.RandomSampler(seed=0),
                                study_name=name)  # fmt: skip
    started = time.perf_counter()
    for k in range(trials):
        trial = study.ask()
        trial.set_user_attr("owner", "benchmark")
        for step in range(steps):
            trial.suggest_int(f"a{step}", 0, 31)
        trial.set_user_attr("tree_hash", f"{k:016x}")
        study.tell(trial, float(k % 7))
    return (time.perf_counter() - started) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="integer parameters per trial (actions per episode)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="optuna-storage-"))
    storages = {"memory": lambda r: None, "journal": lambda r: f"journal:{folder / f'{r}.journal'}",
                "sqlite": lambda r: f"sqlite:///{folder / f'{r}.db'}"}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in storages}
    for round_ in range(args.rounds):
        for name, url in storages.items():
            times[name].append(seconds_per_trial(url(round_), f"s{round_}", args.trials, args.steps))
    journal = statistics.median(times["journal"])
    print(f"{args.trials} trials of {args.steps} parameters, median of {args.rounds} rounds (in turns)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:8s} {median * 1e3:7.1f} ms per trial   {median / journal:5.2f}x the journal")


if __name__ == "__main__":
    main()
