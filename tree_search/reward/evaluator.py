"""The one way searchers get rewards: an `Evaluator` (submit trees, collect results).

Life cycle: ``submit(tree)`` returns a ticket; ``collect()`` returns the `Evaluation` of
every ticket that finished since the last call. A tree whose canonical hash (with its
projections) was evaluated before, in this run or in the run being resumed, is answered
from memory and does not count against the budget; with `Evaluator.scope` set (a front
search at equal budgets, ``SearchConfig.share_caps=False``), only trees that the scope's own
searcher or the baselines evaluated are free, and any other known tree is answered from
memory but counted. Node losses a searcher's dense rewards reveal outside evaluations count
too, in evaluation-equivalents (`Evaluator.charge_nodes`). `LocalEvaluator` trains in this
process, one tree at a time; a pool of Ray actors can implement the same interface
without the searchers noticing. An `Evaluator` is also a `RewardFunction`
(``evaluator(tree, projections) -> Result``), which is how environments call it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from tree_search.data.features import FeatureDataset, default_device
from tree_search.heads.train import Callback
from tree_search.reward.decode_cap import fits_decode_cap
from tree_search.reward.node_train import NodeRecipe
from tree_search.reward.reward import Result, evaluate, node_nll_shares, node_weights
from tree_search.tree import Tree

__all__ = ["BudgetExhausted", "Evaluation", "Evaluator", "LocalEvaluator", "evaluation_key", "failed_result"]


class BudgetExhausted(RuntimeError):
    """Raised by `Evaluator.submit` when the evaluation budget is used up."""


def evaluation_key(tree: Tree, projections: Mapping[int, int] | None = None) -> str:
    """Identity of an evaluation: the canonical tree hash, plus projections when there are any.

    Projections name internal nodes, which canonicalisation may renumber, so trees with
    projections are keyed by their exact structure's hash.
    """
    if not projections:
        return tree.canonical_hash
    digest = hashlib.sha256(tree.child_ptr.tobytes() + tree.child_ids.tobytes())
    digest.update(",".join(f"{n}:{p}" for n, p in sorted(projections.items())).encode())
    return f"{tree.canonical_hash}+{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class Evaluation:
    """One row of a run's leaderboard: a tree, who proposed it, and its validation result."""

    index: int  # order of arrival in the run (0, 1, ...)
    key: str  # `evaluation_key`
    searcher: str  # who proposed the tree ("tpe", "ppo", "baseline:huffman-2", ...)
    valid_nll: float  # nats/token on the validation split (inf when failed)
    valid_nll_stderr: float
    expected_cost: float  # per token, in the run's cost model: multiply-adds, or seconds (``--cost measured``)
    cost_ratio: float  # expected_cost / the full softmax's
    max_depth: int
    wall_seconds: float  # seconds since the run started when the result arrived
    train_seconds: float
    counted: bool  # whether it used the searcher's budget (baselines and repeats do not)
    pruned: bool = False  # stopped early by a pruner: a partial measurement
    nodes_trained: int = 0  # internal nodes trained for this evaluation (the node bank lacked them)
    nodes_reused: int = 0  # internal nodes whose results came from the node bank
    error: str | None = None
    projections: dict[int, int] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # the full `Result`, as JSON
    decode_vs_huffman: float = math.nan  # predicted decoding time / binary Huffman's, under a decoding cap (else NaN)

    @property
    def ok(self) -> bool:
        """A complete, successful measurement."""
        return self.error is None and not self.pruned and math.isfinite(self.valid_nll)

    def within_decode_cap(self, cap: float) -> bool:
        """Whether the tree fits a decoding cap of ``cap`` x binary Huffman's time (0: no cap; unknown: no)."""
        return fits_decode_cap(self.decode_vs_huffman, cap)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (infinities as null)."""
        out = asdict(self)
        for name in ("valid_nll", "valid_nll_stderr", "decode_vs_huffman"):
            if not math.isfinite(out[name]):
                out[name] = None
        out["projections"] = {str(k): v for k, v in self.projections.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        """Inverse of `to_json`."""
        values = dict(data)
        for name in ("valid_nll", "valid_nll_stderr"):
            if values.get(name) is None:
                values[name] = math.inf
        if values.get("decode_vs_huffman", math.nan) is None:
            values["decode_vs_huffman"] = math.nan
        values["projections"] = {int(k): int(v) for k, v in (values.get("projections") or {}).items()}
        return cls(**values)


Listener = Callable[[Evaluation, Tree], None]


class Evaluator(ABC):
    """Submit trees, collect their evaluations; dedup by `evaluation_key`; count a budget.

    Deduplication and the budget live here, once, for every implementation, and hold
    across threads: a tree is never trained twice, even when two threads propose it at
    once (the second waits for the first's result), and evaluations in flight count
    against the budget. Implementations only say how one tree is scored (`_compute`) and,
    when they run evaluations concurrently, override `submit` / `collect`.
    """

    def __init__(self, budget: int | None = None, listeners: Sequence[Listener] = ()) -> None:
        """Args: budget: new evaluations allowed (None: unlimited); listeners: called on each new result."""
        self.budget = budget
        self.listeners = list(listeners)
        self.known: dict[str, Evaluation] = {}
        self.used = 0  # counted evaluations so far (including a resumed run's)
        # evaluation-equivalents of node losses revealed outside evaluations, by searcher label (`charge_nodes`)
        self.charged: dict[str, float] = {}
        self._charged_keys: defaultdict[str, set[str]] = defaultdict(set)  # searcher label -> trees it was charged
        self.on_charge: Callable[[dict[str, Any]], None] | None = None  # told `charges()` at every new charge
        # None: every known tree is free; a searcher label: only trees it or the baselines evaluated are
        self.scope: str | None = None
        self._counted_keys: defaultdict[str, set[str]] = defaultdict(set)  # searcher label -> keys it paid for
        self._free_keys: set[str] = set()  # keys evaluated without counting (the baselines)
        self._found_classics: set[tuple[str, str]] = set()  # (searcher, key): a searcher proposed a baseline's tree
        self.started = time.perf_counter()
        self._next_index = 0
        self.counters = {"done": 0, "failed": 0, "retried": 0, "cached": 0, "worker_seconds": 0.0,
                         "nodes_trained": 0, "nodes_reused": 0}  # fmt: skip
        self.workers = 1  # evaluations that can run at once
        self.gpus_per_evaluation = 0.0  # GPU share an evaluation holds (for the GPU-seconds counter)
        self._lock = threading.RLock()
        self._in_flight: dict[str, threading.Event] = {}
        self._in_flight_counted = 0
        self._done: dict[int, Evaluation] = {}
        self._tickets = 0
        # ``(expected cost, ratio to the full softmax)`` of a tree under the run's cost model (None: the
        # reward's multiply-adds, as `Result` has them)
        self.cost_fn: Callable[[Tree, Mapping[int, int] | None], tuple[float, float]] | None = None
        self.decode_ratio_fn: Callable[[Tree, Mapping[int, int] | None], float] | None = None  # under a decoding cap

    thread_safe = True  # several threads may call `evaluate` at once

    def stats(self) -> dict[str, float]:
        """Counters for TensorBoard and the report: done, failed, retried, cached, worker and GPU seconds, rate."""
        minutes = (time.perf_counter() - self.started) / 60
        per_minute = self.counters["done"] / max(minutes, 1e-9)
        gpu_seconds = self.counters["worker_seconds"] * self.gpus_per_evaluation
        return {**self.counters, "gpu_seconds": gpu_seconds, "workers": self.workers,
                "evaluations_per_minute": per_minute}  # fmt: skip

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers (nothing to do in process)."""

    @property
    def remaining(self) -> int | None:
        """Whole evaluations left in the budget, counting those in flight and the charges (None: unlimited)."""
        if self.budget is None:
            return None
        left = self.budget - self.used - self._in_flight_counted - math.fsum(self.charged.values())
        return max(0, math.floor(left + 1e-9))

    def node_shares(self, tree: Tree, projections: Mapping[int, int] | None = None) -> np.ndarray:
        """(I, 2) each internal node's share of an evaluated ``tree``'s validation NLL, per validation half.

        The terms `evaluate` sums, under this evaluator's recipe and seeds (mean over seeds;
        `tree_search.reward.node_nll_shares`), for searchers that plan with them (dp). The local and the
        Ray evaluators give them (the Ray one computes them on an actor).
        """
        raise NotImplementedError(f"{type(self).__name__} gives no per-node shares, which dp and jtm plan with")

    def node_weights(self, tree: Tree, projections: Mapping[int, int] | None = None) -> dict[int, tuple]:
        """Each internal node's trained weights for an evaluated ``tree`` (`tree_search.reward.node_weights`).

        As `node_shares`: under this evaluator's recipe, for searchers that re-assign classes (jtm).
        """
        raise NotImplementedError(f"{type(self).__name__} gives no node weights, which jtm re-assigns classes with")

    def knows(self, key: str) -> bool:
        """Whether the tree of ``key`` is answered from memory without counting (see `scope`)."""
        if key not in self.known:
            return False
        return self.scope is None or key in self._free_keys or key in self._counted_keys[self.scope]

    def charge_nodes(
        self, tree: Tree, projections: Mapping[int, int] | None, nodes_revealed: int, *, searcher: str = ""
    ) -> float:
        """Count node losses of ``tree`` revealed outside an evaluation (dense rewards) against the budget.

        An evaluation reveals the losses of all of a tree's internal nodes, so ``nodes_revealed``
        of them cost ``nodes_revealed / tree.num_internal`` of an evaluation (at most 1), whether
        the node bank had them or trained them then: the accounting does not depend on what
        other searches left in the bank. Nothing is charged when ``searcher`` has a counted
        evaluation of the tree (it paid for every node) or was charged for the tree before.
        Returns the charge.
        """
        label = searcher or self.default_searcher
        key = evaluation_key(tree, projections)
        with self._lock:
            if nodes_revealed <= 0 or key in self._counted_keys[label] or key in self._charged_keys[label]:
                return 0.0
            charge = min(1.0, nodes_revealed / max(1, tree.num_internal))
            self.charged[label] = self.charged.get(label, 0.0) + charge
            self._charged_keys[label].add(key)
            if self.on_charge is not None:  # under the lock: the last write holds every charge
                self.on_charge(self.charges())
        return charge

    def charges(self) -> dict[str, Any]:
        """The charges as JSON (`restore_charges` reads it back): per label, the total and the trees charged."""
        return {label: {"charged": total, "trees": sorted(self._charged_keys[label])}
                for label, total in self.charged.items()}  # fmt: skip

    def restore_charges(self, data: Mapping[str, Any] | None) -> None:
        """Know the charges of a run being resumed (`charges`' JSON)."""
        for label, entry in (data or {}).items():
            self.charged[str(label)] = float(entry["charged"])
            self._charged_keys[str(label)] = set(entry["trees"])

    @property
    def exhausted(self) -> bool:
        """True when no counted evaluation is left."""
        return self.remaining == 0

    def preload(self, evaluations: Sequence[Evaluation]) -> None:
        """Know the results of a run being resumed: they are not evaluated again."""
        for evaluation in evaluations:
            if evaluation.error is None:  # failures are retried when proposed again, as within a session
                self.known.setdefault(evaluation.key, evaluation)
            self._remember(evaluation)
            self.used += int(evaluation.counted)
            self._next_index = max(self._next_index, evaluation.index + 1)

    @abstractmethod
    def _compute(
        self, tree: Tree, projections: Mapping[int, int] | None, callbacks: Sequence[Callback]
    ) -> tuple[Result, float | None]:
        """Score one new tree: its `Result`, and the worker seconds it took (None: the time waited for it)."""

    def _remember(self, evaluation: Evaluation) -> None:
        """Note who paid for ``evaluation`` (`knows`, `charge_nodes`)."""
        if evaluation.counted:
            self._counted_keys[evaluation.searcher].add(evaluation.key)
        elif evaluation.error is None:
            self._free_keys.add(evaluation.key)

    def _finds_a_classic(self, known: Evaluation, searcher: str) -> bool:
        """Whether ``searcher`` proposes a classic tree (a baseline's) for the first time: it found that tree.

        Such a tree is one of the search's own (uncounted: the baselines paid for it), so that
        its finalist can be a classic tree when that is what it found best.
        """
        if not searcher or searcher.startswith("baseline:") or not known.searcher.startswith("baseline:"):
            return False
        if (searcher, known.key) in self._found_classics:
            return False
        self._found_classics.add((searcher, known.key))
        return True

    def _announce(self, evaluation: Evaluation, tree: Tree) -> Evaluation:
        """Give ``evaluation`` the next index and tell the listeners (the run's leaderboard), recording nothing else."""
        self._next_index += 1
        for listener in self.listeners:
            listener(evaluation, tree)
        return evaluation

    def _check_budget(self, key: str, counted: bool) -> None:
        """Raise `BudgetExhausted` when a counted, new tree would exceed the budget."""
        if counted and self.exhausted and not self.knows(key) and key not in self._in_flight:
            raise BudgetExhausted(f"the budget of {self.budget} evaluations is used up")

    def evaluate(
        self,
        tree: Tree,
        projections: Mapping[int, int] | None = None,
        *,
        searcher: str = "",
        counted: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> Evaluation:
        """Evaluate ``tree`` (or answer from what is known), blocking only the calling thread.

        Raises:
            BudgetExhausted: a counted, new tree and no evaluation left.
        """
        key = evaluation_key(tree, projections)
        while True:
            with self._lock:
                if self.knows(key):
                    self.counters["cached"] += 1
                    known = self.known[key]
                    if self._finds_a_classic(known, searcher):
                        return self._announce(replace(known, index=self._next_index, searcher=searcher,
                                                      counted=False), tree)  # fmt: skip
                    return replace(known, searcher=searcher or known.searcher, counted=False)
                if key in self.known:  # known outside the scope: answered from memory, counted in it
                    self._check_budget(key, counted)
                    self.counters["cached"] += 1
                    known = self.known[key]
                    return self._record(key, Result.from_json(known.result), tree, searcher, counted, projections)
                pending = self._in_flight.get(key)
                if pending is None:
                    self._check_budget(key, counted)
                    done = self._in_flight[key] = threading.Event()
                    self._in_flight_counted += int(counted)
                    break
            pending.wait()  # the same tree is being trained by another thread: wait and reuse it
            with self._lock:
                if key not in self.known:  # it failed there: train it here
                    continue
        started = time.perf_counter()
        try:
            result, busy = self._compute(tree, projections, callbacks)
        except BaseException:
            with self._lock:  # nothing recorded: release the budget and let waiters train it themselves
                self._in_flight_counted -= int(counted)
                del self._in_flight[key]
                done.set()
            raise
        with self._lock:  # one step, so no thread ever sees the evaluation neither in flight nor recorded
            self._in_flight_counted -= int(counted)
            self.counters["worker_seconds"] += busy if busy is not None else time.perf_counter() - started
            self.counters["failed" if result.error else "done"] += 1
            self.counters["nodes_trained"] += int(result.extra.get("nodes_trained", 0))
            self.counters["nodes_reused"] += int(result.extra.get("nodes_reused", 0))
            evaluation = self._record(key, result, tree, searcher, counted, projections)
            del self._in_flight[key]
            done.set()
        return evaluation

    def submit(
        self,
        tree: Tree,
        projections: Mapping[int, int] | None = None,
        *,
        searcher: str = "",
        counted: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> int:
        """Queue ``tree``; returns a ticket. Raises `BudgetExhausted` when a counted tree is new and none is left.

        This default evaluates at once, in the calling thread; `collect` hands the result over.
        """
        evaluation = self.evaluate(tree, projections, searcher=searcher, counted=counted, callbacks=callbacks)
        with self._lock:
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._done[ticket] = evaluation
        return ticket

    def collect(self, wait: bool = True) -> dict[int, Evaluation]:
        """``{ticket: evaluation}`` of the submissions finished since the last call."""
        with self._lock:
            done, self._done = self._done, {}
        return done

    def reward(
        self,
        tree: Tree,
        projections: Mapping[int, int] | None = None,
        *,
        searcher: str | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> tuple[Result, Evaluation | None]:
        """What an environment needs: a `Result` (failed past the budget, never raising) and the `Evaluation`."""
        try:
            evaluation = self.evaluate(
                tree, projections, searcher=searcher or self.default_searcher, callbacks=callbacks
            )
        except BudgetExhausted:  # also when another thread took the last evaluation in the meantime
            return failed_result(tree, "budget exhausted: the search's evaluation budget is used up"), None
        result = Result.from_json(evaluation.result) if evaluation.result else failed_result(tree, evaluation.error)
        return result, evaluation

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """`RewardFunction` for environments (see `reward`)."""
        return self.reward(tree, projections)[0]

    default_searcher = ""  # the searcher name environments' evaluations are recorded under

    def _costs(self, tree: Tree, projections, result: Result) -> tuple[float, float]:
        if self.cost_fn is None:
            return result.expected_cost, result.cost_ratio
        return self.cost_fn(tree, projections or None)

    def _record(self, key: str, result: Result, tree: Tree, searcher: str, counted: bool, projections) -> Evaluation:
        """Turn a fresh `Result` into an `Evaluation`, remember it and tell the listeners."""
        cost, ratio = self._costs(tree, projections, result)
        evaluation = Evaluation(
            index=self._next_index,
            key=key,
            searcher=searcher,
            valid_nll=result.valid_nll,
            valid_nll_stderr=result.valid_nll_stderr,
            expected_cost=cost,
            cost_ratio=ratio,
            max_depth=tree.max_depth,
            wall_seconds=time.perf_counter() - self.started,
            train_seconds=result.train_seconds,
            counted=counted,
            pruned=bool(result.extra.get("pruned")),
            nodes_trained=int(result.extra.get("nodes_trained", 0)),
            nodes_reused=int(result.extra.get("nodes_reused", 0)),
            error=result.error,
            projections={int(k): int(v) for k, v in (projections or {}).items()},
            result=result.to_json(),
            decode_vs_huffman=self.decode_ratio_fn(tree, projections or None) if self.decode_ratio_fn else math.nan,
        )
        self._next_index += 1
        self.used += int(counted)
        self._remember(evaluation)
        if evaluation.error is None:  # failures may be transient: retried if proposed again; pruned ones are not
            self.known[key] = evaluation
        for listener in self.listeners:
            listener(evaluation, tree)
        return evaluation


def failed_result(tree: Tree, error: str | None) -> Result:
    """A `Result` recording that ``tree`` could not be evaluated, and why."""
    return Result(tree.canonical_hash, math.inf, math.inf, math.inf, math.nan, math.nan, 0.0, 0.0, 0.0, 0, "", (), (),
                  error=error or "failed")  # fmt: skip


class LocalEvaluator(Evaluator):
    """Scores trees in this process with `tree_search.reward.evaluate` (through the node bank)."""

    thread_safe = False  # correct from several threads, but torch already uses the cores: searchers go serially

    def __init__(
        self,
        dataset: FeatureDataset,
        train: NodeRecipe = NodeRecipe(),
        seeds: int = 1,
        budget: int | None = None,
        listeners: Sequence[Listener] = (),
        device: str | None = None,
        node_bank: bool = True,
        top_k_samples: int = 0,
    ) -> None:
        """Args: dataset, train, seeds, top_k_samples: what `evaluate` gets; node_bank: reuse trained nodes.

        See `Evaluator`.
        """
        super().__init__(budget, listeners)
        self.dataset, self.train, self.seeds, self.device, self.node_bank = dataset, train, seeds, device, node_bank
        self.top_k_samples = int(top_k_samples)
        on_gpu = (torch.device(device) if device is not None else default_device()).type == "cuda"
        self.gpus_per_evaluation = 1.0 if on_gpu else 0.0

    def node_shares(self, tree: Tree, projections: Mapping[int, int] | None = None) -> np.ndarray:  # noqa: D102
        shares, _ = node_nll_shares(tree, self.dataset, self.train, seeds=self.seeds, projections=projections,
                                    device=self._torch_device, node_bank=self.node_bank, halves=True)  # fmt: skip
        return shares

    def node_weights(self, tree: Tree, projections: Mapping[int, int] | None = None) -> dict[int, tuple]:  # noqa: D102
        return node_weights(tree, self.dataset, self.train, projections=projections, device=self._torch_device,
                            node_bank=self.node_bank)  # fmt: skip

    @property
    def _torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device is not None else default_device()

    def _compute(
        self, tree: Tree, projections: Mapping[int, int] | None, callbacks: Sequence[Callback]
    ) -> tuple[Result, float | None]:
        result = evaluate(tree, self.dataset, self.train, seeds=self.seeds, device=self.device, callbacks=callbacks,
                          projections=projections, node_bank=self.node_bank,
                          top_k_samples=self.top_k_samples)  # fmt: skip
        return result, None
