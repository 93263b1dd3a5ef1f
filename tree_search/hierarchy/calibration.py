"""Calibration of tree heads and the full softmax: ECE, reliability diagrams, temperature scaling.

- **Expected calibration error** (`expected_calibration_error`, `reliability`): the top-1
  confidence binned into ``bins`` equal-width bins on [0, 1] (15 by default, as in Guo et
  al. 2017); ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|``.
- **Temperature scaling** (`fit_temperature`): node scores divided by a temperature fitted
  on the validation split by minimizing its NLL with L-BFGS (over ``log T``, so ``T > 0``):
  one temperature for every node, or one per depth (the scores of the nodes at depth ``d``,
  the root at 0, divided by ``T_d``). For a tree head this changes more than sharpness:
  a node's temperature reshapes the whole subtree's mass, and the top-1 class can change
  (unlike a flat softmax's). `scaled_head` returns a copy of the head with the
  temperatures folded into its weights, so `predict`, `log_prob` and `save` work as usual.
- **Reliability diagrams** (`plot_reliability`): PNG, matplotlib imported only there
  (it ships with the ``search`` extra).

Example:
    >>> from tree_search.builders import huffman
    >>> from tree_search.heads import TreeSoftmaxHead
    >>> head = TreeSoftmaxHead(huffman([5, 3, 2, 1]), dim=8)
    >>> h, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    >>> fitted = fit_temperature(head, h, y)
    >>> calibrated = scaled_head(head, fitted.temperatures)
    >>> confidence, predicted = top1(calibrated, h)
    >>> ece = expected_calibration_error(confidence, predicted == y)
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tree_search.heads.reference import FullSoftmaxHead
from tree_search.heads.tree_head import TreeSoftmaxHead

__all__ = [
    "CalibrationReport",
    "Reliability",
    "TemperatureFit",
    "calibration_report",
    "expected_calibration_error",
    "fit_temperature",
    "plot_reliability",
    "reliability",
    "scaled_head",
    "top1",
]


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of top-1 confidence against accuracy (equal-width bins on [0, 1])."""

    edges: np.ndarray  # (bins + 1,) bin edges
    count: np.ndarray  # (bins,) samples per bin
    confidence: np.ndarray  # (bins,) mean confidence per bin (NaN where empty)
    accuracy: np.ndarray  # (bins,) share of correct top-1 answers per bin (NaN where empty)

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b (n_b / N) |accuracy_b - confidence_b|``."""
        total = self.count.sum()
        if total == 0:
            raise ValueError("no samples: the expected calibration error is undefined")
        used = self.count > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.count[used] * gaps).sum() / total)


def reliability(
    confidence: torch.Tensor | np.ndarray, correct: torch.Tensor | np.ndarray, bins: int = 15
) -> Reliability:
    """Bin top-1 ``confidence`` (N,) in [0, 1] with whether each answer was ``correct`` (N,).

    Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]`` (the first bin includes 0).

    Example:
        >>> r = reliability(np.array([0.95, 0.95, 0.2]), np.array([True, False, False]), bins=10)
        >>> round(r.ece, 4)
        0.3667
    """
    conf = np.asarray(confidence.detach().cpu() if isinstance(confidence, torch.Tensor) else confidence, dtype=float)
    hit = np.asarray(correct.detach().cpu() if isinstance(correct, torch.Tensor) else correct, dtype=float)
    if conf.ndim != 1 or conf.shape != hit.shape:
        raise ValueError(f"confidence and correct must be 1-d of one length, got {conf.shape} and {hit.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if conf.size and (np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1 + 1e-6):
        raise ValueError("confidence must lie in [0, 1] (probabilities, not log-probabilities or logits)")
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=bins) / count
        accuracy = np.bincount(which, hit, minlength=bins) / count
    return Reliability(np.linspace(0.0, 1.0, bins + 1), count, mean_conf, accuracy)


def expected_calibration_error(
    confidence: torch.Tensor | np.ndarray, correct: torch.Tensor | np.ndarray, bins: int = 15
) -> float:
    """Expected calibration error of top-1 ``confidence`` (N,) given ``correct`` (N,) (see `reliability`).

    Example:
        >>> expected_calibration_error(np.array([0.9, 0.9]), np.array([True, False]))
        0.4
    """
    return reliability(confidence, correct, bins).ece


@torch.no_grad()
def top1(head: nn.Module, h: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, predicted)`` (N,) each: the probability and the class of each sample's top-1 answer.

    Exact. A tree head scores every class (``log_probs_all``: one matmul per weight
    group, a fixed cost), since its certified beam search (``predict``) can widen many
    times on flat, badly calibrated distributions; other heads use ``predict(h, 1)``.
    """
    confidence, predicted = [], []
    for start in range(0, h.shape[0], chunk):
        if isinstance(head, TreeSoftmaxHead):
            log_probs, classes = head.log_probs_all(h[start : start + chunk]).max(1, keepdim=True)
        else:
            classes, log_probs = head.predict(h[start : start + chunk], 1)
        confidence.append(log_probs[:, 0].float().exp())
        predicted.append(classes[:, 0])
    if not confidence:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(confidence), torch.cat(predicted)


