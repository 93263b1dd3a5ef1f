"""Coarse-to-fine supervision and per-level metrics of a `TreeSoftmaxHead`.

**The level-weighted loss.** For class y with path ``(n_1, c_1), ..., (n_L, c_L)`` from the
root, the head's negative log-likelihood is a sum of node cross-entropies,
``-log p(y|h) = sum_k CE_k`` with ``CE_k = -log p(c_k | n_k, h)`` (the softmax over n_k's
children). The level-weighted loss gives each node its own weight::

    loss(h, y) = sum_k w(n_k) * CE_k,    w(n) = nodes.get(n, depth[depth(n)] or default)

so ``depth=(2.0,)`` doubles the root's term (the coarsest decision), and all weights 1 is
exactly the plain NLL. A weight of 0 switches a node's term off. `level_loss` computes it,
`LevelWeightedHead` wraps a head so that ``forward(h, y).loss`` is the weighted loss while
``log_prob`` and ``predict`` stay the head's (so `tree_search.heads.fit` trains with it and
still early-stops on the plain validation NLL).

**When the weights matter.** Each node's parameters appear in its own term only, so a
node weight just scales the gradient of that node's parameters. Adam (and SparseAdam) are
invariant to such a scale, so on a head alone, with frozen features, level weights do not
change Adam's training at all (measured: the same validation NLL to every printed digit);
with SGD they act as per-node learning rates. They change what is learned through
parameters the nodes share: the encoder (or adapter) below the head, trained jointly with
it, whose gradient is the weighted sum of every node's.

**Per-level accuracy.** Depth d of a path is its d-th vertex below the root (depth 1: the
root's chosen child; the last vertex is the class itself). `level_accuracy` compares, at each
depth d, the predicted vertex with the true class's vertex, over the inputs whose true class
lies at depth d or deeper, for two predictions: the greedy descent (`greedy_descent`: the
most probable child at every node) and the ancestors of the exact argmax class
(``head.predict``). Both are consistent with the hierarchy by construction: a predicted
vertex at depth d is the parent of the one at depth d + 1.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead
from tree_search.tree import Tree

__all__ = [
    "Descent",
    "LevelAccuracy",
    "LevelWeightedHead",
    "LevelWeights",
    "class_vertices",
    "greedy_descent",
    "level_accuracy",
    "level_loss",
]


@dataclass(frozen=True)
class LevelWeights:
    """Weights of the node cross-entropies in the level-weighted loss (see the module docstring).

    Example:
        >>> LevelWeights(depth=(2.0,)).node_weights(Tree(3, [[0, 4], [1, 2]]))
        array([2., 1.])
    """

    depth: Sequence[float] = ()  # weight of every node at depth d (root: d = 0); deeper nodes get `default`
    nodes: Mapping[int, float] = field(default_factory=dict)  # per internal node id; overrides `depth`
    default: float = 1.0  # weight of nodes deeper than `depth` lists and not named in `nodes`

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", tuple(float(w) for w in self.depth))
        object.__setattr__(self, "nodes", types.MappingProxyType({int(k): float(v) for k, v in self.nodes.items()}))
        named = {**{f"depth[{d}]": w for d, w in enumerate(self.depth)}, "default": float(self.default)}
        named.update({f"nodes[{n}]": w for n, w in self.nodes.items()})
        for name, weight in named.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"LevelWeights.{name} must be a finite number >= 0, got {weight!r}")

    def __hash__(self) -> int:
        return hash((self.depth, tuple(sorted(self.nodes.items())), self.default))

    def node_weights(self, tree: Tree) -> np.ndarray:
        """(I,) float64 weight of every internal node of ``tree``.

        Raises:
            ValueError: when ``nodes`` names a node the tree does not have.
        """
        bad = [n for n in self.nodes if not 0 <= n < tree.num_internal]
        if bad:
            raise ValueError(
                f"LevelWeights.nodes names {bad}, but the tree's internal nodes are 0..{tree.num_internal - 1}"
            )
        per_depth = np.array([*self.depth, float(self.default)])
        weights = per_depth[np.minimum(tree.node_depth, len(self.depth))]
        for node, weight in self.nodes.items():
            weights[node] = weight
        return weights


def check_head_inputs(
    head: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor | None = None, finite: bool = True
) -> None:
    """Clear errors for a head that is not a `TreeSoftmaxHead`, or features and labels that do not fit it."""
    if not isinstance(head, TreeSoftmaxHead):
        raise TypeError(f"expected a TreeSoftmaxHead, got {type(head).__name__}")
    if h.ndim != 2 or h.shape[1] != head.dim:
        raise ValueError(f"h must have shape (B, {head.dim}) for this head, got {tuple(h.shape)}")
    if finite and not bool(torch.isfinite(h).all()):  # (losses skip it: a non-finite loss shows it)
        raise ValueError("h holds NaN or infinite values")
    if y is not None:
        if y.shape != (h.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be {h.shape[0]} integer class ids (B,), got shape {tuple(y.shape)} of {y.dtype}")
        counted = y[y != head.ignore_index]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= head.num_classes):
            raise ValueError(
                f"y must hold class ids in 0..{head.num_classes - 1} (or ignore_index {head.ignore_index}), "
                f"got values in {int(counted.min())}..{int(counted.max())}"
            )


def level_loss(
    head: TreeSoftmaxHead,
    h: torch.Tensor,
    y: torch.Tensor,
    weights: LevelWeights | torch.Tensor,
    reduction: str | None = None,
) -> torch.Tensor:
    """The level-weighted loss ``sum_k w(n_k) * CE_k`` over each target's path (module docstring).

    Args:
        head: the head.
        h: (B, d) inputs.
        y: (B,) targets; ``head.ignore_index`` targets are left out, as in ``head(h, y)``.
        weights: a `LevelWeights`, or a (I,) tensor of per-node weights.
        reduction: ``"mean"`` (over counted targets), ``"sum"`` or ``"none"`` (B,);
            default: the head's.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> h, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
        >>> bool(level_loss(head, h, y, LevelWeights()) == head(h, y).loss)  # all weights 1: the NLL
        True
    """
    check_head_inputs(head, h, y, finite=False)
    reduction = head.reduction if reduction is None else reduction
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(weights, LevelWeights):
        w = torch.as_tensor(weights.node_weights(head.tree), dtype=torch.float32, device=h.device)
    else:
        w = torch.as_tensor(weights, device=h.device)
        if w.shape != (head.tree.num_internal,):
            raise ValueError(f"per-node weights must have shape ({head.tree.num_internal},), got {tuple(w.shape)}")
    _, weighted, keep = _level_terms(head, h, y, w)
    if reduction == "none":
        return -weighted
    total = -weighted.sum()
    return total if reduction == "sum" else total / keep.sum()


def _level_terms(
    head: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) log p(y|h), (B,) sum_k w(n_k) log p(c_k|n_k) (both 0 at ignored targets), (B,) kept mask."""
    keep = y != head.ignore_index
    all_kept = bool(keep.all())
    hk, yk = (h, y) if all_kept else (h[keep], y[keep])
    rows, nodes, child, _ = head.path_pairs(yk)
    pair = head.node_log_prob(hk, rows, nodes, child)  # (P,) log p(c_k | n_k), as in head.log_prob
    zeros = torch.zeros(yk.shape[0], dtype=pair.dtype, device=h.device)
    output = zeros.index_add(0, rows, pair)
    weighted = zeros.index_add(0, rows, pair * w[nodes].to(pair.dtype))
    if not all_kept:
        full = torch.zeros(y.shape[0], dtype=pair.dtype, device=h.device)
        output, weighted = full.index_put((keep,), output), full.index_put((keep,), weighted)
    return output, weighted, keep


