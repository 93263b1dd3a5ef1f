"""The model: PyTorch tree-softmax heads, the reference heads, and their training on cached features.

The node-exact reward (node training, the node bank, `evaluate`, the `Evaluator`) is
`tree_search.reward`, the uses of a trained head (levels, explain, early, distill,
smoothing, calibration, grow) are `tree_search.hierarchy`; both import this package, never
the other way round. Asking this package for one of their names says where it went.
"""

from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "EvalPoint",
    "FitResult",
    "FullSoftmaxHead",
    "HeadOutput",
    "TrainConfig",
    "TreeSoftmaxHead",
    "fit",
    "validation_nll",
]


def __getattr__(name: str):
    """An error that says where the names of earlier versions of this package went (issue 23)."""
    raise AttributeError(
        f"module 'tree_search.heads' has no attribute {name!r}: the node-exact reward (NodeRecipe, evaluate, "
        "trained_head, ...) is tree_search.reward and the uses of a trained head (levels, explain, early, "
        "distill, smoothing, calibration, grow) are tree_search.hierarchy"
    )