def _depth_temperatures(tree_head: TreeSoftmaxHead, temperature: float | Sequence[float]) -> np.ndarray:
    """(I,) the temperature of each internal node, from one temperature or one per depth."""
    depths = int(tree_head.tree.node_depth.max()) + 1
    values = np.atleast_1d(np.asarray(temperature, dtype=np.float64))
    if values.ndim != 1 or values.size not in (1, depths):
        raise ValueError(f"give one temperature or one per depth ({depths} for this tree), got {values.size}")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"temperatures must be positive and finite, got {values.tolist()}")
    return values[tree_head.tree.node_depth] if values.size > 1 else np.full(tree_head.tree.num_internal, values[0])


def scaled_head(head: nn.Module, temperature: float | Sequence[float]) -> nn.Module:
    """A copy of ``head`` whose scores are divided by ``temperature``: one number, or one per depth (tree heads).

    For a `TreeSoftmaxHead`, node ``n``'s child weights and biases are divided by the
    temperature of its depth (the root has depth 0; its projection is left as is), so the
    copy is an ordinary head (`predict`, `log_prob`, `save`). For a `FullSoftmaxHead`,
    its linear layer. ``head`` itself is unchanged.

    Example:
        >>> from tree_search.builders import huffman
        >>> head = TreeSoftmaxHead(huffman([5, 3, 2, 1]), dim=8)
        >>> sharper = scaled_head(head, 0.5)  # scores doubled
        >>> per_depth = scaled_head(head, [1.0, 2.0, 2.0])  # Huffman of 4 classes: 3 depths
    """
    if isinstance(head, FullSoftmaxHead):
        values = np.atleast_1d(np.asarray(temperature, dtype=np.float64))
        if values.size != 1 or not (np.isfinite(values[0]) and values[0] > 0):
            raise ValueError(f"a full softmax takes one positive temperature, got {values.tolist()}")
        out = copy.deepcopy(head)
        with torch.no_grad():
            out.linear.weight.div_(float(values[0]))
            if out.linear.bias is not None:
                out.linear.bias.div_(float(values[0]))
        return out
    if not isinstance(head, TreeSoftmaxHead):
        raise TypeError(f"scaled_head takes a TreeSoftmaxHead or FullSoftmaxHead, got {type(head).__name__}")
    inverse = 1.0 / _depth_temperatures(head, temperature)  # (I,)
    out = copy.deepcopy(head)
    out.scale_nodes(inverse)
    return out


@dataclass(frozen=True)
class TemperatureFit:
    """What `fit_temperature` returns."""

    temperatures: tuple[float, ...]  # one, or one per depth (root first)
    nll_before: float  # mean NLL of the fitting rows at temperature 1
    nll_after: float  # ... at the fitted temperatures
    iterations: int  # L-BFGS closure evaluations


