"""Orchestration: a run's configuration, running a search into a run folder, and the comparison report.

`config` (`SearchConfig`, declared once), `run` (`run_search`: the baselines and one searcher
per cap), `runs` (run folders: nothing lost on a kill, resume without repeats), `report`
(final scoring on test and the report; imported when used: it brings matplotlib) and
`verdicts` (the paired bootstrap over test documents and seeds).
"""

from tree_search.search.config import AGENTS, EXECUTION_FIELDS, SearchConfig
from tree_search.search.run import make_searcher, run_search
from tree_search.search.runs import Run, RunError

__all__ = ["AGENTS", "EXECUTION_FIELDS", "Run", "RunError", "SearchConfig", "make_searcher", "run_search"]
