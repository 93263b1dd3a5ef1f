"""Searchers over trees with one interface: RLlib policy gradients, Optuna samplers, classic baselines.

`run_search` runs the baselines and one searcher into a run folder; the RLlib searchers
import Ray only when used (``tree_search.agents.rllib_search``).
"""

from tree_search.agents.base import EnvFactory, Searcher
from tree_search.agents.baselines import BaselineSearcher, dataset_classics
from tree_search.agents.optuna_search import OPTUNA_SAMPLERS, OptunaSearcher
from tree_search.agents.search import AGENTS, PolicyConfig, SearchConfig, make_searcher, run_search

__all__ = [
    "AGENTS",
    "OPTUNA_SAMPLERS",
    "BaselineSearcher",
    "EnvFactory",
    "OptunaSearcher",
    "PolicyConfig",
    "SearchConfig",
    "Searcher",
    "dataset_classics",
    "make_searcher",
    "run_search",
]
