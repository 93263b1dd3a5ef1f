"""The model: PyTorch tree-softmax heads, the reference heads, and their training on cached features.

The node-exact reward (node training, the node bank, `evaluate`, the `Evaluator`) is
`tree_search.reward`, the uses of a trained head (levels, explain, early, distill,
smoothing, calibration, grow) are `tree_search.hierarchy`; their names still import from
here through a lazy alias (for code written before the move), so this package imports neither.
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

_MOVED = ("tree_search.reward", "tree_search.hierarchy")  # where the names of earlier versions of this package went


def __getattr__(name: str):
    """A name that moved to `tree_search.reward` or `tree_search.hierarchy` (issue 23), imported on first use."""
    import importlib

    for package in _MOVED:
        module = importlib.import_module(package)
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'tree_search.heads' has no attribute {name!r}")
