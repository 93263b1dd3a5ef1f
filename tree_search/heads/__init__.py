"""PyTorch tree-softmax heads, their training on cached features, and the reward function."""

from tree_search.heads.calibration import (
    CalibrationReport,
    Reliability,
    TemperatureFit,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability,
    scaled_head,
    top1,
)
from tree_search.heads.distill import (
    DistillConfig,
    DistilledHead,
    FlatTeacher,
    distillation_loss,
    flat_teacher,
    gap_closed,
    teacher_for,
)
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
from tree_search.heads.smoothing import (
    LabelSmoother,
    SmoothedHead,
    SmoothingConfig,
    tree_distances,
)
from tree_search.heads.train import EvalPoint, FitResult, TrainConfig, fit, validation_nll
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = [
    "AdaptiveSoftmaxHead",
    "CalibrationReport",
    "CoverageSweep",
    "Descent",
    "DistillConfig",
    "DistilledHead",
    "EvalPoint",
    "Explanation",
    "FINAL_SEED_OFFSET",
    "FitResult",
    "FlatTeacher",
    "FullSoftmaxHead",
    "GrowResult",
    "HeadOutput",
    "LabelSmoother",
    "LevelAccuracy",
    "LevelWeightedHead",
    "LevelWeights",
    "NodeBank",
    "NodeRecipe",
    "Reliability",
    "Result",
    "SmoothedHead",
    "SmoothingConfig",
    "TemperatureFit",
    "TrainConfig",
    "TreeSoftmaxHead",
    "answer_contains",
    "bayes_thresholds",
    "calibration_report",
    "coverage_sweep",
    "distillation_loss",
    "early_answer",
    "evaluate",
    "expected_calibration_error",
    "explain",
    "fit",
    "fit_temperature",
    "flat_teacher",
    "gap_closed",
    "greedy_descent",
    "grow_by_embedding",
    "grow_by_frequency",
    "grow_head",
    "grow_tree",
    "level_accuracy",
    "level_loss",
    "node_keys",
    "plot_reliability",
    "reliability",
    "scaled_head",
    "score_test",
    "teacher_for",
    "top1",
    "train_nodes",
    "trained_head",
    "tree_distances",
    "validation_nll",
]
