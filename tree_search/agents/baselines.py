"""The classic trees every search is compared with, evaluated with exactly the same head training."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from tree_search.agents.base import Searcher
from tree_search.builders import ClassicTree, classic_trees
from tree_search.data.features import FeatureDataset, class_embeddings
from tree_search.reward.evaluator import Evaluation, Evaluator

__all__ = ["BaselineSearcher", "dataset_classics"]


def dataset_classics(
    dataset: FeatureDataset, names: Sequence[str] | str = "all", seed: int = 0
) -> dict[str, ClassicTree]:
    """`builders.classic_trees` for ``dataset``: its counts, class embeddings and feature dimension."""
    return classic_trees(dataset.counts, names, embeddings=class_embeddings(dataset), dim=dataset.dim, seed=seed)


class BaselineSearcher(Searcher):
    """Evaluates the classic trees (not counted against a searcher's budget)."""

    name = "baseline"

    def __init__(
        self,
        evaluator: Evaluator,
        dataset: FeatureDataset,
        names: Sequence[str] | str = "core",
        seed: int = 0,
        classics: Mapping[str, ClassicTree] | None = None,
    ) -> None:
        """Args: evaluator: where trees go; dataset: whose counts and embeddings build them; classics: built trees.

        With ``classics`` (a taxonomy's tree among them, say), ``names`` is not read.
        """
        super().__init__(None, evaluator, seed=seed)  # builds trees directly, no environment
        self.dataset, self.names, self.classics = dataset, names, classics

    def search(self) -> Iterator[Evaluation]:
        """Evaluate each baseline once (known ones come from the run being resumed)."""
        classics = self.classics if self.classics is not None else dataset_classics(self.dataset, self.names, self.seed)
        for name, classic in classics.items():
            yield self.evaluator.evaluate(classic.tree, classic.projections, searcher=f"baseline:{name}", counted=False)
