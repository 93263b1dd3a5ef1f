"""Searchers over trees with one interface: RLlib policy gradients, Optuna samplers, dp, JTM, classic baselines.

The RLlib searchers import Ray only when used (``tree_search.agents.rllib_search``). Running a
search into a run folder is `tree_search.search` (`run_search`, `SearchConfig`); those names
still import from here through a lazy alias, for code written before they moved.
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


def __getattr__(name: str):
    """A name that moved to `tree_search.search` (issue 23), imported on first use (no import cycle)."""
    import tree_search.search as search

    if name in search.__all__:
        return getattr(search, name)
    raise AttributeError(f"module 'tree_search.agents' has no attribute {name!r}")
