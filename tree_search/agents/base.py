"""The searcher interface: propose trees, get them evaluated, stop at the budget.

Life cycle: construct with an environment factory and an `Evaluator` (which owns the
evaluation budget and writes every result to the run as it arrives), then iterate
`Searcher.search()`: it yields each counted `Evaluation` as it arrives and returns when
the budget (evaluations, and optionally seconds) is used up. A searcher never trains
heads itself and never reads the test split.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from tree_search.envs.base import TreeEnv
from tree_search.envs.scoring import RewardFunction
from tree_search.reward.evaluator import Evaluation, Evaluator
from tree_search.reward.reward import Result
from tree_search.tree import Tree

__all__ = ["EnvFactory", "Searcher", "SearcherReward"]

EnvFactory = Callable[[RewardFunction], TreeEnv]  # builds an environment that scores trees with the given function


@dataclass(frozen=True)
class SearcherReward:
    """The `RewardFunction` a searcher gives its environments: ``score``, with dense rewards' nodes charged to it.

    Node losses that an environment's dense rewards revealed outside an evaluation count
    against the searcher's budget (`Evaluator.charge_nodes`, under ``label``).
    """

    score: Callable[[Tree, Mapping[int, int] | None], Result]
    evaluator: Evaluator
    label: str

    def __call__(self, tree: Tree, projections: Mapping[int, int] | None = None) -> Result:
        """``score(tree, projections)``."""
        return self.score(tree, projections)

    def charge_nodes(self, tree: Tree, projections: Mapping[int, int] | None, nodes_revealed: int) -> None:
        """Charge ``nodes_revealed`` node losses of ``tree`` to ``label``'s budget."""
        self.evaluator.charge_nodes(tree, projections, nodes_revealed, searcher=self.label)


class Searcher(ABC):
    """Base class: a named search over trees with a budget of evaluations."""

    name = "searcher"
    _label: str | None = None
    stop_reason: str | None = None  # why it stopped before its budget was used, when it knows (the run logs it)

    @property
    def label(self) -> str:
        """What its evaluations are recorded as (the name, or e.g. ``tpe@2x`` in a front search)."""
        return self._label or self.name

    @label.setter
    def label(self, value: str) -> None:
        self._label = value

    def __init__(
        self,
        env_factory: EnvFactory | None,
        evaluator: Evaluator,
        *,
        seconds: float | None = None,
        seed: int = 0,
    ) -> None:
        """Args: env_factory: environments to search in; evaluator: rewards and budget; seconds: wall-clock limit."""
        self.env_factory = env_factory
        self.evaluator = evaluator
        self.seconds = seconds
        self.seed = seed
        self._deadline = None if seconds is None else time.monotonic() + seconds

    @property
    def done(self) -> bool:
        """True when the evaluation budget or the time is used up."""
        late = self._deadline is not None and time.monotonic() >= self._deadline
        return self.evaluator.exhausted or late

    @abstractmethod
    def search(self) -> Iterator[Evaluation]:
        """Yield each counted evaluation as it arrives, until `done`."""

    def selection_free_nll(self) -> float | None:
        """A validation NLL of this search's choice that its own choosing did not bias, if the searcher has one.

        None (the default): the searcher's best tree is reported at its validation NLL, which
        the choice of the best among many makes optimistic.
        """
        return None