class LevelWeightedHead(nn.Module):
    """A `TreeSoftmaxHead` trained with the level-weighted loss; inference stays the head's.

    ``forward(h, y)`` returns ``HeadOutput(log p(y|h), level-weighted loss)``; ``log_prob``,
    ``predict``, ``log_probs_all`` and ``sparse_parameters`` are the wrapped head's, so
    `tree_search.heads.fit` and a user's own loop train it like the head itself.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> model = LevelWeightedHead(head, LevelWeights(depth=(2.0,)))  # the root's term counts twice
        >>> output, loss = model(torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]))
        >>> loss.backward()
    """

    def __init__(self, head: TreeSoftmaxHead, weights: LevelWeights) -> None:
        super().__init__()
        if not isinstance(weights, LevelWeights):
            raise TypeError(f"weights must be a LevelWeights, got {type(weights).__name__}")
        self.head, self.weights = head, weights
        node_w = torch.as_tensor(weights.node_weights(head.tree), dtype=torch.float32)
        self.register_buffer("node_weight", node_w, persistent=False)  # (I,)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """``(output, loss)``: the targets' exact log-probabilities and the level-weighted loss."""
        check_head_inputs(self.head, h, y, finite=False)
        output, weighted, keep = _level_terms(self.head, h, y, self.node_weight)
        if self.head.reduction == "none":
            return HeadOutput(output, -weighted)
        total = -weighted.sum()
        return HeadOutput(output, total if self.head.reduction == "sum" else total / keep.sum())

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) exact log p(y | h) of the wrapped head."""
        return self.head.log_prob(h, y)

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities of every class."""
        return self.head.log_probs_all(h)

    def predict(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` of the wrapped head."""
        return self.head.predict(h, k)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The wrapped head's parameters with sparse gradients."""
        return self.head.sparse_parameters()


class Descent(NamedTuple):
    """A greedy (or early-stopped) descent of a batch, one row per input; columns are depths.

    Column k describes the decision at the k-th node of the path (k = 0: the root); columns
    past a row's ``length`` hold -1 (ids) and -inf (log-probabilities).
    """

    answer: torch.Tensor  # (B,) unified id of the answer: a class y < V, or V + u for internal node u
    length: torch.Tensor  # (B,) decisions taken
    nodes: torch.Tensor  # (B, D) internal node of each decision
    chosen: torch.Tensor  # (B, D) unified id of the child taken (the most probable)
    chosen_log_prob: torch.Tensor  # (B, D) its log-probability at that node
    runner_up: torch.Tensor  # (B, D) unified id of the second most probable child
    runner_up_log_prob: torch.Tensor  # (B, D)
    num_classes: int  # V: answers below it are classes

    @property
    def is_leaf(self) -> torch.Tensor:
        """(B,) whether the answer is a class (a coarse, early answer is an internal node)."""
        return self.answer < self.num_classes


def greedy_descent(head: TreeSoftmaxHead, h: torch.Tensor, thresholds: torch.Tensor | float | None = None) -> Descent:
    """Descend from the root taking the most probable child at every node, all inputs at once.

    One batched step per depth level. With ``thresholds`` (a number, or (I,) per internal
    node), an input stops at the first node whose most probable child has probability
    below the node's threshold, and that node (``V + u``) is its answer.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> d = greedy_descent(head, torch.randn(2, 4))
        >>> d.answer.shape, d.nodes.shape
        (torch.Size([2]), torch.Size([2, 2]))
    """
    check_head_inputs(head, h)
    tree, device = head.tree, h.device
    V, B, D = tree.num_classes, h.shape[0], tree.max_depth
    thr = None
    if thresholds is not None:
        thr = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
        if thr.ndim == 0:
            thr = thr.expand(tree.num_internal)
        if thr.shape != (tree.num_internal,) or bool(torch.isnan(thr).any()):
            raise ValueError(f"thresholds must be a number or ({tree.num_internal},) per internal node, without NaN")
    with torch.no_grad():
        nodes = torch.full((B, D), -1, dtype=torch.int64, device=device)
        chosen, runner_up = torch.full_like(nodes, -1), torch.full_like(nodes, -1)
        chosen_lp = torch.full((B, D), float("-inf"), device=device)
        runner_lp = torch.full_like(chosen_lp, float("-inf"))
        answer = torch.full((B,), -1, dtype=torch.int64, device=device)
        length = torch.zeros(B, dtype=torch.int64, device=device)
        rows = torch.arange(B, device=device)
        current = torch.zeros(B, dtype=torch.int64, device=device)  # internal node of each active row
        for depth in range(D):
            if rows.numel() == 0:
                break
            here = current[rows]
            log_sm = head.node_log_softmax(h, rows, here)  # (P, F), -inf beyond each node's fanout
            top_lp, top_pos = log_sm.topk(2, dim=1)  # every internal node has at least two children
            ids = head.child_id(here[:, None], top_pos)  # (P, 2) unified ids
            if thr is not None:
                stop = top_lp[:, 0].exp() < thr[here]
                answer[rows[stop]] = V + here[stop]
                go = ~stop
                rows, here, top_lp, ids = rows[go], here[go], top_lp[go], ids[go]
            nodes[rows, depth], chosen[rows, depth], runner_up[rows, depth] = here, ids[:, 0], ids[:, 1]
            chosen_lp[rows, depth], runner_lp[rows, depth] = top_lp[:, 0].float(), top_lp[:, 1].float()
            length[rows] += 1
            leaf = ids[:, 0] < V
            answer[rows[leaf]] = ids[leaf, 0]
            rows = rows[~leaf]
            current[rows] = ids[~leaf, 0] - V
    return Descent(answer, length, nodes, chosen, chosen_lp, runner_up, runner_lp, V)


def class_vertices(tree: Tree, y: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """(B, depth + 1) unified ids of the path vertices of classes ``y``: root (``V``) first, the class last; -1 padded.

    Example:
        >>> class_vertices(Tree(3, [[0, 4], [1, 2]]), torch.tensor([0, 2]))
        tensor([[ 3,  0, -1],
                [ 3,  4,  2]])
    """
    V = tree.num_classes
    depth = tree.max_depth if depth is None else depth
    ptr, path_nodes, _ = (torch.from_numpy(a.astype(np.int64)) for a in tree.packed_paths())
    ptr, path_nodes = ptr.to(y.device), path_nodes.to(y.device)
    y = y.long()
    start, length = ptr[y], ptr[y + 1] - ptr[y]
    out = torch.full((y.shape[0], depth + 1), -1, dtype=torch.int64, device=y.device)
    for d in range(depth + 1):  # a loop over depth levels
        inside = d < length
        out[inside, d] = path_nodes[start[inside] + d] + V
        out[length == d, d] = y[length == d]
    return out


def _descent_vertices(descent: Descent, V: int) -> torch.Tensor:
    """(B, D + 1) vertices of a descent's path: the root, then each chosen child."""
    root = torch.full((descent.nodes.shape[0], 1), V, dtype=torch.int64, device=descent.nodes.device)
    return torch.cat([root, descent.chosen], 1)


@dataclass(frozen=True)
class LevelAccuracy:
    """Accuracy at each depth of the tree (see the module docstring); index d is depth d, 1..D."""

    depth: np.ndarray  # (D,) depths 1..D
    inputs: np.ndarray  # (D,) inputs whose true class lies at that depth or deeper
    greedy: np.ndarray  # (D,) share whose greedy-descent vertex at that depth is the true one
    argmax: np.ndarray  # (D,) share whose argmax class's ancestor at that depth is the true one
    top1_greedy: float  # share of inputs whose greedy leaf is the true class
    top1_argmax: float  # share whose argmax class is the true class (exact top-1 accuracy)

    def table(self) -> str:
        """A text table, one row per depth."""
        lines = ["depth    inputs   greedy   argmax"]
        for d, n, g, a in zip(self.depth, self.inputs, self.greedy, self.argmax, strict=True):
            lines.append(f"{d:>5} {n:>9,} {g:>8.4f} {a:>8.4f}")
        lines.append(f"class {int(self.inputs[0]):>9,} {self.top1_greedy:>8.4f} {self.top1_argmax:>8.4f}")
        return "\n".join(lines)


def level_accuracy(head: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> LevelAccuracy:
    """Accuracy at every depth, for the greedy descent and for the argmax class's ancestors.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> acc = level_accuracy(head, torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2]))
        >>> acc.depth.tolist(), acc.inputs.tolist()
        ([1, 2], [6, 4])
    """
    check_head_inputs(head, h, y)
    if bool((y == head.ignore_index).any()):
        raise ValueError("y holds ignore_index targets; drop them before level_accuracy")
    tree, V, D = head.tree, head.num_classes, head.tree.max_depth
    inputs, greedy_hits, argmax_hits = np.zeros(D + 1), np.zeros(D + 1), np.zeros(D + 1)
    leaf_greedy = leaf_argmax = 0
    for begin in range(0, y.shape[0], chunk):
        hc, yc = h[begin : begin + chunk], y[begin : begin + chunk].long()
        truth = class_vertices(tree, yc, D)  # (b, D + 1)
        descent = greedy_descent(head, hc)
        greedy = _descent_vertices(descent, V)
        best = head.predict(hc, 1)[0][:, 0]
        argmax = class_vertices(tree, best, D)
        valid = truth >= 0
        inputs += valid.sum(0).cpu().numpy()
        greedy_hits += (valid & (greedy == truth)).sum(0).cpu().numpy()
        argmax_hits += (valid & (argmax == truth)).sum(0).cpu().numpy()
        leaf_greedy += int((descent.answer == yc).sum())
        leaf_argmax += int((best == yc).sum())
    n = max(1, y.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return LevelAccuracy(
            depth=np.arange(1, D + 1),
            inputs=inputs[1:].astype(np.int64),
            greedy=greedy_hits[1:] / inputs[1:],
            argmax=argmax_hits[1:] / inputs[1:],
            top1_greedy=leaf_greedy / n,
            top1_argmax=leaf_argmax / n,
        )
