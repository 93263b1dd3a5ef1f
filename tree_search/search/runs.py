"""One folder per run under ``runs/``: config, leaderboard written as results arrive, best tree, TensorBoard.

Layout of ``runs/<name>/``::

    config.json        the resolved configuration (what `tree-search search --resume` reads)
    leaderboard.jsonl  one `Evaluation` per line, appended, flushed and fsynced as it arrives
    trees/<key>.json   every evaluated tree (tree.json format, with the class tokens and counts), written before
                       its leaderboard line
    best_tree.json     the best searched tree so far by validation NLL (within the cap), tokens and counts too
    tb/                TensorBoard events (search/*, tree/*, policy/*)
    selection_free.json  per searcher label, a validation NLL its own choosing did not bias (dp's, cross-fitted)
    final.json         test-split scores of the finalists, summed per test document (`tree-search compare`)
    report.md, *.png   the comparison report and its plots
    optuna.journal     the Optuna searchers' studies (Optuna's journal file), unless the run names another storage
    .writer.lock       held (``flock``) by the one process writing the run: a search, a resume or a test scoring

Nothing computed is lost on a crash: a line is on disk before the next evaluation starts,
and a torn last line (a kill mid-write) is skipped with a warning when the run is read (cut from the Optuna
journal before a resumed study reads it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tree_search.cost import parse_cost_spec
from tree_search.data.cache import atomic_write_bytes
from tree_search.export import TreeRecord, load_tree_json, save_tree_json
from tree_search.reward.evaluator import Evaluation
from tree_search.search.verdicts import Comparison, verdict_words
from tree_search.tree import Tree

__all__ = [
    "COMPARISON_FILE",
    "SELECTION_FREE",
    "Run",
    "RunError",
    "RunSummary",
    "find_runs",
    "hold_run",
    "summarize_run",
]

COMPARISON_FILE = "comparison.json"  # a run's last test scoring (`tree_search.search.report.ComparisonReport`)
SELECTION_FREE = "selection_free.json"  # searcher label -> its validation NLL free of its own selection


class RunError(ValueError):
    """A run folder that cannot be created, read or resumed; the message names the file."""


_PROCESS_STARTED = time.time()  # a file lock older than this is a dead process's: a run has one writer (`hold_run`)
WRITER_LOCK = ".writer.lock"
_held: dict[Path, tuple[int, int]] = {}  # run folder (resolved) -> (lock file descriptor, nesting) held by this process


@contextlib.contextmanager
def hold_run(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``folder``'s writer lock for the block: one process at a time writes a run.

    Two processes resuming or scoring one run would both append to its leaderboard and journal and
    overwrite each other's reports. The lock is an advisory ``flock`` on ``folder/.writer.lock``
    (created with the folder), which the kernel releases when its process ends, however it ends: a
    killed search never blocks its own resume. Nested holds in one process (a search, then its
    test scoring) share it. Where ``fcntl`` is missing (Windows) nothing is locked.

    Raises:
        RunError: ``folder`` is not a folder, or another process holds the lock (the message names its process id).
    """
    key = Path(folder).resolve()
    if key in _held:
        descriptor, depth = _held[key]
        _held[key] = (descriptor, depth + 1)
    else:
        if not key.is_dir():
            raise RunError(f"{folder}: no such run folder")
        _held[key] = (_lock(key / WRITER_LOCK), 1)
    try:
        yield
    finally:
        descriptor, depth = _held.pop(key)
        if depth > 1:
            _held[key] = (descriptor, depth - 1)
        elif descriptor >= 0:
            os.close(descriptor)  # releases the flock


