"""Distillation of a flat (full-softmax) teacher into a tree head.

A flat teacher gives every class a probability ``p(c | h) = softmax(z(h))_c``. Summed under
each branch, it gives every internal node ``n`` a distribution over its children,
``t_n(k) = p(subtree k) / p(subtree n)``: what the tree student's node ``n`` should predict.
The loss of a sample ``(h, y)``, over the nodes ``n_1..n_L`` on the **true class's path**
(those the hard loss trains) with children ``c_1..c_L`` taken:

    loss(h, y) = sum_k [ alpha * -log s_{n_k}(c_k)
                         + (1 - alpha) * T^2 * CE(softmax(log t_{n_k} / T), softmax(log s_{n_k} / T)) ]

where ``s_n`` is the student's child distribution at node ``n`` and ``CE(a, b) = -sum a log b``.
``T^2`` keeps the soft term's gradients on the scale of the hard one (Hinton et al.).

**Temperature per node.** Each node's branch distribution is softened, ``t_n^(1/T)``
renormalised, as the student's node distribution is: for any T the soft term is smallest
where ``s_n = t_n``, and a flat softmax (one node) is Hinton's distillation exactly. Softening
the *classes* first (``softmax(z / T)``) and then summing would not do: a branch of m equally
likely classes would get ``m`` times a class's tempered mass, so a student matching it at T
puts ``m ** (T - 1)`` times too much on large subtrees at T = 1 (measured: T = 2 that way
took binary Huffman's test NLL from 2.62 to 3.18; a test checks that the teacher's own tree
distribution is a stationary point at every T).

**Why the nodes on the true path**, not every node weighted by the teacher's reach
probability ``p(n)``: at ``T = 1``, ``sum_n p(n) CE(t_n, s_n) = -sum_c p(c) log q(c)``, the
full cross-entropy of the student's class distribution ``q`` against the teacher's; but it
needs every node's scores for every sample (a full softmax's cost). Over the data, the true
path visits node ``n`` with the *data's* reach probability, so the path loss is an unbiased
one-sample estimate of that sum with ``p(n)`` replaced by the data's ``p(n | h)``: the same
objective where the teacher is right, and, where it is not, weight on the branches the data
actually takes. It costs what the hard loss costs (the path's nodes) plus the teacher's
logits and one prefix sum over the classes in depth-first order. ``alpha = 1`` is plain
training on hard labels.

Example:
    >>> from tree_search.builders import huffman
    >>> from tree_search.heads import TreeSoftmaxHead
    >>> teacher = FlatTeacher(torch.randn(4, 8), torch.zeros(4))
    >>> student = DistilledHead(TreeSoftmaxHead(huffman([5, 3, 2, 1]), 8), teacher, DistillConfig(alpha=0.5))
    >>> output, loss = student(torch.randn(2, 8), torch.tensor([0, 3]))
    >>> # then: tree_search.heads.fit(student, dataset, TrainConfig()) trains student.student
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from tree_search.data.cache import cache_root
from tree_search.data.features import FeatureDataset
from tree_search.heads.paths import DeviceArrays, packed_path_pairs
from tree_search.heads.reference import FullSoftmaxHead
from tree_search.heads.train import TrainConfig, fit
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead
from tree_search.tree import Tree

__all__ = [
    "DistillConfig",
    "DistillOutput",
    "DistilledHead",
    "FlatTeacher",
    "branch_targets",
    "distillation_loss",
    "flat_teacher",
    "gap_closed",
    "path_pairs",
    "subtree_probs",
    "teacher_for",
]


@dataclass(frozen=True)
class DistillConfig:
    """How a tree student learns from a flat teacher (see the module docstring for the loss)."""

    alpha: float = 0.5  # weight of the hard-label NLL; 1 - alpha goes to the teacher's branch targets
    temperature: float = 1.0  # T: each node's teacher and student distribution softened by 1/T; soft term x T^2

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"DistillConfig.temperature must be a positive number, got {self.temperature}")


class FlatTeacher(nn.Module):
    """A frozen linear full-softmax teacher: ``logits = h @ weight.T + bias``.

    Example:
        >>> teacher = FlatTeacher(torch.randn(10, 4), torch.zeros(10))
        >>> teacher(torch.randn(3, 4)).shape
        torch.Size([3, 10])
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.dim() != 2:
            raise ValueError(f"the teacher's weight must be (V, d), got shape {tuple(weight.shape)}")
        bias = torch.zeros(weight.shape[0]) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"the teacher's bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    @property
    def num_classes(self) -> int:
        """V."""
        return int(self.weight.shape[0])

    @classmethod
    def from_head(cls, head: FullSoftmaxHead) -> FlatTeacher:
        """The (frozen) output layer of a trained `FullSoftmaxHead`."""
        linear = head.linear
        return cls(linear.weight.detach().cpu(), None if linear.bias is None else linear.bias.detach().cpu())

    @torch.no_grad()
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) logits of (B, d) features."""
        return torch.addmm(self.bias, h.to(self.weight.dtype), self.weight.t())


def flat_teacher(dataset: FeatureDataset, folder: str | os.PathLike[str] | None = None) -> FlatTeacher | None:
    """The full-softmax output layer of the context encoder that made ``dataset``'s features, or None.

    `tree_search.data.build_features` trains its encoder with a full softmax and keeps the
    encoder's weights (``encoder.pt``) in the dataset's cache folder (``folder``; default
    ``<cache>/features/<dataset.key>``); its output layer applied to the frozen features
    is that encoder's own next-token distribution. None when the folder holds no encoder
    (``.npz`` or planted datasets): train a teacher instead (`teacher_for`).

    Raises:
        ValueError: when the stored encoder does not fit the dataset (shape or class embeddings differ).
    """
    folder = Path(folder) if folder is not None else cache_root() / "features" / dataset.key
    path = folder / "encoder.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "out.weight" not in state:
        raise ValueError(f"{path}: no 'out.weight' (the encoder's output layer) in the file")
    weight, bias = state["out.weight"].float(), state.get("out.bias")
    if tuple(weight.shape) != (dataset.num_classes, dataset.dim):
        raise ValueError(
            f"{path}: the encoder's output layer is {tuple(weight.shape)}, the dataset has "
            f"{dataset.num_classes} classes of dim {dataset.dim}"
        )
    if dataset.class_embeddings is not None and not np.allclose(
        np.asarray(dataset.class_embeddings, dtype=np.float32), weight.numpy(), atol=1e-5
    ):
        raise ValueError(f"{path}: the encoder's output layer is not the dataset's class embeddings (another encoder)")
    return FlatTeacher(weight, bias)


def teacher_for(
    dataset: FeatureDataset, train_config: TrainConfig | None = None, *, device: str | None = None
) -> tuple[FlatTeacher, str]:
    """A flat teacher for ``dataset`` and where it came from: the encoder's own layer, else a trained full softmax.

    Args:
        dataset: the features.
        train_config: how to train the full softmax used when
            the dataset keeps no encoder (default ``TrainConfig()``).
        device: where that training runs.

    Returns:
        ``(teacher, source)``, source ``"encoder"`` or ``"full-softmax"``.
    """
    teacher = flat_teacher(dataset)
    if teacher is not None:
        return teacher, "encoder"
    torch.manual_seed(train_config.seed if train_config is not None else 0)
    head = FullSoftmaxHead(dataset.num_classes, dataset.dim)
    fit(head, dataset, train_config or TrainConfig(), device=device)
    return FlatTeacher.from_head(head), "full-softmax"


class _TreeIndex:
    """A tree's paths and children as tensors (per device), and its classes in depth-first order.

    In depth-first order every subtree's classes are one contiguous range, so the mass of
    any subtree under (B, V) class probabilities is a difference of two prefix sums: one
    cumulative sum per batch (float64) and a gather per needed node, instead of a sparse
    (node x class) product.
    """

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        V = tree.num_classes
        ptr, nodes, codes = tree.packed_paths()
        padded_codes = tree.paths()[1]
        order = np.lexsort(tuple(padded_codes[:, k] for k in reversed(range(padded_codes.shape[1]))))
        rank = np.empty(V, dtype=np.int64)
        rank[order] = np.arange(V)
        owner = np.repeat(np.arange(V), np.diff(ptr))
        start = np.full(tree.num_internal, V, dtype=np.int64)
        np.minimum.at(start, nodes.astype(np.int64), rank[owner])
        end = start + tree.subtree_size
        last = np.zeros(tree.num_internal, dtype=np.int64)
        np.maximum.at(last, nodes.astype(np.int64), rank[owner])
        if not np.array_equal(last + 1, end):
            raise RuntimeError("depth-first order left a subtree's classes apart (a bug)")
        ids = tree.child_ids.astype(np.int64)
        is_leaf = ids < V
        low = np.where(is_leaf, rank[np.minimum(ids, V - 1)], start[np.maximum(ids - V, 0)])
        high = np.where(is_leaf, low + 1, end[np.maximum(ids - V, 0)])
        self._arrays = DeviceArrays(
            {
                "ptr": torch.from_numpy(ptr.astype(np.int64)),
                "nodes": torch.from_numpy(nodes.astype(np.int64)),
                "codes": torch.from_numpy(codes.astype(np.int64)),
                "child_ptr": torch.from_numpy(tree.child_ptr.astype(np.int64)),
                "fanout": torch.from_numpy(tree.fanout.astype(np.int64)),
                "order": torch.from_numpy(order.astype(np.int64)),
                "start": torch.from_numpy(start),
                "end": torch.from_numpy(end),
                "entry_low": torch.from_numpy(low),  # (E,) range of each child entry's classes in depth-first order
                "entry_high": torch.from_numpy(high),
            }
        )

    def pairs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        V = self.tree.num_classes
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be a 1-d integer tensor, got shape {tuple(y.shape)} and {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
            raise ValueError(f"labels must lie in 0..{V - 1}, got {int(y.min())}..{int(y.max())}")
        a = self._arrays.on(y.device)
        rows, nodes, child, _ = packed_path_pairs(a["ptr"], a["nodes"], a["codes"], y)
        return rows, nodes, child

    def _prefix(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, V + 1) float64 prefix sums of the class probabilities in depth-first order."""
        if probs.dim() != 2 or probs.shape[1] != self.tree.num_classes:
            raise ValueError(f"class probabilities must be (B, {self.tree.num_classes}), got {tuple(probs.shape)}")
        a = self._arrays.on(probs.device)
        prefix = torch.zeros(probs.shape[0], probs.shape[1] + 1, dtype=torch.float64, device=probs.device)
        torch.cumsum(probs.index_select(1, a["order"]), 1, dtype=torch.float64, out=prefix[:, 1:])
        return prefix

    def masses(self, probs: torch.Tensor) -> torch.Tensor:
        a, prefix = self._arrays.on(probs.device), self._prefix(probs)
        return (prefix[:, a["end"]] - prefix[:, a["start"]]).clamp_min(0.0)  # (B, I)

    def targets(self, probs: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        a, prefix = self._arrays.on(probs.device), self._prefix(probs)
        fan = a["fanout"][nodes]
        width = int(fan.max()) if fan.numel() else 1
        position = torch.arange(width, device=probs.device)
        valid = position[None, :] < fan[:, None]  # (P, F)
        entries = (a["child_ptr"][nodes][:, None] + position).clamp(max=a["entry_low"].numel() - 1)
        row = rows[:, None]
        mass = (prefix[row, a["entry_high"][entries]] - prefix[row, a["entry_low"][entries]]).clamp_min(0.0) * valid
        # a node whose whole mass underflowed (a teacher giving exactly 0) gets no soft target: a zero row
        return mass / mass.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def path_pairs(tree: Tree, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (sample, node, child taken) pairs of the labels' root paths, flattened: ``(rows, nodes, child)`` (P,) each.

    Example:
        >>> tree = Tree(3, [[0, 4], [1, 2]])  # root -> (0, node 1 -> (1, 2))
        >>> [t.tolist() for t in path_pairs(tree, torch.tensor([2, 0]))]
        [[0, 0, 1], [0, 1, 0], [1, 1, 0]]
    """
    return _TreeIndex(tree).pairs(y)


def subtree_probs(tree: Tree, probs: torch.Tensor) -> torch.Tensor:
    """(B, I) float64 sum of the (B, V) class probabilities under each internal node (prefix sums in DFS order).

    Example:
        >>> tree = Tree(3, [[0, 4], [1, 2]])
        >>> subtree_probs(tree, torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)).tolist()
        [[1.0, 0.5]]
    """
    return _TreeIndex(tree).masses(probs)


def branch_targets(tree: Tree, probs: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """(P, F) the teacher's distribution over the children of ``nodes[p]`` for sample ``rows[p]``.

    ``t(k) = p(subtree of child k) / p(subtree of the node)`` from (B, V) class
    probabilities ``probs``; columns beyond a node's fanout are 0; F is the widest node
    among ``nodes``; float64.

    Example:
        >>> tree = Tree(3, [[0, 4], [1, 2]])
        >>> probs = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
        >>> branch_targets(tree, probs, torch.tensor([0, 0]), torch.tensor([0, 1])).round(decimals=6).tolist()
        [[0.5, 0.5], [0.4, 0.6]]
    """
    return _TreeIndex(tree).targets(probs, rows, nodes)


class DistillOutput(NamedTuple):
    """What `distillation_loss` returns, per sample."""

    log_prob: torch.Tensor  # (B,) the student's log p(y | h)
    loss: torch.Tensor  # (B,) alpha * hard NLL + (1 - alpha) * T^2 * soft cross-entropy, summed over the path


def _distill(
    index: _TreeIndex, student: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor,
    teacher_logits: torch.Tensor | None, config: DistillConfig,
) -> DistillOutput:  # fmt: skip
    if config.alpha < 1.0 and (teacher_logits is None or teacher_logits.shape != (y.shape[0], student.num_classes)):
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        raise ValueError(f"teacher logits must be (B, V) = ({y.shape[0]}, {student.num_classes}), got {got}")
    rows, nodes, child = index.pairs(y)
    lp = student.node_log_softmax(h, rows, nodes)  # (P, W) the student's child log-probabilities, -inf padded
    hard = -lp.gather(1, child[:, None]).squeeze(1)  # (P,)
    B = y.shape[0]
    log_prob = -torch.zeros(B, dtype=hard.dtype, device=h.device).index_add(0, rows, hard)
    alpha, T = config.alpha, config.temperature
    if alpha == 1.0:
        return DistillOutput(log_prob, -log_prob)
    with torch.no_grad():
        # float32 probabilities (what underflows there is below 1e-38), summed in float64 (`_TreeIndex._prefix`)
        targets = index.targets(torch.softmax(teacher_logits.float(), dim=1), rows, nodes)  # (P, F) float64
        if T != 1.0:  # soften each node's branch distribution (module docstring), zeros stay zeros
            tempered = torch.softmax(targets.log() / T, dim=1)  # log 0 = -inf
            targets = torch.nan_to_num(tempered, nan=0.0)  # a node with no teacher mass: no soft target
        targets = targets.to(lp.dtype)
    width = targets.shape[1]
    student_lp = torch.log_softmax(lp[:, :width] / T, dim=1)
    soft = -torch.where(targets > 0, targets * student_lp, torch.zeros_like(student_lp)).sum(1)  # (P,)
    per_pair = alpha * hard + (1.0 - alpha) * T * T * soft
    return DistillOutput(log_prob, torch.zeros(B, dtype=hard.dtype, device=h.device).index_add(0, rows, per_pair))


def distillation_loss(
    student: TreeSoftmaxHead, h: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
    config: DistillConfig = DistillConfig(),
) -> DistillOutput:  # fmt: skip
    """Per-sample distillation loss of a tree ``student`` against (B, V) flat ``teacher_logits`` (module docstring).

    For a training loop of your own (teacher logits from anywhere: another model, an
    array); `DistilledHead` wraps the same for `tree_search.heads.fit`.

    Example:
        >>> from tree_search.builders import huffman
        >>> student = TreeSoftmaxHead(huffman([5, 3, 2, 1]), 8)
        >>> out = distillation_loss(student, torch.randn(2, 8), torch.tensor([0, 3]), torch.randn(2, 4))
        >>> out.loss.shape
        torch.Size([2])
    """
    return _distill(_TreeIndex(student.tree), student, h, y, teacher_logits, config)


class DistilledHead(nn.Module):
    """A tree student trained by distillation from a flat teacher: ``forward`` gives the distillation loss.

    ``log_prob``, ``predict`` and the parameters are the student's (the teacher is frozen:
    its weights are buffers), so `tree_search.heads.fit` trains the student as is, with
    early stopping on the student's validation NLL; ``.student`` is the trained head.

    Args:
        student: the tree head to train.
        teacher: a module mapping (B, d) features to (B, V) logits (`FlatTeacher`).
        config: alpha and temperature.
    """

    def __init__(self, student: TreeSoftmaxHead, teacher: nn.Module, config: DistillConfig = DistillConfig()) -> None:
        super().__init__()
        if not isinstance(student, TreeSoftmaxHead):
            raise TypeError(f"the student must be a TreeSoftmaxHead, got {type(student).__name__}")
        if getattr(teacher, "num_classes", student.num_classes) != student.num_classes:
            raise ValueError(f"the teacher has {teacher.num_classes} classes, the student {student.num_classes}")
        self.student, self.teacher, self.config = student, teacher, config
        for p in teacher.parameters():  # frozen: `fit` optimizes only what requires a gradient
            p.requires_grad_(False)
        self._index = _TreeIndex(student.tree)

    @property
    def num_classes(self) -> int:
        """V."""
        return self.student.num_classes

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """``(log p(y|h) (B,), mean distillation loss)``."""
        with torch.no_grad():
            logits = self.teacher(h) if self.config.alpha < 1.0 else None
        out = _distill(self._index, self.student, h, y, logits, self.config)
        return HeadOutput(out.log_prob, out.loss.mean())

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The student's sparse-gradient parameters (SparseAdam in `fit`)."""
        return self.student.sparse_parameters()

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) the student's log p(y | h)."""
        return self.student.log_prob(h, y)

    @torch.no_grad()
    def predict(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's exact top-``k``."""
        return self.student.predict(h, k)


def gap_closed(hard_nll: float, student_nll: float, teacher_nll: float) -> float:
    """Share of the gap between a tree trained on hard labels and the teacher that the student closes.

    ``(hard - student) / (hard - teacher)``: 1 when the student matches the teacher, 0 when
    it is no better than hard-label training, negative when worse.

    Example:
        >>> gap_closed(2.5, 2.25, 1.5)
        0.25
    """
    gap = hard_nll - teacher_nll
    if gap == 0:
        raise ValueError("the hard-label NLL equals the teacher's: there is no gap to close")
    return (hard_nll - student_nll) / gap
