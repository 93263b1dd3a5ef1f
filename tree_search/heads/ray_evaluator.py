"""`RayEvaluator`: the `Evaluator` interface over a pool of Ray actors, on one machine or a cluster.

The dataset is put into Ray's object store once; each actor (``cpus_per_eval`` CPUs and
``gpus_per_eval`` of a GPU, so several evaluations can share one GPU) maps it and trains
heads with `tree_search.heads.evaluate`. Searchers do not change: `evaluate` blocks the
calling thread only, so a searcher that runs several threads (Optuna with ``parallel``)
keeps every actor busy. Deduplication and the budget are enforced across threads: a tree
is never trained twice, even when two threads propose it at once, and evaluations in
flight count against the budget. An actor that dies (killed, out of memory, node lost)
is replaced and its evaluation retried up to ``max_retries`` times, then recorded as
failed with the error. Pruning callbacks cannot cross processes and are not used here.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError

from tree_search.data.features import FeatureDataset
from tree_search.heads.evaluator import BudgetExhausted, Evaluation, Evaluator, Listener, evaluation_key, failed_result
from tree_search.heads.reward import Result
from tree_search.heads.train import Callback, TrainConfig
from tree_search.tree import Tree

__all__ = ["EvaluationWorker", "EvaluatorClosed", "RayEvaluator", "ensure_ray"]


class EvaluatorClosed(RuntimeError):
    """Raised in threads still waiting on an evaluation when the evaluator is closed."""


_DIED = (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)


def ensure_ray(address: str | None = None) -> None:
    """Connect to Ray: ``address`` ("auto", "ray://host:port", "host:port") or a new local instance."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(  # "local": a new instance, even when `ray start` left a cluster address behind on this machine
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )


