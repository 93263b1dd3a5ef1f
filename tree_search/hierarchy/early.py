"""Risk-aware early answers: stop the descent at a coarser node when the next branch is too uncertain.

**The rule.** At node n the greedy descent would take its most probable child, with model
probability ``p = p(child | n, h)``. Descending costs ``c_wrong`` if the child is wrong
(probability ``1 - p``: an over-specific, wrong answer); stopping at n costs ``c_stop`` if
the child was right (probability ``p``: the specificity given up). Descending is the
cheaper choice in expectation, ``(1 - p) c_wrong <= p c_stop``, exactly when::

    p >= t(n) = c_wrong(n) / (c_wrong(n) + c_stop(n))

(`bayes_thresholds`; a one-step rule: it weighs the next decision only). So a large
``c_wrong / c_stop`` ratio raises the threshold: more inputs stop early, fewer answers are
wrong. `early_answer` descends greedily, all inputs at once, one batched step per depth
level, and returns each input's answer: a class where every branch passed its threshold,
otherwise the node where the first branch failed (flagged as coarse, ``is_leaf`` false).
Threshold 0 gives the plain greedy descent; a threshold above 1 answers the root.

**Coverage against accuracy.** `coverage_sweep` sweeps cost ratios on one greedy descent
(the stopping points of every threshold lie on it) and reports the coverage (share of
inputs answered with a class), the top-1 accuracy of the class answers, the share of coarse
answers whose node holds the true class, and the share of all answers that hold it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.hierarchy.levels import Descent, check_head_inputs, class_vertices, greedy_descent
from tree_search.tree import Tree

__all__ = ["CoverageRow", "CoverageSweep", "answer_contains", "bayes_thresholds", "coverage_sweep", "early_answer"]

DEFAULT_RATIOS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 9.0, 19.0, 49.0, 99.0)  # c_wrong / c_stop


def bayes_thresholds(tree: Tree, c_wrong: float | np.ndarray, c_stop: float | np.ndarray = 1.0) -> np.ndarray:
    """(I,) threshold of every internal node, ``c_wrong / (c_wrong + c_stop)`` (module docstring).

    Costs are numbers or (I,) arrays per internal node (e.g. by depth:
    ``c_wrong=np.where(tree.node_depth == 0, 5.0, 1.0)``).

    Example:
        >>> bayes_thresholds(Tree(3, [[0, 4], [1, 2]]), c_wrong=3.0, c_stop=1.0)
        array([0.75, 0.75])
    """
    shape = (tree.num_internal,)
    costs = {}
    for name, value in (("c_wrong", c_wrong), ("c_stop", c_stop)):
        array = np.asarray(value, dtype=np.float64)
        if array.ndim and array.shape != shape:
            raise ValueError(f"{name} must be a number or an array of shape {shape} (one per internal node)")
        if not (np.isfinite(array).all() and (array >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0")
        costs[name] = np.broadcast_to(array, shape)
    total = costs["c_wrong"] + costs["c_stop"]
    if (total <= 0).any():
        raise ValueError("c_wrong + c_stop must be > 0 at every node")
    return costs["c_wrong"] / total


def early_answer(head: TreeSoftmaxHead, h: torch.Tensor, thresholds: float | np.ndarray | torch.Tensor) -> Descent:
    """Greedy descent that stops at the first node whose best branch has probability below its threshold.

    Args:
        head: the head.
        h: (B, d) inputs.
        thresholds: one number, or (I,) per internal node (see `bayes_thresholds`).

    Returns:
        A `Descent`: ``answer`` (B,) a class, or ``V + u`` for a coarse answer at node u
        (``is_leaf`` false); the decisions taken before stopping.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> early_answer(head, torch.randn(2, 4), 1.5).answer  # no branch reaches 1.5: the root (V + 0)
        tensor([3, 3])
    """
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float32) if not torch.is_tensor(thresholds) else thresholds)
    if bool(torch.isnan(thr).any()):
        raise ValueError("thresholds must not be NaN")
    return greedy_descent(head, h, thr.to(h.device))


def _stop_on(descent: Descent, thresholds: torch.Tensor) -> torch.Tensor:
    """(B,) answers of an early stop with (I,) ``thresholds``, read off a full greedy descent."""
    valid = descent.nodes >= 0
    prob = descent.chosen_log_prob.exp()  # (B, D)
    stop = valid & (prob < thresholds[descent.nodes.clamp(min=0)])
    first = stop.float().argmax(1)
    coarse = descent.nodes.gather(1, first[:, None]).squeeze(1) + descent.num_classes
    return torch.where(stop.any(1), coarse, descent.answer)


def answer_contains(tree: Tree, answer: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) whether class ``y`` lies under each answer (a class: equal; ``V + u``: below node u).

    Example:
        >>> answer_contains(Tree(3, [[0, 4], [1, 2]]), torch.tensor([4, 4, 1]), torch.tensor([2, 0, 1]))
        tensor([ True, False,  True])
    """
    V = tree.num_classes
    vertices = class_vertices(tree, y)  # (B, D + 1)
    is_leaf = answer < V
    node_depth = torch.from_numpy(tree.node_depth.astype(np.int64)).to(answer.device)
    depth = torch.where(is_leaf, 0, node_depth[(answer - V).clamp(min=0)])
    at = vertices.gather(1, depth[:, None]).squeeze(1)
    return torch.where(is_leaf, answer == y, at == answer)


