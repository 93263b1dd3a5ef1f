"""Uses of a trained tree head beyond its loss.

Coarse-to-fine levels, path audits, early answers, distillation, label smoothing, calibration
and growing a head with new classes. Each module works on a `tree_search.heads.TreeSoftmaxHead`
through its public per-node API.
"""

from tree_search.hierarchy.calibration import (
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
from tree_search.hierarchy.distill import (
    DistillConfig,
    DistilledHead,
    FlatTeacher,
    distillation_loss,
    flat_teacher,
    gap_closed,
    teacher_for,
)
from tree_search.hierarchy.early import CoverageSweep, answer_contains, bayes_thresholds, coverage_sweep, early_answer
from tree_search.hierarchy.explain import Explanation, explain
from tree_search.hierarchy.grow import GrowResult, grow_by_embedding, grow_by_frequency, grow_head
from tree_search.hierarchy.levels import (
    Descent,
    LevelAccuracy,
    LevelWeightedHead,
    LevelWeights,
    greedy_descent,
    level_accuracy,
    level_loss,
)
from tree_search.hierarchy.smoothing import (
    LabelSmoother,
    SmoothedHead,
    SmoothingConfig,
    tree_distances,
)

__all__ = [
    "CalibrationReport",
    "CoverageSweep",
    "Descent",
    "DistillConfig",
    "DistilledHead",
    "Explanation",
    "FlatTeacher",
    "GrowResult",
    "LabelSmoother",
    "LevelAccuracy",
    "LevelWeightedHead",
    "LevelWeights",
    "Reliability",
    "SmoothedHead",
    "SmoothingConfig",
    "TemperatureFit",
    "answer_contains",
    "bayes_thresholds",
    "calibration_report",
    "coverage_sweep",
    "distillation_loss",
    "early_answer",
    "expected_calibration_error",
    "explain",
    "fit_temperature",
    "flat_teacher",
    "gap_closed",
    "greedy_descent",
    "grow_by_embedding",
    "grow_by_frequency",
    "grow_head",
    "level_accuracy",
    "level_loss",
    "plot_reliability",
    "reliability",
    "scaled_head",
    "teacher_for",
    "top1",
    "tree_distances",
]