class EvaluationWorker:
    """A Ray actor that trains heads on its copy of the dataset (mapped from the object store)."""

    def __init__(self, dataset: FeatureDataset, threads: int) -> None:
        """Args: dataset: resolved by Ray from the object store; threads: torch threads of this actor."""
        import torch

        torch.set_num_threads(max(1, threads))
        self.dataset = dataset

    def evaluate(
        self, tree: Tree, projections: dict[int, int] | None, train: TrainConfig, seeds: int
    ) -> dict[str, Any]:
        """`tree_search.heads.evaluate` on this actor's device; the `Result` as JSON."""
        from tree_search.heads.reward import evaluate

        return evaluate(tree, self.dataset, train, seeds=seeds, projections=projections).to_json()

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node the actor runs on."""
        return ray.get_runtime_context().get_node_id()


class RayEvaluator(Evaluator):
    """Evaluations on ``workers`` Ray actors; thread-safe; replaces dead actors and retries."""

    thread_safe = True

    def __init__(
        self,
        dataset: FeatureDataset,
        train: TrainConfig = TrainConfig(),
        seeds: int = 1,
        budget: int | None = None,
        listeners: Sequence[Listener] = (),
        *,
        workers: int = 1,
        cpus_per_eval: float = 1,
        gpus_per_eval: float = 0,
        max_retries: int = 2,
        address: str | None = None,
    ) -> None:
        """Args: see `LocalEvaluator`; workers: actors; cpus/gpus_per_eval: resources of each; address: Ray."""
        super().__init__(budget, listeners)
        if workers < 1 or max_retries < 0 or cpus_per_eval <= 0 or gpus_per_eval < 0:
            raise ValueError("RayEvaluator needs workers >= 1, max_retries >= 0, cpus_per_eval > 0, gpus_per_eval >= 0")
        ensure_ray(address)
        self.train, self.seeds, self.max_retries = train, seeds, max_retries
        self._actor_class = ray.remote(num_cpus=cpus_per_eval, num_gpus=gpus_per_eval, max_restarts=0)(EvaluationWorker)
        self._threads = max(1, int(cpus_per_eval))
        self._dataset_ref = ray.put(dataset)  # once; every actor maps it from the object store
        self._idle: queue.Queue = queue.Queue()
        self._closed = False
        self.workers = workers
        self.actors = [self._new_actor() for _ in range(workers)]
        for actor in self.actors:
            self._idle.put(actor)
        self._lock = threading.RLock()
        self._in_flight: dict[str, threading.Event] = {}
        self._in_flight_counted = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evaluation")
        self._futures: dict[int, Future] = {}
        self._tickets = 0

    def _new_actor(self):
        return self._actor_class.remote(self._dataset_ref, self._threads)

    @property
    def remaining(self) -> int | None:
        """Evaluations left, counting those in flight."""
        if self.budget is None:
            return None
        return max(0, self.budget - self.used - self._in_flight_counted)

    def evaluate(
        self,
        tree: Tree,
        projections: Mapping[int, int] | None = None,
        *,
        searcher: str = "",
        counted: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> Evaluation:
        """Evaluate on a free actor (waiting for one), blocking only the calling thread."""
        key = evaluation_key(tree, projections)
        while True:
            with self._lock:
                if key in self.known:
                    self.counters["cached"] += 1
                    known = self.known[key]
                    return replace(known, searcher=searcher or known.searcher, counted=False)
                pending = self._in_flight.get(key)
                if pending is None:
                    if counted and self.exhausted:
                        raise BudgetExhausted(f"the budget of {self.budget} evaluations is used up")
                    done = self._in_flight[key] = threading.Event()
                    self._in_flight_counted += int(counted)
                    break
            pending.wait()  # the same tree is being trained by another thread: wait and reuse it
            with self._lock:
                if key not in self.known:  # it failed there: train it here
                    continue
        started = time.perf_counter()
        try:
            result = self._run(tree, projections)
        except BaseException:
            with self._lock:  # nothing recorded: release the budget and let waiters train it themselves
                self._in_flight_counted -= int(counted)
                del self._in_flight[key]
                done.set()
            raise
        with self._lock:  # one step, so no thread ever sees the evaluation neither in flight nor recorded
            self._in_flight_counted -= int(counted)
            self.counters["worker_seconds"] += time.perf_counter() - started
            self.counters["failed" if result.error else "done"] += 1
            evaluation = self._record(key, result, tree, searcher, counted, projections)
            del self._in_flight[key]
            done.set()
        return evaluation

    def _run(self, tree: Tree, projections: Mapping[int, int] | None) -> Result:
        error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            actor = self._idle.get()
            try:
                data = ray.get(actor.evaluate.remote(tree, dict(projections or {}) or None, self.train, self.seeds))
            except _DIED as err:
                error = err
                if self._closed:  # close() killed it: stopping, nothing to record or replace
                    raise EvaluatorClosed("the evaluator was closed during this evaluation") from err
                ray.kill(actor)  # an unavailable actor may still hold its CPUs and GPU share
                with self._lock:
                    if attempt < self.max_retries:
                        self.counters["retried"] += 1
                    replacement = self._new_actor()
                    self.actors = [replacement if a is actor else a for a in self.actors]
                self._idle.put(replacement)
                continue
            except RayTaskError as err:  # the evaluation itself raised (bad input): a failed result, actor intact
                self._idle.put(actor)
                cause = err.cause if getattr(err, "cause", None) is not None else err
                return failed_result(tree, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}")
            self._idle.put(actor)
            return Result.from_json(data)
        message = str(error).strip().splitlines()[0] if error is not None else "unknown"
        return failed_result(
            tree, f"evaluation worker died {self.max_retries + 1} times: {type(error).__name__}: {message}"
        )

    def submit(
        self,
        tree: Tree,
        projections: Mapping[int, int] | None = None,
        *,
        searcher: str = "",
        counted: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> int:
        """Queue an evaluation on the pool; `collect` returns it when done."""
        with self._lock:
            key = evaluation_key(tree, projections)
            if counted and self.exhausted and key not in self.known and key not in self._in_flight:
                raise BudgetExhausted(f"the budget of {self.budget} evaluations is used up")
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._futures[ticket] = self._pool.submit(
                self.evaluate, tree, projections, searcher=searcher, counted=counted
            )
        return ticket

    def collect(self, wait: bool = True) -> dict[int, Evaluation]:
        """Finished submissions (waiting for at least one when ``wait`` and any is pending)."""
        with self._lock:
            futures = dict(self._futures)
        if wait and futures:
            wait_for(list(futures.values()), return_when=FIRST_COMPLETED)
        done = {}
        with self._lock:
            for ticket, future in futures.items():
                if future.done():
                    done[ticket] = future.result()
                    del self._futures[ticket]
        return done

    def nodes(self) -> int:
        """How many Ray nodes the actors run on."""
        return len(set(ray.get([actor.node.remote() for actor in self.actors])))

    def close(self) -> None:
        """Stop the actors (the Ray instance stays up)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for actor in self.actors:
            ray.kill(actor)
