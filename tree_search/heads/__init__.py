"""PyTorch tree-softmax heads, their training on cached features, and the reward function."""

from tree_search.heads.node_bank import NodeBank
from tree_search.heads.node_train import NodeRecipe, node_keys, train_nodes
from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.reward import FINAL_SEED_OFFSET, Result, evaluate, score_test, trained_head
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "FINAL_SEED_OFFSET",
    "NodeBank",
    "NodeRecipe",
    "EvalPoint",
    "FitResult",
    "FullSoftmaxHead",
    "HeadOutput",
    "Result",
    "TrainConfig",
    "TreeSoftmaxHead",
    "evaluate",
    "node_keys",
    "fit",
    "score_test",
    "train_nodes",
    "trained_head",
    "validation_nll",
]
