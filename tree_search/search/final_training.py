"""The final scoring's trainings: each (finalist, seed) trained and scored on test, here or in worker processes.

Small heads use threads poorly (on 2 cores a training with 2 threads takes 0.60-0.69x its time with one), so the
final scoring trains several finalists at once in processes of fewer threads each. A node's training gives the
same bits with any number of threads, so a finalist's scores do not depend on where it was trained: the pool
changes the time only (`tests/search/test_final_training.py` checks the equality). The best searched tree's head,
trained again by the first final seed, is written here too (`write_best_head`).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tree_search.heads import TreeSoftmaxHead
from tree_search.heads.train import validation_nll
from tree_search.reward.blas import one_blas_thread
from tree_search.reward.node_train import NodeRecipe, split_sample
from tree_search.reward.reward import score_test, trained_head
from tree_search.search.runs import RunError
from tree_search.tree import Tree

__all__ = ["AUTO_WORKERS_MAX", "FinalTraining", "ScoringPool", "final_workers", "train_finalists", "write_best_head"]

AUTO_WORKERS_MAX = 4  # each worker holds its own samples of a seed (about 1.5 GB on the built-in data)


def final_workers(requested: int, trainings: int, device_type: str) -> int:
    """Processes for ``trainings`` final trainings: ``requested``, or with 0 one per thread of torch's, up to 4.

    With 0 the pool spends the CPUs this process would have used (``torch.get_num_threads()``, which
    ``OMP_NUM_THREADS`` or `torch.set_num_threads` set), and no more workers than the memory available holds
    at this process's peak size each (a worker loads the same dataset and trains the same heads; this process
    also held the search). One (this process) on a GPU, where trainings share the device, and for a single
    training.
    """
    if requested < 0:
        raise ValueError(f"final workers must be >= 0 (0: one per thread, at most {AUTO_WORKERS_MAX}), got {requested}")
    if device_type != "cpu" or trainings < 2:
        return 1
    if requested > 0:
        return min(requested, trainings)
    workers = min(torch.get_num_threads(), AUTO_WORKERS_MAX, trainings)
    available, peak = _available_memory(), _peak_memory()
    if available is not None and peak > 0:
        workers = min(workers, int(MEMORY_SHARE * available // peak))
    return max(1, workers)


MEMORY_SHARE = 0.8  # of the memory available that automatic workers may take, each at this process's peak


def _available_memory() -> float | None:
    """Bytes the kernel reports available (Linux's ``MemAvailable``); None where it is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_memory() -> float:
    """This process's peak resident size in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class FinalTraining:
    """One (finalist, seed) training of the final scoring."""

    position: str  # where the finalist stands among them, e.g. "3/20"
    label: str  # e.g. "huffman-4, seed 1/3 (test split)"
    tree: Tree
    projections: Mapping[int, int] | None
    recipe: NodeRecipe


def train_finalists(
    trainings: Sequence[FinalTraining],
    dataset,
    env_config: Mapping[str, Any],
    workers: int,
    record: Callable[[int, float, np.ndarray], None],
    log: Callable[[str], None] | None,
    folder: Path,
) -> None:
    """Train and score each of ``trainings`` on test (`score_test`), here or in ``workers`` processes.

    ``record(i, test_nll, test_row_nll)`` is called in this process as training ``i`` finishes (in order here,
    as they finish in a pool). ``env_config`` loads ``dataset`` in the workers; ``folder`` is the run's, named
    when a worker dies.
    """
    if workers == 1:
        for i, training in enumerate(trainings):
            if log:
                log(f"final scoring {training.position}: {training.label}")
            result = score_test(training.tree, dataset, training.recipe, projections=training.projections)
            record(i, result["test_nll"], result["test_row_nll"])
        return
    if log:
        log(f"final scoring: {len(trainings)} trainings in {workers} processes")
    with ScoringPool(env_config, workers) as pool:
        futures = {pool.submit(t.tree, t.recipe, t.projections): i for i, t in enumerate(trainings)}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                test_nll, row_nll = future.result()
            except BrokenProcessPool as error:
                raise RunError(f"{folder}: a final scoring process died ({error}); the {done - 1} scores finished "
                               "are kept in final.json: compare again to finish (--workers 1 trains in this "
                               "process)") from None  # fmt: skip
            record(futures[future], test_nll, row_nll)
            if log:
                log(f"final scoring {done}/{len(trainings)} done: {trainings[futures[future]].label}")


class ScoringPool:
    """Worker processes that each load the dataset once and run `score_test` for (tree, recipe) tasks.

    The threads of this process are shared out among the workers. Use as a context manager: leaving it
    by an exception (Ctrl-C included) cancels the tasks not started and stops the workers at once.
    """

    def __init__(self, env_config: Mapping[str, Any], workers: int) -> None:
        threads = max(1, torch.get_num_threads() // workers)
        self._known = set(multiprocessing.active_children())
        spawn = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads
        self._executor = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker,
                                             initargs=(dict(env_config), threads))  # fmt: skip

    def submit(self, tree: Tree, recipe: NodeRecipe, projections: Mapping[int, int] | None) -> Future:
        """A future of ``(test_nll, test_row_nll)``, `score_test`'s values for the tree trained by ``recipe``."""
        return self._executor.submit(_score, tree, recipe, dict(projections) if projections else None)

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self._executor.shutdown(wait=True)
            return
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in set(multiprocessing.active_children()) - self._known:  # this pool's workers
            process.terminate()  # a running training would otherwise finish first


_dataset = None  # the worker's dataset, loaded once by `_start_worker`


def _start_worker(env_config: dict[str, Any], threads: int) -> None:
    global _dataset
    from tree_search.envs import TreeEnvConfig, load_env_dataset

    torch.set_num_threads(threads)
    one_blas_thread()
    _dataset = load_env_dataset(TreeEnvConfig.from_env_config(env_config))


def _score(tree: Tree, recipe: NodeRecipe, projections: dict[int, int] | None) -> tuple[float, np.ndarray]:
    result = score_test(tree, _dataset, recipe, projections=projections)
    return result["test_nll"], result["test_row_nll"]


def write_best_head(path: Path, tree, projections, dataset, recipe, row: dict[str, Any], setting: dict[str, Any],
                    log: Callable[[str], None] | None = None,
                    bias_free_nodes: Sequence[int] | None = None) -> float:  # fmt: skip
    """Train (or read from the node bank) the head of ``row``'s tree under ``recipe`` and save it to ``path``.

    ``bias_free_nodes`` are trained without biases (`trained_head`). Returns the head's NLL on
    the whole test split, also kept in its metadata (``test_nll``). Skipped when ``path``
    already holds that tree under the same setting.
    """
    metadata = {"tree": row["name"], "key": row["key"], "setting": json.dumps(setting, sort_keys=True),
                "seed": int(recipe.seed), "valid_nll": float(row["valid_nll"]),
                "test_nll_mean": float(row["test_nll"])}  # fmt: skip
    if path.exists():
        try:
            old = TreeSoftmaxHead.load(path).metadata
        except (ValueError, RuntimeError, OSError):
            old = {}
        if old.get("key") == metadata["key"] and old.get("setting") == metadata["setting"] and "test_nll" in old:
            return float(old["test_nll"])
    if log:
        biases = " (tail clusters without biases)" if bias_free_nodes else ""
        log(f"best head: {row['name']} with the weights of its first final seed{biases} -> {path}")
    head = trained_head(tree, dataset, recipe, projections=projections or None, bias_free_nodes=bias_free_nodes)
    metadata["test_nll"] = _test_nll(head, dataset, recipe.seed)
    head.save(path, labels=dataset.vocab.tokens, counts=dataset.counts, metadata=metadata)
    return metadata["test_nll"]


def _test_nll(head: TreeSoftmaxHead, dataset, seed: int) -> float:
    """The head's mean NLL over the whole test split (the rows `score_test` scores)."""
    device = next(head.parameters()).device
    test = split_sample(dataset, "test", None, seed, device)
    return validation_nll(head, test.features.float(), torch.from_numpy(test.labels).to(device))
