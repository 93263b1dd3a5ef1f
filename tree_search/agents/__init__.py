"""Searchers over trees with one interface: RLlib policy gradients, Optuna samplers, dp, JTM, classic baselines.

The RLlib searchers import Ray only when used (``tree_search.agents.rllib_search``). Running a
search into a run folder is `tree_search.search` (`run_search`, `SearchConfig`).
"""

from tree_search.agents.base import EnvFactory, Searcher
from tree_search.agents.baselines import BaselineSearcher, dataset_classics
from tree_search.agents.optuna_search import OPTUNA_SAMPLERS, OptunaSearcher
from tree_search.agents.policy import PolicyConfig

__all__ = [
    "OPTUNA_SAMPLERS",
    "BaselineSearcher",
    "EnvFactory",
    "OptunaSearcher",
    "PolicyConfig",
    "Searcher",
    "dataset_classics",
]