def _tree_pieces(head: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor, chunk: int):
    """Frozen per-pair child log-probabilities of the labels' paths, packed without padding."""
    values, segment, chosen, depth = [], [], [], []
    pairs_done = entries_done = 0
    node_depth = torch.from_numpy(head.tree.node_depth.astype(np.int64)).to(h.device)
    fanout = torch.from_numpy(head.tree.fanout.astype(np.int64)).to(h.device)
    with torch.no_grad():
        for start in range(0, y.shape[0], chunk):
            rows, nodes, child, _ = head.path_pairs(y[start : start + chunk])
            lp = head.node_log_softmax(h[start : start + chunk], rows, nodes).float()  # (P, W), -inf padded
            counts = fanout[nodes]  # the children of each pair's node
            valid = torch.arange(lp.shape[1], device=h.device)[None, :] < counts[:, None]
            first = torch.cumsum(counts, 0) - counts  # each pair's first entry in the packed values
            values.append(lp[valid])
            segment.append(torch.repeat_interleave(torch.arange(lp.shape[0], device=h.device), counts) + pairs_done)
            chosen.append(first + child + entries_done)
            depth.append(node_depth[nodes])
            pairs_done += lp.shape[0]
            entries_done += int(counts.sum())
    return torch.cat(values), torch.cat(segment), torch.cat(chosen), torch.cat(depth), pairs_done


