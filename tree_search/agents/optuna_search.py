"""Optuna searchers (TPE, CMA-ES, random, NSGA-II) driving the environments through ask/tell.

Each trial is one episode: the action of step ``i`` is the integer parameter ``a{i}`` in
``0..n-1``; an illegal value is replaced by the nearest legal index (the lower one on a
tie), so every sampler, including CMA-ES, works on a fixed box of integers. The value
told back is ``-reward`` (the validation NLL, plus the cost term in the tradeoff mode);
NSGA-II is told two objectives, (validation NLL, cost relative to full softmax). A
pruner sees the head's validation loss at each measurement of its training, so hopeless
trees stop early; a pruned trial used compute and counts against the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import optuna

from tree_search.agents.base import EnvFactory, Searcher
from tree_search.heads.evaluator import Evaluation, Evaluator
from tree_search.heads.train import EvalPoint

__all__ = ["OPTUNA_SAMPLERS", "OptunaSearcher", "nearest_legal"]

OPTUNA_SAMPLERS = ("tpe", "cmaes", "random", "nsga2")


def nearest_legal(action: int, legal: np.ndarray) -> int:
    """The legal index nearest to ``action`` (the lower one on a tie)."""
    indices = np.flatnonzero(legal)
    return int(indices[np.argmin(np.abs(indices - action))])


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
        prune: bool = True,
        seconds: float | None = None,
        seed: int = 0,
    ) -> None:
        """Args: sampler: one of `OPTUNA_SAMPLERS`; storage: an Optuna storage (URL), None for in memory."""
        super().__init__(env_factory, evaluator, seconds=seconds, seed=seed)
        if sampler not in OPTUNA_SAMPLERS:
            raise ValueError(f"unknown Optuna sampler {sampler!r}; choose one of {OPTUNA_SAMPLERS}")
        self.name = sampler
        self.storage, self.study_name, self.prune = storage, study_name, prune
        self.env = env_factory(self._reward)
        self._trial: optuna.Trial | None = None
        self._last: Evaluation | None = None

    def _reward(self, tree, projections=None):
        """The environment's reward function: evaluate through the evaluator, reporting to the pruner."""
        trial = self._trial
        callbacks = []
        if self.prune and self.name != "nsga2" and trial is not None:

            def report(point: EvalPoint) -> bool:
                trial.report(point.valid_nll, step=point.step)
                return trial.should_prune()

            callbacks.append(report)
        result, self._last = self.evaluator.reward(tree, projections, searcher=self.name, callbacks=callbacks)
        return result

    def study(self) -> optuna.Study:
        """The study (created, or loaded when resuming from storage); interrupted trials are marked failed."""
        directions = ["minimize", "minimize"] if self.name == "nsga2" else ["minimize"]
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0) if self.prune else None
        study = optuna.create_study(
            storage=self.storage,
            sampler=_sampler(self.name, self.seed),
            pruner=pruner,
            study_name=self.study_name,
            directions=directions,
            load_if_exists=True,
        )
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
        return study

    def search(self) -> Iterator[Evaluation]:
        """Ask a trial, play its episode, tell the outcome; until the budget is used."""
        study = self.study()
        n = int(self.env.action_space.n)
        attempts = 0
        while not self.done and attempts < 50 + 20 * (self.evaluator.budget or 100):
            attempts += 1
            trial = study.ask()
            self._trial, self._last = trial, None
            used_before = self.evaluator.used
            _, info = self.env.reset(seed=self.seed)
            done, step = False, 0
            while not done:
                action = nearest_legal(trial.suggest_int(f"a{step}", 0, n - 1), info["action_mask"])
                _, reward, done, _, info = self.env.step(action)
                step += 1
            self._tell(study, trial, reward, info)
            if self._last is not None and self.evaluator.used > used_before:
                yield self._last

    def _tell(self, study: optuna.Study, trial: optuna.Trial, reward: float, info: dict[str, Any]) -> None:
        evaluation = self._last
        trial.set_user_attr("tree_hash", info["tree_hash"])
        if evaluation is not None and evaluation.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif evaluation is not None and not evaluation.ok and not math.isfinite(reward):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif self.name == "nsga2":
            study.tell(
                trial, [-reward if not evaluation or not evaluation.ok else evaluation.valid_nll, info["cost_ratio"]]
            )
        else:
            study.tell(trial, -reward)