def _lock(path: Path) -> int:
    """The descriptor of ``path`` locked exclusively for this process (-1 without ``fcntl``), its pid written in it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return -1
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock is ours
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise RunError(
            f"{path.parent}: another process (pid {holder}) is writing this run; wait for it to finish "
            "or stop it, then try again"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _drop_torn_line(path: Path) -> bool:
    """Cut a last line that a kill left without its newline, so appending never glues rows together.

    Returns: whether a line was cut.
    """
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return False
        data = path.read_bytes()
        handle.truncate(data.rfind(b"\n") + 1)
    return True


class Run:
    """A run folder: writes results as they arrive and reads them back for resuming and reports."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        """Open ``folder`` (created if missing). Use `create` or `open` for the checks."""
        self.folder = Path(folder)
        self._writer = None
        self._best: dict[str, float] = {}
        self._best_search = math.inf
        self.cap_ratio = math.inf  # searched trees costing more (/ full softmax) never become best_tree.json
        self.decode_cap = 0.0  # nor those over this decoding cap (x binary Huffman's; 0: none)
        self.labels: tuple[str, ...] | None = None  # class tokens and training counts written into every tree file
        self.counts: np.ndarray | None = None
        for evaluation in self.evaluations():
            self._note_best(evaluation)

    COST_PROFILE = "cost_profile.json"  # the profile a ``--cost measured`` search used, kept with its results
    LIBRARY_LOG = "libraries.log"  # other libraries' log lines (Ray, RLlib, Optuna) of the command line's sessions
    CHARGES = "charges.json"  # per searcher label: evaluations charged for node losses revealed outside evaluations
    OPTUNA_JOURNAL = "optuna.journal"  # an Optuna searcher's studies, unless the run names another storage

    def optuna_storage(self) -> str:
        """The storage of this run's own Optuna studies (when the run names none), ready to append to.

        A journal file: a trial costs about 17 ms there against 120 ms in SQLite, which syncs at every commit
        (`benchmarks/bench_optuna_storage.py`). A run begun with SQLite, before the journal, goes on with its
        database. What a kill mid-write leaves is mended: a torn journal line is cut, as the leaderboard's is (Optuna
        would glue the next record onto it and refuse the whole file), and a lock still held is removed.
        """
        database = self.folder / "optuna.db"
        if database.exists():
            return f"sqlite:///{database.resolve()}"
        journal = self.folder / self.OPTUNA_JOURNAL
        if _drop_torn_line(journal):
            warnings.warn(f"{journal}: cut a torn last line (a kill mid-write); its trial is lost", stacklevel=2)
        lock = journal.with_name(journal.name + ".lock")  # Optuna's lock, held while a record is appended
        if lock.is_symlink() and lock.lstat().st_mtime < _PROCESS_STARTED:
            lock.unlink()  # left by a killed process: Optuna would wait 30 s before taking it over
            warnings.warn(f"{lock}: removed the lock a killed process left behind", stacklevel=2)
        return f"journal:{journal.resolve()}"

    def cost_spec(self, spec: str) -> str:
        """``spec`` with ``measured`` or ``decode`` pointing at this run's own copy of its profile, once it has one.

        A run's caps and costs keep their meaning when the device's profile is calibrated again.
        """
        own, kind = self.folder / self.COST_PROFILE, parse_cost_spec(spec)[0]
        return f"{kind}:{own}" if kind != "macs" and own.exists() else spec

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        config: Mapping[str, Any],
        resume: bool = False,
        may_differ: Collection[str] = (),
    ) -> Run:
        """Start a run (or resume it when ``resume``), writing or checking ``config.json``.

        ``may_differ``: fields a resumed run may change (how it runs, not what it searches).

        Raises:
            RunError: when the folder already holds results and ``resume`` is false, or
                when resuming with a different configuration.
        """
        path = Path(folder)
        config_path = path / "config.json"
        plain = json.loads(json.dumps(config))
        if resume:
            if not config_path.exists():
                raise RunError(f"{config_path}: nothing to resume (no config.json)")
            stored = json.loads(config_path.read_text(encoding="utf-8"))
            changed = sorted(
                k for k in set(stored) | set(plain) if k not in may_differ and stored.get(k) != plain.get(k)
            )
            if changed:
                raise RunError(f"{config_path}: the resumed run was configured differently in {changed}")
        elif (path / "leaderboard.jsonl").exists():
            raise RunError(f"{path}: already holds a run; resume it with --resume or choose another --out")
        (path / "trees").mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(config_path, json.dumps(plain, indent=2).encode())
        return run

    @property
    def config(self) -> dict[str, Any]:
        """The stored configuration."""
        path = self.folder / "config.json"
        if not path.exists():
            raise RunError(f"{path}: missing; is {self.folder} a run folder?")
        return json.loads(path.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ writing
    def tensorboard(self):
        """The run's TensorBoard writer (created on first use)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder / "tb"))
        return self._writer

    def record(self, evaluation: Evaluation, tree: Tree) -> None:
        """Persist one evaluation: its tree, then its leaderboard line (flushed and fsynced)."""
        tree_path = self.folder / "trees" / f"{evaluation.key}.json"
        tree_path.parent.mkdir(parents=True, exist_ok=True)
        if not tree_path.exists():
            save_tree_json(tree_path, TreeRecord(tree, labels=self.labels, counts=self.counts,
                                                 built_by={"searcher": evaluation.searcher}))  # fmt: skip
        board = self.folder / "leaderboard.jsonl"
        _drop_torn_line(board)
        with open(board, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(evaluation.to_json()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        improved = self._note_best(evaluation)
        if improved and not evaluation.searcher.startswith("baseline:"):
            save_tree_json(
                self.folder / "best_tree.json",
                TreeRecord(
                    tree,
                    labels=self.labels,
                    counts=self.counts,
                    built_by={"searcher": evaluation.searcher, "projections": evaluation.projections},
                    metrics={"valid_nll": evaluation.valid_nll, "cost_ratio": evaluation.cost_ratio},
                ),
            )
        writer = self.tensorboard()
        step = evaluation.index
        if evaluation.ok:
            writer.add_scalar("search/valid_nll", evaluation.valid_nll, step)
            writer.add_scalar(
                f"search/best_valid_nll/{evaluation.searcher.split(':')[0]}", self.best_of(evaluation), step
            )
        writer.add_scalar("tree/cost_ratio", evaluation.cost_ratio, step)
        writer.add_scalar("tree/max_depth", evaluation.max_depth, step)
        writer.add_scalar("reward/nodes_trained", evaluation.nodes_trained, step)
        writer.add_scalar("reward/nodes_reused", evaluation.nodes_reused, step)
        writer.add_scalar("reward/seconds", evaluation.train_seconds, step)
        writer.flush()

    def log_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """Extra TensorBoard scalars (e.g. policy losses) under ``prefix/``."""
        writer = self.tensorboard()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"{prefix}/{name}", value, step)
        writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _note_best(self, evaluation: Evaluation) -> bool:
        if not evaluation.ok:
            return False
        group = evaluation.searcher.split(":")[0]
        self._best[group] = min(self._best.get(group, math.inf), evaluation.valid_nll)
        within = evaluation.cost_ratio <= self.cap_ratio * (1 + 1e-9) and evaluation.within_decode_cap(self.decode_cap)
        if not evaluation.searcher.startswith("baseline:") and within and evaluation.valid_nll < self._best_search:
            self._best_search = evaluation.valid_nll
            return True
        return False

    def best_of(self, evaluation: Evaluation) -> float:
        """Best validation NLL so far of the evaluation's searcher."""
        return self._best.get(evaluation.searcher.split(":")[0], math.inf)

    # ------------------------------------------------------------------ reading
    def evaluations(self) -> list[Evaluation]:
        """Every leaderboard row on disk, in order; a torn last line is skipped with a warning."""
        path = self.folder / "leaderboard.jsonl"
        if not path.exists():
            return []
        rows = []
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(Evaluation.from_json(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                if number == len(lines):
                    warnings.warn(f"{path}, line {number}: skipped a torn last line ({err})", stacklevel=2)
                    continue
                raise RunError(f"{path}, line {number}: not a leaderboard row: {err}") from None
        return rows

    def tree(self, key: str) -> Tree:
        """The tree of a leaderboard row."""
        return load_tree_json(self.folder / "trees" / f"{key}.json").tree

    def read_json(self, name: str) -> Any:
        """A JSON file of the run folder, or None when it does not exist."""
        path = self.folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``name`` atomically in the run folder."""
        path = self.folder / name
        atomic_write_bytes(path, json.dumps(data, indent=2).encode())
        return path


@dataclass(frozen=True)
class CapVerdict:
    """One cap of a finished front search: the searched tree, its test NLL and the verdict against the classic trees."""

    cap: float
    searched: str
    test_nll: float
    difference: float  # classic - searched on test (> 0: the searched tree is better)
    verdict: str  # "searched wins", "classic wins" or "tie" (`verdict_words`)


@dataclass(frozen=True)
class RunSummary:
    """What a run folder searched and how far it got (one line of `tree-search runs`)."""

    folder: Path
    status: str  # "finished", "searched", "unfinished", "empty" (see `summarize_run`)
    agent: str
    dataset: str
    caps: tuple[float, ...]
    budget: int  # counted evaluations the configuration allows, over all caps
    evaluated: int  # counted evaluations on disk
    best_valid_nll: float  # the lowest of its counted evaluations (inf: none)
    verdicts: tuple[CapVerdict, ...]  # per cap, once the run is compared
    modified: float  # the last write to the run, seconds since the epoch


def summarize_run(folder: str | os.PathLike[str]) -> RunSummary:
    """Read a run folder without computing anything.

    Status: "finished" (its finalists are scored on test: ``comparison.json``), "searched"
    (its budget is used, not yet compared: ``tree-search compare RUN``), "unfinished"
    (interrupted, out of time, or still running: ``tree-search search --resume RUN``), "empty"
    (nothing evaluated: a start killed before it could clean up; `run_search` removes what a
    failed start created).

    Raises:
        RunError: when ``folder`` has no readable ``config.json`` or leaderboard.
    """
    run = Run(folder)
    try:
        config = run.config
    except json.JSONDecodeError as err:
        raise RunError(f"{run.folder / 'config.json'}: not JSON ({err})") from None
    env = config.get("env_config", {})
    caps = tuple(float(c) for c in config.get("cost_caps") or ()) or (float(env.get("cost_cap", math.nan)),)
    budget = int(config.get("budget", 0)) * len(caps)
    rows = run.evaluations()
    counted = [e for e in rows if e.counted]
    best = min((e.valid_nll for e in counted if e.ok), default=math.inf)
    comparison = run.read_json(COMPARISON_FILE)
    verdicts = []
    for cap in (comparison or {}).get("caps", []):
        if "difference" not in cap or not cap.get("searched"):
            continue
        if "interval" in cap:
            words = verdict_words(Comparison(cap["difference"], *cap["interval"]))
        else:  # a report written before the paired intervals: its own significance flag
            words = ("searched wins" if cap["difference"] > 0 else "classic wins") if cap.get("significant") else "tie"
        searched = cap["searched"]
        verdicts.append(CapVerdict(float(cap["cap"]), searched["name"], float(searched["test_nll"]),
                                   float(cap["difference"]), words))  # fmt: skip
    if comparison is not None:
        status = "finished"
    elif not rows:
        status = "empty"
    else:
        status = "searched" if len(counted) >= budget else "unfinished"
    files = [run.folder / name for name in ("config.json", "leaderboard.jsonl", COMPARISON_FILE)]
    dataset = str(env.get("dataset", "?"))
    return RunSummary(
        folder=run.folder,
        status=status,
        agent=str(config.get("agent", "?")),
        dataset=dataset if dataset in ("builtin", "planted") else Path(dataset).name,
        caps=caps,
        budget=budget,
        evaluated=len(counted),
        best_valid_nll=best,
        verdicts=tuple(verdicts),
        modified=max(f.stat().st_mtime for f in files if f.exists()),
    )


def find_runs(root: str | os.PathLike[str] = "runs") -> list[RunSummary]:
    """Every run folder (one holding ``config.json``) at most two levels below ``root``, newest first.

    Folders that cannot be read are skipped with a warning naming the file.
    """
    root = Path(root)
    found = []
    for config in sorted([*root.glob("config.json"), *root.glob("*/config.json"), *root.glob("*/*/config.json")]):
        try:
            found.append(summarize_run(config.parent))
        except RunError as err:
            warnings.warn(str(err), stacklevel=2)
    return sorted(found, key=lambda summary: -summary.modified)
