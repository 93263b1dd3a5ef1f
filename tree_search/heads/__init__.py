"""PyTorch tree-softmax heads, their training on cached features, and the reward function.

The uses of a trained head (levels, explain, early, distill, smoothing, calibration, grow) are
`tree_search.hierarchy`; their names still import from here (a lazy alias, for code written before).
"""

from tree_search.heads.node_bank import NodeBank
from tree_search.heads.node_train import NodeRecipe, node_keys, train_nodes
from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.reward import FINAL_SEED_OFFSET, Result, evaluate, score_test, trained_head
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "EvalPoint",
    "FINAL_SEED_OFFSET",
    "FitResult",
    "FullSoftmaxHead",
    "HeadOutput",
    "NodeBank",
    "NodeRecipe",
    "Result",
    "TrainConfig",
    "TreeSoftmaxHead",
    "evaluate",
    "fit",
    "node_keys",
    "score_test",
    "train_nodes",
    "trained_head",
    "validation_nll",
]


def __getattr__(name: str):
    """The names that moved to `tree_search.hierarchy` (issue 23): imported on first use, so no import cycle."""
    import tree_search.hierarchy as hierarchy

    if name in hierarchy.__all__:
        return getattr(hierarchy, name)
    raise AttributeError(f"module 'tree_search.heads' has no attribute {name!r}")
