"""`PolicySearcher`: a learned policy's proposals as a search (``--agent policy``), each one head training.

The policy (`tree_search.agents.imitation`: cloned from dp's decisions across corpora; the one that
ships with the package unless a file is given) builds trees in the split environment's two-level mode
without training anything. The searcher scores its first ``budget`` distinct proposals within the cap,
in the policy's order of preference (its root decisions best-liked first, each followed greedily; a
proposal that is a classic tree the run knows is scored free but still counts as one of them): with
a budget of 1 the run's tree is the policy's zero-search proposal, whose validation NLL no choice has
biased; with more the run keeps the best of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tree_search.agents.base import Searcher
from tree_search.envs import TreeEnvConfig
from tree_search.reward.evaluator import BudgetExhausted, Evaluation, Evaluator

__all__ = ["PolicySearcher"]


class PolicySearcher(Searcher):
    """Evaluate a learned policy's distinct proposals within the cap, best-liked first, until the budget is used."""

    name = "policy"

    def __init__(self, evaluator: Evaluator, dataset, config: TreeEnvConfig, policy_file: str | Path | None = None,
                 *, seconds: float | None = None, seed: int = 0) -> None:  # fmt: skip
        """Args: policy_file: a saved policy (`save_policy`); None or '': the one shipped with the package."""
        from tree_search.agents.imitation import load_policy, shipped_policy  # RLlib's module: imported when used

        super().__init__(None, evaluator, seconds=seconds, seed=seed)
        self.dataset, self.config = dataset, config
        self.policy_file = Path(policy_file) if policy_file else shipped_policy()
        self.module = load_policy(self.policy_file, config, dataset)
        self._first: Evaluation | None = None
        self._evaluated = 0

    def search(self) -> Iterator[Evaluation]:
        """Yield each proposal's counted evaluation, the policy's favourite first, until the budget is used."""
        from tree_search.agents.imitation import proposals

        free, limit = 0, self.evaluator.remaining  # proposals to score, free ones (known trees) included
        try:
            for proposal in proposals(self.module, self.config, tries=None, dataset=self.dataset):
                if self.done:
                    return
                if limit is not None and self._evaluated >= limit:
                    self.stop_reason = (f"it scored the policy's {limit} best-liked proposal(s), {free} of them "
                                        f"trees the run had scored already (free)")  # fmt: skip
                    return
                evaluation = self.evaluator.evaluate(proposal.tree, proposal.projections, searcher=self.label)
                self._evaluated += 1
                free += not evaluation.counted
                if self._first is None:
                    self._first = evaluation
                if evaluation.counted:
                    yield evaluation
        except BudgetExhausted:
            return
        if not self._evaluated:
            self.stop_reason = (f"the policy built no tree within the cap of {self.config.cost_cap:g}x binary Huffman "
                                f"from any of its root decisions")  # fmt: skip
        elif not self.done:
            self.stop_reason = f"the policy has no more distinct proposals within the cap ({self._evaluated} scored)"

    def selection_free_nll(self) -> float | None:
        """The first proposal's validation NLL when it is the only one scored: the policy chose it unseen."""
        if self._evaluated == 1 and self._first is not None and self._first.ok:
            return self._first.valid_nll
        return None
