"""PyTorch tree-softmax heads, their training on cached features, and the reward function."""

from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.reward import Result, evaluate, score_test
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "EvalPoint",
    "FitResult",
    "FullSoftmaxHead",
    "HeadOutput",
    "Result",
    "TrainConfig",
    "TreeSoftmaxHead",
    "evaluate",
    "fit",
    "score_test",
    "validation_nll",
]
