"""`RayEvaluator`: the `Evaluator` interface over a pool of Ray actors, on one machine or a cluster.

The dataset is put into Ray's object store once; each actor (``cpus_per_eval`` CPUs and
``gpus_per_eval`` of a GPU, so several evaluations can share one GPU) maps it and trains
heads with `tree_search.reward.evaluate`. Searchers do not change: `evaluate` blocks the
calling thread only, so a searcher that runs several threads (Optuna with ``parallel``)
keeps every actor busy. Deduplication and the budget are enforced across threads: a tree
is never trained twice, even when two threads propose it at once, and evaluations in
flight count against the budget. An actor that dies (killed, out of memory, node lost)
is replaced and its evaluation retried up to ``max_retries`` times, then recorded as
failed with the error.

Training callbacks (an Optuna pruner) stay in the driver: the actor sends each
validation measurement to a small report channel (an asynchronous actor), the driver
thread that waits for the evaluation runs the callbacks and sends back whether to stop,
so a pruner decides exactly as it would in process. With ``batch > 1``, evaluations
without callbacks that wait for an actor at the same time go to it in one call.
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError

from tree_search.data.features import FeatureDataset
from tree_search.distributed.ray_channel import start_channel
from tree_search.heads.train import Callback, EvalPoint
from tree_search.reward.blas import one_blas_thread
from tree_search.reward.evaluator import Evaluation, Evaluator, Listener, evaluation_key, failed_result
from tree_search.reward.node_train import NodeRecipe
from tree_search.reward.reward import Result
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
        # the "ray" logger passes INFO on; which of it reaches the screen is its handlers' choice (the command line
        # sends it to the run's log file only: `tree_search.cli.app.library_logs`)
        ray.init(address=address, log_to_driver=False, logging_level="INFO")
    else:
        ray.init(  # "local": a new instance, even when `ray start` left a cluster address behind on this machine
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="INFO",
        )


class EvaluationWorker:
    """A Ray actor that trains heads on its copy of the dataset (mapped from the object store)."""

    def __init__(self, dataset: FeatureDataset, threads: int) -> None:
        """Args: dataset: resolved by Ray from the object store; threads: torch threads of this actor."""
        import torch

        torch.set_num_threads(max(1, threads))
        one_blas_thread()
        self.dataset = dataset

    def evaluate(
        self,
        tree: Tree,
        projections: dict[int, int] | None,
        train: NodeRecipe,
        seeds: int,
        reporter: tuple[Any, int] | None = None,
        node_bank: bool = True,
    ) -> dict[str, Any]:
        """`tree_search.reward.evaluate` on this actor's device; the `Result` as JSON.

        ``reporter`` (a report channel and a request id): each validation measurement is
        sent to the driver, whose answer decides whether training stops.
        """
        from tree_search.reward.reward import evaluate

        callbacks = ()
        if reporter is not None:
            channel, rid = reporter
            callbacks = (lambda point: ray.get(channel.ask.remote(asdict(point), rid)),)
        return evaluate(tree, self.dataset, train, seeds=seeds, projections=projections, callbacks=callbacks,
                        node_bank=node_bank).to_json()  # fmt: skip

    def node_shares(
        self, tree: Tree, projections: dict[int, int] | None, train: NodeRecipe, seeds: int, node_bank: bool
    ) -> np.ndarray:
        """`LocalEvaluator.node_shares` on this actor (its nodes from the node bank, or trained again)."""
        from tree_search.data.features import default_device
        from tree_search.reward.reward import node_nll_shares

        shares, _ = node_nll_shares(tree, self.dataset, train, seeds=seeds, projections=projections,
                                    device=default_device(), node_bank=node_bank, halves=True)  # fmt: skip
        return shares

    def node_weights(
        self, tree: Tree, projections: dict[int, int] | None, train: NodeRecipe, node_bank: bool
    ) -> dict[int, tuple]:
        """`LocalEvaluator.node_weights` on this actor."""
        from tree_search.data.features import default_device
        from tree_search.reward.reward import node_weights

        return node_weights(tree, self.dataset, train, projections=projections, device=default_device(),
                            node_bank=node_bank)  # fmt: skip

    def evaluate_many(self, requests: list[tuple[Tree, dict[int, int] | None, NodeRecipe, int, bool]]) -> list[dict]:
        """Several evaluations in one call: ``{"result": ...}`` or ``{"exception": ...}`` (raised by the caller)."""
        answers = []
        for tree, projections, train, seeds, node_bank in requests:
            try:
                answers.append({"result": self.evaluate(tree, projections, train, seeds, node_bank=node_bank)})
            except Exception as error:  # noqa: BLE001 - one bug must not hide the other results
                answers.append({"exception": error})
        return answers

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def node(self) -> str:
        """The id of the Ray node the actor runs on."""
        return ray.get_runtime_context().get_node_id()


@dataclass
class _Waiting:
    """An evaluation waiting to be put into a batch, and where its answer goes."""

    tree: Tree
    projections: dict[int, int] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | BaseException | None = None
    seconds: float = 0.0  # its share of the actor call's time


class _WorkerDied(Exception):  # noqa: N818 - carries the last error after the retries
    """Evaluation actors died ``max_retries + 1`` times in a row."""


class RayEvaluator(Evaluator):
    """Evaluations on ``workers`` Ray actors; thread-safe; replaces dead actors and retries."""

    thread_safe = True

    def __init__(
        self,
        dataset: FeatureDataset,
        train: NodeRecipe = NodeRecipe(),
        seeds: int = 1,
        budget: int | None = None,
        listeners: Sequence[Listener] = (),
        *,
        workers: int = 1,
        cpus_per_eval: float = 1,
        gpus_per_eval: float = 0,
        max_retries: int = 2,
        address: str | None = None,
        batch: int = 1,
        node_bank: bool = True,
    ) -> None:
        """Start ``workers`` actors.

        Args: see `LocalEvaluator`; workers: actors; cpus/gpus_per_eval: resources of each;
        address: Ray; batch: most evaluations sent to an actor in one call.
        """
        super().__init__(budget, listeners)
        if workers < 1 or max_retries < 0 or cpus_per_eval <= 0 or gpus_per_eval < 0 or batch < 1:
            raise ValueError(
                "RayEvaluator needs workers >= 1, max_retries >= 0, cpus_per_eval > 0, gpus_per_eval >= 0, batch >= 1"
            )
        ensure_ray(address)
        self.train, self.seeds, self.max_retries, self.batch = train, seeds, max_retries, batch
        self.node_bank = node_bank  # the actors share this machine's node bank (see `tree_search.reward.node_bank`)
        self.gpus_per_evaluation = gpus_per_eval
        self._actor_class = ray.remote(num_cpus=cpus_per_eval, num_gpus=gpus_per_eval, max_restarts=0)(EvaluationWorker)
        self._threads = max(1, int(cpus_per_eval))
        self._dataset_ref = ray.put(dataset)  # once; every actor maps it from the object store
        self._idle: queue.Queue = queue.Queue()
        self._closed = False
        self.workers = workers
        self.actors = [self._new_actor() for _ in range(workers)]
        for actor in self.actors:
            self._idle.put(actor)
        self._pool = ThreadPoolExecutor(max_workers=workers * batch, thread_name_prefix="evaluation")
        self._futures: dict[int, Future] = {}
        self._waiting: list[_Waiting] = []  # evaluations waiting to join a batch
        self._channel = None  # the report channel, started with the first evaluation that has callbacks
        self._rids = itertools.count()
        self.counters["batched_calls"] = 0

    def _new_actor(self):
        return self._actor_class.remote(self._dataset_ref, self._threads)

    def _compute(
        self, tree: Tree, projections: Mapping[int, int] | None, callbacks: Sequence[Callback]
    ) -> tuple[Result, float | None]:
        """The result, and the actor time it took when it shared a call (None: the time waited for it).

        An exception raised by the evaluation itself is a bug (training failures come back as
        results): it is raised here, as its own type, so the search stops with its message.
        A worker that keeps dying is a failed evaluation.
        """
        projections = dict(projections or {}) or None
        try:
            if self.batch > 1 and not callbacks:
                return self._run_batched(tree, projections)
            return self._with_actor(lambda actor: self._call(actor, tree, projections, callbacks)), None
        except RayTaskError as error:  # the actor stays intact; the driver sees the original exception
            raise error.as_instanceof_cause() from None
        except _WorkerDied as died:
            return failed_result(tree, str(died)), None

    def node_shares(self, tree: Tree, projections: Mapping[int, int] | None = None) -> np.ndarray:
        """`Evaluator.node_shares`, computed on an actor: from the node bank its evaluation filled.

        On a local cluster the actors share this machine's node bank, so nothing is trained again;
        an actor on another machine trains the nodes its bank lacks, with the same recipe and seeds.
        """
        projections = dict(projections or {}) or None
        return self._on_actor(lambda actor: actor.node_shares.remote(tree, projections, self.train, self.seeds,
                                                                     self.node_bank))  # fmt: skip

    def node_weights(self, tree: Tree, projections: Mapping[int, int] | None = None) -> dict[int, tuple]:
        """`Evaluator.node_weights`, computed on an actor (as `node_shares`)."""
        projections = dict(projections or {}) or None
        return self._on_actor(lambda actor: actor.node_weights.remote(tree, projections, self.train, self.node_bank))

    def _on_actor(self, call):
        """``ray.get(call(actor))`` on an idle actor: an exception it raises is raised here as its own type."""
        try:
            return self._with_actor(lambda actor: ray.get(call(actor)))
        except RayTaskError as error:
            raise error.as_instanceof_cause() from None
        except _WorkerDied as died:
            raise RuntimeError(f"no evaluation actor could compute a tree's node shares: {died}") from None

    def _with_actor(self, work, actor=None):
        """``work(actor)`` on an idle actor (or ``actor``); a dead actor is replaced and the work retried."""
        error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            actor = actor if actor is not None else self._next_idle()
            try:
                out = work(actor)
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
                actor = None
                continue
            except BaseException:
                self._idle.put(actor)
                raise
            self._idle.put(actor)
            return out
        message = str(error).strip().splitlines()[0] if error is not None else "unknown"
        raise _WorkerDied(f"evaluation worker died {self.max_retries + 1} times: {type(error).__name__}: {message}")

    def _next_idle(self):
        """An idle actor (waiting for one); `EvaluatorClosed` once the evaluator is closed."""
        while True:
            if self._closed:
                raise EvaluatorClosed("the evaluator was closed while this evaluation waited for an actor")
            try:
                return self._idle.get(timeout=0.2)
            except queue.Empty:
                continue

    def _call(self, actor, tree: Tree, projections, callbacks: Sequence[Callback]) -> Result:
        """One evaluation on ``actor``, answering its training measurements with ``callbacks`` meanwhile."""
        if not callbacks:
            return Result.from_json(
                ray.get(actor.evaluate.remote(tree, projections, self.train, self.seeds, None, self.node_bank))
            )
        channel, rid = self._report_channel(), next(self._rids)
        reference = actor.evaluate.remote(tree, projections, self.train, self.seeds, (channel, rid), self.node_bank)
        try:
            while not ray.wait([reference], timeout=0)[0]:
                try:
                    points = ray.get(channel.take.remote(rid, 0.1))
                except _DIED as lost:  # not the evaluation actor's fault: do not replace it
                    with self._lock:
                        self._channel = None
                    raise RuntimeError("the channel of training measurements (pruning) was lost") from lost
                for point_id, point in points:
                    stop = True  # also when a callback raises: the actor must not wait for an answer forever
                    try:
                        stop = any([bool(callback(EvalPoint(**point))) for callback in callbacks])
                    finally:
                        channel.answer.remote(point_id, stop)
            return Result.from_json(ray.get(reference))
        finally:
            channel.close_topic.remote(rid, True)  # a measurement still waiting is told to stop

    def _report_channel(self):
        with self._lock:
            if self._channel is None:
                self._channel = start_channel()
            return self._channel

    def _run_batched(self, tree: Tree, projections) -> tuple[Result, float]:
        """Wait in line; whichever waiting thread gets an idle actor sends it the next ``batch`` in line."""
        mine = _Waiting(tree, projections)
        with self._lock:
            self._waiting.append(mine)
        while not mine.done.is_set():
            if self._closed:
                raise EvaluatorClosed("the evaluator was closed while this evaluation waited for an actor")
            try:
                actor = self._idle.get(timeout=0.05)
            except queue.Empty:
                continue
            with self._lock:
                batch, self._waiting = self._waiting[: self.batch], self._waiting[self.batch :]
            if not batch:
                self._idle.put(actor)
                continue
            answers: list[Result | BaseException]
            try:
                answers = self._with_actor(functools.partial(self._call_many, batch=batch), actor)
            except _WorkerDied as died:
                answers = [failed_result(w.tree, str(died)) for w in batch]
            except BaseException as error:  # noqa: BLE001 - raised in every waiting thread, none waits forever
                answers = [error] * len(batch)
            for waiting, answer in zip(batch, answers, strict=True):
                waiting.result = answer
                waiting.done.set()
            if isinstance(answers[0], BaseException) and not isinstance(answers[0], Exception):
                raise answers[0]  # KeyboardInterrupt and the like also stop this thread itself
        if isinstance(mine.result, BaseException):
            raise mine.result
        return mine.result, mine.seconds

    def _call_many(self, actor, *, batch: list[_Waiting]) -> list[Result]:
        requests = [(w.tree, w.projections, self.train, self.seeds, self.node_bank) for w in batch]
        started = time.perf_counter()
        answers = ray.get(actor.evaluate_many.remote(requests))
        for waiting in batch:  # the call's time, shared: worker seconds count the actor's time once
            waiting.seconds = (time.perf_counter() - started) / len(batch)
        with self._lock:
            self.counters["batched_calls"] += 1
        return [Result.from_json(a["result"]) if "result" in a else a["exception"] for a in answers]

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
            self._check_budget(evaluation_key(tree, projections), counted)
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._futures[ticket] = self._pool.submit(
                self.evaluate, tree, projections, searcher=searcher, counted=counted, callbacks=callbacks
            )
        return ticket

    def collect(self, wait: bool = True) -> dict[int, Evaluation]:
        """Finished submissions (waiting for at least one when ``wait`` and any is pending).

        An evaluation that raised (a bug, not a failed training) raises here, once, in a call
        that has no finished result to hand over (so no result is ever lost to it).
        """
        with self._lock:
            futures = dict(self._futures)
        if wait and futures:
            wait_for(list(futures.values()), return_when=FIRST_COMPLETED)
        done, raised = {}, None
        with self._lock:
            for ticket, future in futures.items():
                if not future.done():
                    continue
                if future.exception() is not None:
                    raised = ticket if raised is None else raised
                    continue
                del self._futures[ticket]
                done[ticket] = future.result()
            if done or raised is None:  # the finished results first; an exception when nothing else is left
                return done
            self._futures.pop(raised).result()  # raises it
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
        if self._channel is not None:
            ray.kill(self._channel)
