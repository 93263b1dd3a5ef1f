"""Cost against size: the wall time and peak memory of each phase of the main job, at several V.

For each vocabulary size V, from an empty cache of its own (so nothing is reused between
sizes or from earlier runs), it runs two commands as a user would:

1. ``tree-search data prepare --text FILE --max-size V``: tokenising, the context encoder and
   its features (phase "prepare");
2. the README's main job on those features (``tree-search search --agent dp --budget 25
   --cost-caps 1,1.5,2,4 --baselines front --final-epochs 1 --text FILE --max-size V``),
   whose output lines, timestamped as they arrive, split it into phases: "start-up" (up to
   the first classic tree's result: loading, building the 32 classic trees), "classic front"
   (the classic trees' evaluations), "search" (dp's evaluations, with the time per counted
   evaluation) and "final scoring" (test scoring of the finalists, the report, the best head).

Peak memory is the largest resident set of the command's process tree (every descendant's
proportional set size, ``Pss`` from ``/proc``, summed, sampled every 0.25 s), per phase. Then, per phase, the
growth exponent ``b`` of ``seconds ~ a V^b`` fitted by least squares on log-log axes, and a
log-log PNG of time against V. Linux only (``/proc``).

    python benchmarks/bench_size.py --text runs/english-large.txt --sizes 10000 30000 100000
        [--out runs/bench-size] [--budget 25] [--plot docs/bench_size.png]

Each size's measurements are kept in ``OUT/size-V.json`` as it finishes; a second call
skips the sizes it has (delete the file to measure one again).

``--planted 300000 1000000`` measures sizes past what the corpus holds on planted-hierarchy
data instead (``tree_search.data.planted``, d = 16, 2V training samples and at least 400k,
100k valid and 100k test): "prepare" is then generating the task and writing it as an
``.npz`` of features (in a process of its own, so its peak memory is its own), and the main
job reads it with ``--dataset``. ``--eval-workers N`` runs the main job's evaluations on N
Ray actors of a local Ray cluster (one CPU each); ``--budget``, ``--final-seeds``, ``--caps`` and
``--baselines`` shorten it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

PHASES = ("prepare", "start-up", "classic front", "search", "final scoring")
_CLI = [sys.executable, "-u", "-c", "from tree_search.cli import main; main()"]


def _tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants (0 for processes that ended meanwhile).

    Each process counts its proportional share of the pages it shares (``Pss``), so the Ray
    object store that the driver and the actors all map is counted once, not once per process
    (``VmRSS`` where the kernel gives no ``smaps_rollup``).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        for path, field in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
            try:
                with open(path) as handle:
                    total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))
                break
            except (OSError, StopIteration):
                continue
    return total


def run_timed(
    command: list[str], env: dict[str, str], log: Path
) -> tuple[list[tuple[float, str]], list[tuple[float, int]]]:
    """Run ``command``: its output lines and resident-memory samples, each with seconds since the start."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        while process.poll() is None:
            samples.append((time.perf_counter() - started, _tree_rss(process.pid)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    with open(log, "w") as out:
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            out.write(f"{lines[-1][0]:9.1f} {line}")
            out.flush()
    code = process.wait()
    sampler.join()
    lines.append((time.perf_counter() - started, "(end)"))
    if code:
        raise SystemExit(f"{' '.join(command)} failed with exit status {code}; see {log}")
    return lines, samples


def _phase_bounds(lines: list[tuple[float, str]]) -> dict[str, tuple[float, float]]:
    """``{phase: (start, end)}`` of the main job from its timestamped lines."""

    def first(predicate) -> float:
        return next(t for t, line in lines if predicate(line))

    front = first(lambda line: "baseline:" in line)
    search = first(lambda line: "] dp@" in line)
    scoring = first(lambda line: line.startswith("final scoring"))
    return {"start-up": (0.0, front), "classic front": (front, search), "search": (search, scoring),
            "final scoring": (scoring, lines[-1][0])}  # fmt: skip


def _peak(samples: list[tuple[float, int]], start: float, end: float) -> float:
    inside = [rss for t, rss in samples if start <= t <= end]
    return max(inside, default=0) / 2**30


def planted_config(size: int):
    """The planted task of ``--planted`` at V = ``size``."""
    from tree_search.data.planted import PlantedConfig

    return PlantedConfig(num_classes=size, dim=16, signal=3.0, num_train=max(400_000, 2 * size), num_valid=100_000,
                         num_test=100_000)  # fmt: skip


def write_planted(size: int, path: Path) -> None:
    """Generate the planted task at V = ``size`` and write it as a features ``.npz`` (`load_npz_dataset`'s format)."""
    from tree_search.data.code_corpus import SPLITS
    from tree_search.data.planted import make_planted

    data = make_planted(planted_config(size))
    features = np.concatenate([data.features[name] for name in SPLITS]).astype(np.float32)
    labels = np.concatenate([data.labels[name] for name in SPLITS])
    split = np.repeat(np.arange(len(SPLITS)), [data.labels[name].size for name in SPLITS])
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, features=features, labels=labels, split=split, class_counts=data.counts)
    partial.replace(path)
    print(f"planted V = {size:,}: {labels.size:,} rows, Bayes NLL on test {data.bayes_nll['test']:.4f}", flush=True)


def measure(text: Path | None, size: int, budget: int, folder: Path, planted: bool = False, workers: int = 0,
            final_seeds: int = 3, caps: str = "1,1.5,2,4", baselines: str = "front") -> dict:  # fmt: skip
    """One size's phases: seconds, peak GiB, and the search's counted evaluations."""
    env = os.environ | {"TREE_SEARCH_CACHE": str(folder / f"cache-{size}"), "PYTHONUNBUFFERED": "1"}
    if planted:
        dataset = folder / f"planted-{size}.npz"
        prepare = [sys.executable, "-u", __file__, "--write-planted", str(size), str(dataset)]
        common = ["--dataset", str(dataset)]
    else:
        common = ["--text", str(text), "--max-size", str(size)]
        prepare = [*_CLI, "data", "prepare", *common]
    lines, samples = run_timed(prepare, env, folder / f"prepare-{size}.log")
    phases = {"prepare": {"seconds": lines[-1][0], "peak_gib": _peak(samples, 0, lines[-1][0])}}
    run = folder / f"run-{size}"
    job = [*_CLI, "search", "--agent", "dp", "--budget", str(budget), "--cost-caps", caps, "--baselines", baselines,
           "--final-epochs", "1", "--final-seeds", str(final_seeds), *common, "--out", str(run)]  # fmt: skip
    if workers:
        job += ["--eval-workers", str(workers), "--cpus-per-eval", "1"]
    lines, samples = run_timed(job, env, folder / f"search-{size}.log")
    for phase, (start, end) in _phase_bounds(lines).items():
        phases[phase] = {"seconds": end - start, "peak_gib": _peak(samples, start, end)}
    evaluations = sum(1 for _, line in lines if "] dp@" in line and " extra " not in line)
    phases["search"]["per_evaluation"] = phases["search"]["seconds"] / max(1, evaluations)
    # the counted evaluations' training ("extra" lines are trees known already, answered from memory)
    training = sum(float(line.rsplit(None, 1)[-1].rstrip("s")) for _, line in lines
                   if "] dp@" in line and " extra " not in line)  # fmt: skip
    return {"classes": size, "planted": planted, "eval_workers": workers, "budget": budget,
            "final_seeds": final_seeds, "caps": caps, "baselines": baselines, "phases": phases,
            "search_evaluations": evaluations, "search_training_seconds": training, "job_seconds": lines[-1][0],
            "job_peak_gib": _peak(samples, 0, lines[-1][0])}  # fmt: skip


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """``b`` of ``seconds ~ a V^b``, least squares on log-log axes (nan with fewer than two sizes)."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if sys.argv[1:2] == ["--write-planted"]:  # the planted task's "prepare", in a process of its own
        write_planted(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser.add_argument("--text", type=Path, default=None, help="a text corpus with enough word types")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 30_000, 100_000])
    parser.add_argument("--planted", type=int, nargs="*", default=[], help="sizes measured on planted data")
    parser.add_argument("--eval-workers", type=int, default=0, help="Ray evaluation actors of the main job (0: none)")
    parser.add_argument("--final-seeds", type=int, default=3, help="seeds of the final scoring (the main job's 3)")
    parser.add_argument("--caps", default="1,1.5,2,4", help="the main job's --cost-caps")
    parser.add_argument("--baselines", default="front", help="the main job's --baselines")
    parser.add_argument("--budget", type=int, default=25, help="dp's evaluations per cap (the main job's 25)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-size"))
    parser.add_argument("--plot", type=Path, default=None, help="the log-log PNG (default: OUT/bench_size.png)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sizes and args.text is None:
        parser.error("--sizes needs --text (or give --sizes with no value and measure --planted sizes only)")
    results = []
    todo = sorted([(size, False) for size in args.sizes] + [(size, True) for size in args.planted])
    for size, planted in todo:
        path = args.out / f"size-{size}.json"
        if not path.exists():
            kind = "planted data" if planted else "the corpus"
            print(f"V = {size:,} ({kind}): measuring (prepare, then the main job)", flush=True)
            measured = measure(args.text, size, args.budget, args.out, planted, args.eval_workers, args.final_seeds,
                               args.caps, args.baselines)  # fmt: skip
            path.write_text(json.dumps(measured, indent=1) + "\n")
        results.append(json.loads(path.read_text()))
    sizes = [r["classes"] for r in results]
    names = [f"V = {r['classes']:,}{' (planted)' if r.get('planted') else ''}" for r in results]
    header = "| phase | " + " | ".join(f"{name}: s / peak GiB" for name in names) + " | growth exponent |"
    print(header)
    print("|---|" + "---|" * (len(sizes) + 1))
    for phase in PHASES:
        seconds = [r["phases"][phase]["seconds"] for r in results]
        cells = [f"{s:,.0f} / {r['phases'][phase]['peak_gib']:.1f}" for s, r in zip(seconds, results, strict=True)]
        print(f"| {phase} | " + " | ".join(cells) + f" | {exponent(sizes, seconds):.2f} |")
    per_evaluation = [r["phases"]["search"]["per_evaluation"] for r in results]
    print("| search, per evaluation | " + " | ".join(f"{s:.1f} s" for s in per_evaluation)
          + f" | {exponent(sizes, per_evaluation):.2f} |")  # fmt: skip
    jobs = [r["job_seconds"] for r in results]
    print("| main job (no prepare) | " + " | ".join(f"{s / 60:.1f} min / {r['job_peak_gib']:.1f}"
          for s, r in zip(jobs, results, strict=True)) + f" | {exponent(sizes, jobs):.2f} |")  # fmt: skip
    for r in results:
        share = 1 - r["search_training_seconds"] / r["phases"]["search"]["seconds"]
        print(f"V = {r['classes']:,}: the search's own work (not training heads) is {share:.0%} of its phase")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for phase in PHASES:
        seconds = [r["phases"][phase]["seconds"] for r in results]
        ax.loglog(sizes, seconds, "o-", label=f"{phase} (V^{exponent(sizes, seconds):.2f})")
    ax.loglog(sizes, jobs, "k--", label=f"main job (V^{exponent(sizes, jobs):.2f})")
    ax.set_xlabel("classes V")
    ax.set_ylabel("wall time, s (2 cores)")
    ax.set_title("tree_search: each phase's time against V")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    plot = args.plot or args.out / "bench_size.png"
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
