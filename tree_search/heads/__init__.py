"""PyTorch tree-softmax heads, their training on cached features, and the reward function."""

from tree_search.heads.early import CoverageSweep, answer_contains, bayes_thresholds, coverage_sweep, early_answer
from tree_search.heads.explain import Explanation, explain
from tree_search.heads.grow import GrowResult, grow_by_embedding, grow_by_frequency, grow_head, grow_tree
from tree_search.heads.levels import (
    Descent,
    LevelAccuracy,
    LevelWeightedHead,
    LevelWeights,
    greedy_descent,
    level_accuracy,
    level_loss,
)
from tree_search.heads.node_bank import NodeBank
from tree_search.heads.node_train import NodeRecipe, node_keys, train_nodes
from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.reward import FINAL_SEED_OFFSET, Result, evaluate, score_test, trained_head
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "CoverageSweep",
    "Descent",
    "EvalPoint",
    "Explanation",
    "FINAL_SEED_OFFSET",
    "FitResult",
    "FullSoftmaxHead",
    "GrowResult",
    "HeadOutput",
    "LevelAccuracy",
    "LevelWeightedHead",
    "LevelWeights",
    "NodeBank",
    "NodeRecipe",
    "Result",
    "TrainConfig",
    "TreeSoftmaxHead",
    "answer_contains",
    "bayes_thresholds",
    "coverage_sweep",
    "early_answer",
    "evaluate",
    "explain",
    "fit",
    "greedy_descent",
    "grow_by_embedding",
    "grow_by_frequency",
    "grow_head",
    "grow_tree",
    "level_accuracy",
    "level_loss",
    "node_keys",
    "score_test",
    "train_nodes",
    "trained_head",
    "validation_nll",
]