def fit_temperature(
    head: nn.Module,
    h: torch.Tensor,
    y: torch.Tensor,
    *,
    per_depth: bool = False,
    max_iter: int = 100,
    chunk: int = 4096,
) -> TemperatureFit:
    """Temperatures minimizing the mean NLL of ``y`` given ``h`` (the validation split), by L-BFGS over ``log T``.

    Args:
        head: a `TreeSoftmaxHead` or `FullSoftmaxHead` (frozen: only temperatures are fitted).
        h: (N, d) features.
        y: (N,) labels.
        per_depth: one temperature per depth of the tree (tree heads only); depths that no
            fitting row reaches keep temperature 1.
        max_iter: L-BFGS iterations.
        chunk: rows per forward pass of the head.

    Memory: a tree head keeps each row's path nodes' child log-probabilities (about N x
    the sum of fanouts along a path); a full softmax keeps the (N, V) logits.

    Example:
        >>> fitted = fit_temperature(FullSoftmaxHead(5, 3), torch.randn(100, 3), torch.randint(0, 5, (100,)))
        >>> len(fitted.temperatures)
        1
    """
    if h.dim() != 2 or y.dim() != 1 or h.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"h must be (N, d) and y (N,) with N > 0, got {tuple(h.shape)} and {tuple(y.shape)}")
    y = y.long()
    N = y.shape[0]
    if isinstance(head, TreeSoftmaxHead):
        values, segment, chosen, depth, pairs = _tree_pieces(head, h, y, chunk)
        count = int(head.tree.node_depth.max()) + 1 if per_depth else 1
        if not per_depth:
            depth = torch.zeros_like(depth)
    elif isinstance(head, FullSoftmaxHead):
        if per_depth:
            raise ValueError("per_depth temperatures need a TreeSoftmaxHead (a full softmax has one level)")
        with torch.no_grad():
            logits = torch.cat([head.linear(h[s : s + chunk]).float() for s in range(0, N, chunk)])
        count = 1
    else:
        raise TypeError(f"fit_temperature takes a TreeSoftmaxHead or FullSoftmaxHead, got {type(head).__name__}")

    def nll(log_t: torch.Tensor) -> torch.Tensor:
        inverse = torch.exp(-log_t)
        if isinstance(head, FullSoftmaxHead):
            return nn.functional.cross_entropy(logits * inverse[0], y, reduction="sum") / N
        x = values * inverse[depth][segment]  # (entries,)
        peak = torch.full((pairs,), float("-inf"), device=x.device).scatter_reduce(0, segment, x.detach(), "amax")
        lse = torch.log(torch.zeros(pairs, device=x.device).index_add(0, segment, torch.exp(x - peak[segment]))) + peak
        return -(x[chosen] - lse).sum() / N

    log_t = torch.zeros(count, device=h.device, requires_grad=True)
    with torch.no_grad():
        before = float(nll(log_t))
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = nll(log_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        after = float(nll(log_t))
        if not math.isfinite(after) or after > before:  # never worse than not scaling
            log_t.zero_()
            after = before
    return TemperatureFit(tuple(float(t) for t in torch.exp(log_t.detach()).cpu()), before, after, calls)


@dataclass(frozen=True)
class CalibrationReport:
    """ECE and NLL on the test rows before and after temperature scaling fitted on the validation rows."""

    temperatures: tuple[float, ...]  # fitted on the validation rows (one, or one per depth, root first)
    nll_before: float  # test NLL (nats/token) of the head
    nll_after: float  # ... of the temperature-scaled head
    ece_before: float  # test ECE of the head
    ece_after: float  # ... of the temperature-scaled head
    top1_before: float  # test top-1 accuracy of the head
    top1_after: float  # ... of the temperature-scaled head (per-node temperatures can move a tree's top-1)
    before: Reliability  # the bins behind ece_before (for `plot_reliability`)
    after: Reliability  # the bins behind ece_after


def _mean_nll(head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    with torch.no_grad():
        return -sum(
            float(head.log_prob(h[s : s + chunk], y[s : s + chunk]).sum()) for s in range(0, y.shape[0], chunk)
        ) / max(1, y.shape[0])


def calibration_report(
    head: nn.Module,
    valid: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    per_depth: bool = False,
    bins: int = 15,
    chunk: int = 4096,
) -> CalibrationReport:
    """Fit temperatures on ``valid`` ``(h, y)`` and report ECE, NLL and top-1 on ``test`` before and after.

    Example:
        >>> head = FullSoftmaxHead(5, 3)
        >>> data = (torch.randn(200, 3), torch.randint(0, 5, (200,)))
        >>> report = calibration_report(head, data, data)
        >>> report.nll_after <= report.nll_before
        True
    """
    fitted = fit_temperature(head, *valid, per_depth=per_depth, chunk=chunk)
    calibrated = scaled_head(head, fitted.temperatures)
    h, y = test
    rows = {}
    for name, model in (("before", head), ("after", calibrated)):
        confidence, predicted = top1(model, h, chunk)
        correct = predicted == y
        rows[name] = (
            _mean_nll(model, h, y, chunk),
            reliability(confidence, correct, bins),
            float(correct.float().mean()),
        )
    (nll_b, rel_b, acc_b), (nll_a, rel_a, acc_a) = rows["before"], rows["after"]
    return CalibrationReport(fitted.temperatures, nll_b, nll_a, rel_b.ece, rel_a.ece, acc_b, acc_a, rel_b, rel_a)


def plot_reliability(curves: Mapping[str, Reliability], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a reliability diagram (accuracy against confidence per bin, one line per curve) as a PNG.

    Args:
        curves: ``{label: Reliability}``; the label shows the curve's ECE.
        path: the PNG to write (its folder is created).
        title: the figure's title.

    Example:
        >>> r = reliability(np.random.rand(1000), np.random.rand(1000) < 0.5)
        >>> plot_reliability({"coin": r}, "/tmp/reliability.png")  # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - the search extra brings it
        raise ImportError("reliability diagrams need matplotlib: pip install 'tree_search[search]'") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for label, curve in curves.items():
        used = curve.count > 0
        top.plot(
            curve.confidence[used],
            curve.accuracy[used],
            marker="o",
            markersize=3,
            label=f"{label} (ECE {curve.ece:.3f})",
        )
        centres = (curve.edges[:-1] + curve.edges[1:]) / 2
        bottom.plot(centres, curve.count / max(1, curve.count.sum()), marker=".", label=label)
    top.set_ylabel("top-1 accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=7, loc="upper left")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("share of samples")
    if title:
        top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