@dataclass(frozen=True)
class CoverageRow:
    """One point of the sweep."""

    ratio: float  # c_wrong / c_stop
    threshold: float  # c_wrong / (c_wrong + c_stop)
    coverage: float  # share of inputs answered with a class
    leaf_accuracy: float  # top-1 accuracy of the class answers (NaN: none)
    coarse_accuracy: float  # share of coarse answers whose node holds the true class (NaN: none)
    accuracy: float  # share of all answers that hold the true class
    top1: float  # share of all inputs answered with the true class
    mean_depth: float  # mean depth of the answers (the root: 0)


@dataclass(frozen=True)
class CoverageSweep:
    """Coverage against accuracy over a sweep of cost ratios (`coverage_sweep`)."""

    rows: tuple[CoverageRow, ...]
    inputs: int

    def table(self) -> str:
        """A text table, one row per cost ratio."""
        lines = [
            f"early answers over {self.inputs:,} inputs",
            "c_wrong/c_stop  threshold  coverage  leaf acc  coarse acc  holds true  top-1  mean depth",
        ]
        for r in self.rows:
            lines.append(
                f"{r.ratio:>14g} {r.threshold:>10.3f} {r.coverage:>9.4f} {r.leaf_accuracy:>9.4f} "
                f"{r.coarse_accuracy:>11.4f} {r.accuracy:>11.4f} {r.top1:>6.4f} {r.mean_depth:>11.2f}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Write a PNG: accuracies against coverage, and coverage against the cost ratio. Needs matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError('CoverageSweep.plot needs matplotlib: pip install "tree_search[search]"') from None
        figure = Figure(figsize=(12, 4.5), layout="constrained")
        left, right = figure.subplots(1, 2)
        coverage = [r.coverage for r in self.rows]
        for name, label in (("leaf_accuracy", "top-1 of class answers"), ("accuracy", "answer holds the true class"),
                            ("coarse_accuracy", "coarse answer holds the true class")):  # fmt: skip
            left.plot(coverage, [getattr(r, name) for r in self.rows], "o-", label=label)
        for r in self.rows:
            left.annotate(f"{r.ratio:g}", (r.coverage, r.leaf_accuracy), textcoords="offset points", xytext=(4, 4),
                          fontsize=7)  # fmt: skip
        left.set_xlabel("coverage (share answered with a class)")
        left.set_ylabel("accuracy")
        left.set_title("accuracy against coverage (labels: c_wrong/c_stop)")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        ratios = [max(r.ratio, 1e-2) for r in self.rows]
        right.plot(ratios, coverage, "o-", label="coverage")
        right.plot(ratios, [r.mean_depth / max(1e-9, max(x.mean_depth for x in self.rows)) for r in self.rows],
                   "s--", label="mean answer depth (scaled)")  # fmt: skip
        right.set_xscale("log")
        right.set_xlabel("c_wrong / c_stop (0 drawn at 0.01)")
        right.set_title("coverage against the cost ratio")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
        figure.suptitle(title or f"risk-aware early answers over {self.inputs:,} inputs")
        figure.savefig(path, dpi=120)


def coverage_sweep(
    head: TreeSoftmaxHead,
    h: torch.Tensor,
    y: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    chunk: int = 4096,
) -> CoverageSweep:
    """Coverage and accuracy of early answers for each ratio ``c_wrong / c_stop`` (one threshold for all nodes).

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> sweep = coverage_sweep(head, torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2]), ratios=(0, 1e9))
        >>> [row.coverage for row in sweep.rows]
        [1.0, 0.0]
    """
    check_head_inputs(head, h, y)
    if bool((y == head.ignore_index).any()):
        raise ValueError("y holds ignore_index targets; drop them before coverage_sweep")
    if h.shape[0] == 0:
        raise ValueError("coverage_sweep needs at least one input (h has 0 rows)")
    ratios = [float(r) for r in ratios]
    if not ratios or not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise ValueError(f"ratios must be finite numbers >= 0, got {ratios}")
    tree, V = head.tree, head.num_classes
    thresholds = [r / (1.0 + r) for r in ratios]
    leaf_depth = torch.from_numpy(tree.depth.astype(np.int64)).to(h.device)
    node_depth = torch.from_numpy(tree.node_depth.astype(np.int64)).to(h.device)
    sums = np.zeros((len(ratios), 6))  # leaves, leaf hits, coarse, coarse hits, depth sum, inputs
    for begin in range(0, h.shape[0], chunk):
        hc, yc = h[begin : begin + chunk], y[begin : begin + chunk].long()
        descent = greedy_descent(head, hc)
        for k, t in enumerate(thresholds):
            answer = _stop_on(descent, torch.full((tree.num_internal,), t, device=h.device))
            leaf = answer < V
            hit = answer_contains(tree, answer, yc)
            depth = torch.where(leaf, leaf_depth[answer.clamp(max=V - 1)], node_depth[(answer - V).clamp(min=0)])
            sums[k] += [int(leaf.sum()), int((hit & leaf).sum()), int((~leaf).sum()), int((hit & ~leaf).sum()),
                        float(depth.sum()), yc.shape[0]]  # fmt: skip
    rows = []
    for ratio, t, row in zip(ratios, thresholds, sums.tolist(), strict=True):
        leaves, leaf_hits, coarse, coarse_hits, depth_sum, n = row
        rows.append(CoverageRow(
            ratio=ratio, threshold=t, coverage=leaves / n,
            leaf_accuracy=leaf_hits / leaves if leaves else math.nan,
            coarse_accuracy=coarse_hits / coarse if coarse else math.nan,
            accuracy=(leaf_hits + coarse_hits) / n, top1=leaf_hits / n, mean_depth=depth_sum / n,
        ))  # fmt: skip
    return CoverageSweep(tuple(rows), int(h.shape[0]))
