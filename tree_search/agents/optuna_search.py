"""Optuna searchers (TPE, CMA-ES, random, NSGA-II) driving the environments through ask/tell.

Each trial is one episode: the action of step ``i`` is the integer parameter ``a{i}`` in
``0..n-1``; an illegal value is replaced by the nearest legal index (the lower one on a
tie), so every sampler, including CMA-ES, works on a fixed box of integers. The value
told back is ``-reward`` (the validation NLL, plus the cost term in the tradeoff mode);
NSGA-II is told two objectives, (validation NLL, cost relative to full softmax). With
``prune=True`` a median pruner sees the tree's validation loss at each measurement point
(also when it trains on a Ray actor: the measurements come back to this process); a pruned
trial counts against the budget. Off by default: the node-exact reward trains a tree's
nodes together, so stopping early saves no time.

Seeding (``seed_classics``, on by default): a new study starts with enqueued trials of the
distinct trees that repeat a single action at every step (`tree_search.agents.seeding`:
in the split environment, exactly the homogeneous classic trees it can express). At most
half the budget goes to them (the most expensive within the cap first); over-cap trees
cost no training, and trees already known to the evaluator no budget.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import optuna
import sqlalchemy.exc

from tree_search.agents.base import EnvFactory, Searcher, SearcherReward
from tree_search.agents.seeding import nearest_legal, seed_episodes
from tree_search.heads.train import EvalPoint
from tree_search.reward.evaluator import Evaluation, Evaluator

__all__ = ["OPTUNA_SAMPLERS", "OptunaSearcher", "open_storage"]

OPTUNA_SAMPLERS = ("tpe", "cmaes", "random", "nsga2")


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=3, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    raise ValueError(f"unknown Optuna sampler {name!r}; choose one of {OPTUNA_SAMPLERS}")


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage | None:
    """An Optuna storage from a URL.

    ``sqlite:///...`` (waits up to 60 s on a lock, so several processes can share it),
    ``postgresql://...`` or any SQLAlchemy URL, or ``journal:PATH`` (Optuna's journal file).
    """
    if storage is None or not isinstance(storage, str):
        return storage
    if storage.startswith("journal:"):
        backend = optuna.storages.journal.JournalFileBackend(storage.removeprefix("journal:"))
        return optuna.storages.JournalStorage(backend)
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
        except sqlalchemy.exc.DBAPIError:  # duplicate table, unique constraint, lock
            time.sleep(0.5 + attempt)  # two processes creating the schema at once: one loses, and retries
    return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)


class OptunaSearcher(Searcher):
    """Search by an Optuna sampler over the action sequences of one environment."""

    def __init__(
        self,
        sampler: str,
        env_factory: EnvFactory,
        evaluator: Evaluator,
        *,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str = "tree_search",
        prune: bool = False,
        parallel: int = 1,
        owner: str = "",
        seconds: float | None = None,
        seed: int = 0,
        seed_classics: bool = True,
    ) -> None:
        """Create the searcher.

        Args:
            sampler: one of `OPTUNA_SAMPLERS`.
            env_factory: builds the environment each worker thread plays in.
            evaluator: rewards and budget.
            storage: an Optuna storage or URL (SQLite, PostgreSQL, journal); None keeps the study in memory.
            study_name: the study; several processes with the same storage and name share it.
            prune: report each measurement to a median pruner, which may stop a trial there (the pruner runs
                in this process, for any evaluator). Off by default: with the node bank a tree's nodes train
                together in about a second, so stopping early saves no time and leaves a partial measurement.
            parallel: trials played at once by threads (use with a `RayEvaluator` of as many workers).
            owner: marks this searcher's trials; on resume only its own unfinished trials are marked failed
                (other processes sharing the study keep theirs). Default: a fresh id.
            seconds: wall-clock limit.
            seed: sampler seed.
            seed_classics: start a new study from the homogeneous trees (`tree_search.agents.seeding`).
        """
        super().__init__(env_factory, evaluator, seconds=seconds, seed=seed)
        if sampler not in OPTUNA_SAMPLERS:
            raise ValueError(f"unknown Optuna sampler {sampler!r}; choose one of {OPTUNA_SAMPLERS}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.name = sampler
        self.storage, self.study_name, self.prune, self.parallel = storage, study_name, prune, parallel
        self.owner = owner or uuid.uuid4().hex
        self.seed_classics = seed_classics
        self.env = env_factory(lambda tree, projections=None: None)  # for the action space; workers own theirs

    def study(self) -> optuna.Study:
        """The study (created, or loaded when resuming from storage); interrupted trials are marked failed."""
        directions = ["minimize", "minimize"] if self.name == "nsga2" else ["minimize"]
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0) if self.prune else None
        study = optuna.create_study(
            storage=open_storage(self.storage),
            sampler=_sampler(self.name, self.seed),
            pruner=pruner,
            study_name=self.study_name,
            directions=directions,
            load_if_exists=True,
        )
        if self.seed_classics and not study.get_trials(deepcopy=False):  # a new study (a resumed one has trials)
            # the most expensive trees within the cap first; known ones (free) and over-cap ones (never trained) on top
            trained, free = seed_episodes(self.env_factory, self.evaluator, self.seed)
            chosen = [episode.params for episode in trained + free]
            for params in chosen:
                study.enqueue_trial(params, user_attrs={"seeded": True}, skip_if_exists=True)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.user_attrs.get("owner") == self.owner:  # ours, cut off by a crash; other workers' are live
                study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
        return study

    def search(self) -> Iterator[Evaluation]:
        """Ask a trial, play its episode, tell the outcome; ``parallel`` threads at once; until the budget is used."""
        study = self.study()
        self._attempts, self._attempts_lock, self._stop = 0, threading.Lock(), threading.Event()
        # Optuna's ask() is not safe across threads for enqueued trials: two workers could pop the same waiting
        # trial (one then fails with UpdateFinishedTrialError). One ask at a time in this process.
        self._ask_lock = threading.Lock()
        if self.parallel == 1:
            yield from _TrialWorker(self, study).trials()
            return
        arrived: queue.Queue = queue.Queue()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for evaluation in _TrialWorker(self, study).trials():
                    arrived.put(evaluation)
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)

        threads = [threading.Thread(target=work, name=f"trial-{i}", daemon=True) for i in range(self.parallel)]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads) or not arrived.empty():
                try:
                    yield arrived.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:  # on Ctrl-C too: no new trials; the evaluator's close() releases threads waiting on workers
            self._stop.set()
            for thread in threads:
                thread.join(timeout=1)
        if errors:
            raise errors[0]

    def _more(self) -> bool:
        if self._stop.is_set():
            return False
        with self._attempts_lock:
            self._attempts += 1
            return not self.done and self._attempts <= 50 + 20 * (self.evaluator.budget or 100)


class _TrialWorker:
    """One thread's episodes: its own environment, its current trial, its last evaluation."""

    def __init__(self, searcher: OptunaSearcher, study: optuna.Study) -> None:
        self.searcher, self.study = searcher, study
        self.trial: optuna.Trial | None = None
        self.last: Evaluation | None = None
        self.env = searcher.env_factory(SearcherReward(self.reward, searcher.evaluator, searcher.label))

    def reward(self, tree, projections=None):
        """The environment's reward function: evaluate through the evaluator, reporting to the pruner."""
        searcher, trial = self.searcher, self.trial
        callbacks = []
        if searcher.prune and searcher.name != "nsga2" and trial is not None:

            def report(point: EvalPoint) -> bool:
                trial.report(point.valid_nll, step=point.step)
                return trial.should_prune()

            callbacks.append(report)
        result, self.last = searcher.evaluator.reward(tree, projections, searcher=searcher.label, callbacks=callbacks)
        return result

    def trials(self) -> Iterator[Evaluation]:
        """Play trials until the searcher is done; yield each counted evaluation."""
        n = int(self.env.action_space.n)
        while self.searcher._more():  # noqa: SLF001 - the searcher's shared attempt counter
            with self.searcher._ask_lock:  # noqa: SLF001 - the searcher's shared lock
                trial = self.study.ask()
                trial.set_user_attr("owner", self.searcher.owner)
            self.trial, self.last = trial, None
            _, info = self.env.reset(seed=self.searcher.seed)
            done, step = False, 0
            while not done:
                action = nearest_legal(trial.suggest_int(f"a{step}", 0, n - 1), info["action_mask"])
                _, reward, done, _, info = self.env.step(action)
                step += 1
            self.tell(trial, reward, info)
            if self.last is not None and self.last.counted:
                yield self.last

    def tell(self, trial: optuna.Trial, reward: float, info: dict[str, Any]) -> None:
        """Report the episode's outcome to the study."""
        evaluation, study, name = self.last, self.study, self.searcher.name
        trial.set_user_attr("tree_hash", info["tree_hash"])
        if info["evaluated"] and evaluation is None:  # the budget ran out before this tree: no measurement
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif evaluation is not None and evaluation.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif evaluation is not None and evaluation.error is not None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif name == "nsga2":
            nll = evaluation.valid_nll if evaluation is not None else -reward  # over the cap: the penalty
            study.tell(trial, [nll, info["cost_ratio"]])
        else:
            study.tell(trial, -reward)
