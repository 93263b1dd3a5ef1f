"""Hierarchical label smoothing: smoothing mass spread over the other classes by tree distance.

Label smoothing trains on the target ``q = (1 - eps) * onehot(y) + eps * u_y`` instead of
``onehot(y)``. Three choices of ``u_y`` (`SmoothingConfig.kind`):

- ``"none"``: no smoothing (``eps`` is ignored): the plain negative log-likelihood.
- ``"uniform"``: ``u_y = 1/V`` on every class, the true one included: exactly
  ``torch.nn.functional.cross_entropy(..., label_smoothing=eps)``.
- ``"tree"``: ``u_y(c) ∝ decay ** dist(y, c)`` over the *other* classes ``c != y``, where
  ``dist`` is the number of tree edges between the two leaves
  (``depth(y) + depth(c) - 2 * depth(lca(y, c))``). Near classes (siblings, cousins) get
  more of the mass than far ones; ``decay = 1`` spreads it evenly over the other classes,
  and ``decay -> 0`` puts all of it on the nearest ones.

The targets are built per batch from lowest-common-ancestor depths (the batch's root
paths summed down the tree, one gather per depth level), never as a dense V x V table.
The exact loss (``samples=0``) is the cross-entropy against the head's log-probabilities
of *every* class, so it costs a full softmax per sample whatever the tree (for a
`TreeSoftmaxHead`, its ``log_probs_all``: one matmul per weight group, a segmented
log-softmax and root-to-leaf sums level by level). With ``samples=k``, the
smoothing term ``eps * E_{c ~ u_y}[-log p(c)]`` is estimated from k classes drawn from
``u_y`` top-down through the tree (`LabelSmoother.sample`): unbiased, and the cost of
k + 1 paths instead of all V classes, which keeps a tree head's training cheap at large V.

Example:
    >>> from tree_search.builders import huffman
    >>> from tree_search.heads import TreeSoftmaxHead
    >>> tree = huffman([5, 3, 2, 1])
    >>> smoother = LabelSmoother(4, SmoothingConfig(epsilon=0.1, kind="tree", decay=0.5), tree)
    >>> smoother.targets(torch.tensor([0])).sum().item()  # doctest: +SKIP
    1.0
    >>> head = SmoothedHead(TreeSoftmaxHead(tree, dim=8), SmoothingConfig(epsilon=0.1))
    >>> output, loss = head(torch.randn(2, 8), torch.tensor([0, 3]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tree_search.heads.paths import DeviceArrays, LevelSums
from tree_search.heads.tree_head import HeadOutput
from tree_search.tree import Tree

__all__ = [
    "SMOOTHING_KINDS",
    "LabelSmoother",
    "SmoothedHead",
    "SmoothingConfig",
    "tree_distances",
]

SMOOTHING_KINDS = ("none", "uniform", "tree")


@dataclass(frozen=True)
class SmoothingConfig:
    """Which label smoothing a head trains with (see the module docstring)."""

    epsilon: float = 0.1  # probability mass moved off the true class
    kind: str = "tree"  # "none", "uniform" (torch's label_smoothing) or "tree" (decay ** tree distance)
    decay: float = 0.5  # kind="tree": weight ratio per extra edge between the true class and another
    samples: int = 0  # 0: exact (dense targets, a full softmax's cost); k > 0: k classes drawn per row (unbiased)

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"SmoothingConfig.samples must be >= 0 (0: exact), got {self.samples}")
        if self.kind not in SMOOTHING_KINDS:
            raise ValueError(f"SmoothingConfig.kind must be one of {SMOOTHING_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"SmoothingConfig.epsilon must be in [0, 1), got {self.epsilon}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"SmoothingConfig.decay must be in (0, 1], got {self.decay}")


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-d integer tensor, got shape {tuple(y.shape)} and {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")


class _Distances:
    """Tree distances from a batch of classes to every class, with the tree's arrays kept on a device."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        ptr, nodes, _ = tree.packed_paths()
        self._levels = LevelSums(tree)
        self._arrays = DeviceArrays(
            {
                "ptr": torch.from_numpy(ptr.astype(np.int64)),
                "nodes": torch.from_numpy(nodes.astype(np.int64)),
                "depth": torch.from_numpy(tree.depth.astype(np.int64)),
                "leaf_parent": torch.from_numpy(tree.leaf_parent.astype(np.int64)),
            }
        )

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        _check_labels(y, self.tree.num_classes)
        y = y.long()
        a = self._arrays.on(y.device)
        B = y.shape[0]
        start, length = a["ptr"][y], a["ptr"][y + 1] - a["ptr"][y]
        rows = torch.repeat_interleave(torch.arange(B, device=y.device), length)
        offset = torch.arange(rows.shape[0], device=y.device) - torch.repeat_interleave(
            torch.cumsum(length, 0) - length, length
        )
        on_path = torch.zeros(B, self.tree.num_internal, dtype=torch.int32, device=y.device)
        on_path[rows, a["nodes"][start[rows] + offset]] = 1  # (B, I) 1 where node n is on y_b's path
        # internal nodes shared by the root paths of y_b and of class c = depth(lca) + 1 (the root has depth 0)
        common = self._levels.accumulate(on_path)[:, a["leaf_parent"]]  # (B, V)
        depth = a["depth"]
        dist = depth[y][:, None] + depth[None, :] - 2 * (common - 1)
        return dist.scatter(1, y[:, None], 0)


def tree_distances(tree: Tree, y: torch.Tensor) -> torch.Tensor:
    """(B, V) number of edges between class ``y[b]`` and every class in ``tree`` (0 for ``y[b]`` itself).

    Example:
        >>> from tree_search.tree import Tree
        >>> tree = Tree(3, [[0, 4], [1, 2]])  # root -> (0, node 1 -> (1, 2))
        >>> tree_distances(tree, torch.tensor([1])).tolist()
        [[3, 0, 2]]
    """
    return _Distances(tree)(y)


def _gumbel_argmax(log_weight: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) one column per row drawn with probability ∝ exp(log_weight) (-inf: never)."""
    u = torch.rand(log_weight.shape, dtype=log_weight.dtype, device=log_weight.device, generator=generator)
    return (log_weight - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(1)


class _TreeSampler:
    """Draws ``c != y`` with probability ∝ ``decay ** dist(y, c)``, top-down through the tree.

    With ``G(n) = sum_{c below n} decay ** depth(c)``, a class below the child ``k`` that
    leaves y's path at its node ``a`` (depth ``j``) weighs ``decay ** (depth(y) - 2j) *
    decay ** depth(c)``: first the branch ``(a, k)`` is drawn ∝ ``decay ** -2j * G(k)``, then
    each step down ∝ ``G(child)``. Weights are kept relative to the level (``w(e) = 1`` for a
    class child, ``decay * G'(m)`` for a node child ``m``, ``G'(n) = sum_e w(e)``) so they
    neither overflow nor underflow on deep trees; logs in float64.
    """

    def __init__(self, tree: Tree, decay: float) -> None:
        V, inner = tree.num_classes, tree.num_internal
        ptr, ids = tree.child_ptr.astype(np.int64), tree.child_ids.astype(np.int64)
        node_weight = np.zeros(inner)  # G'(n)
        entry_weight = np.ones(ids.size)  # w(e)
        owner = np.repeat(np.arange(inner), tree.fanout)
        owner_depth = tree.node_depth[owner]
        for level in range(int(tree.node_depth.max()), -1, -1):  # deepest level first
            at_level = owner_depth == level
            to_node = at_level & (ids >= V)  # children below this level are done
            entry_weight[to_node] = decay * node_weight[ids[to_node] - V]
            np.add.at(node_weight, owner[at_level], entry_weight[at_level])
        self.tree, self.log_decay = tree, math.log(decay)
        padded_nodes, padded_codes, _ = tree.paths()
        self._arrays = DeviceArrays(
            {
                "path_nodes": torch.from_numpy(padded_nodes.astype(np.int64)),  # (V, max depth), -1 padded
                "path_codes": torch.from_numpy(padded_codes.astype(np.int64)),
                "node_weight": torch.from_numpy(node_weight),
                "log_entry": torch.from_numpy(np.log(entry_weight)),
                "entry_weight": torch.from_numpy(entry_weight),
                "child_ptr": torch.from_numpy(ptr),
                "child_ids": torch.from_numpy(ids),
                "fanout": torch.from_numpy(tree.fanout.astype(np.int64)),
                "node_depth": torch.from_numpy(tree.node_depth.astype(np.float64)),
            }
        )
        self._width = int(tree.fanout.max())

    def _children(self, a: dict[str, torch.Tensor], nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) entry ids of each node's children and their validity."""
        position = torch.arange(self._width, device=nodes.device)
        valid = position[None, :] < a["fanout"][nodes][:, None]
        entries = (a["child_ptr"][nodes][:, None] + position).clamp(max=a["child_ids"].numel() - 1)
        return entries, valid

    def __call__(self, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        a = self._arrays.on(y.device)
        V = self.tree.num_classes
        nodes, codes = a["path_nodes"][y], a["path_codes"][y]  # (B, D)
        on = nodes >= 0
        safe = nodes.clamp_min(0)
        taken = a["entry_weight"][a["child_ptr"][safe] + codes.clamp_min(0)]
        rest = (a["node_weight"][safe] - taken).clamp_min(0.0)  # weight of the branches leaving the path there
        log_branch = (1.0 - a["node_depth"][safe]) * self.log_decay + torch.log(rest)
        level = _gumbel_argmax(log_branch.masked_fill(~on, float("-inf")), generator)  # (B,)
        rows = torch.arange(y.shape[0], device=y.device)
        node, code = safe[rows, level], codes[rows, level]
        entries, valid = self._children(a, node)
        valid &= torch.arange(self._width, device=y.device)[None, :] != code[:, None]  # not back onto y's path
        pick = _gumbel_argmax(a["log_entry"][entries].masked_fill(~valid, float("-inf")), generator)
        current = a["child_ids"][entries[rows, pick]]  # unified ids: < V a class, else V + node
        for _ in range(self.tree.max_depth):  # down to a class, one level per step
            inside = current >= V
            if not bool(inside.any()):
                break
            idx = torch.nonzero(inside, as_tuple=True)[0]
            entries, valid = self._children(a, current[idx] - V)
            pick = _gumbel_argmax(a["log_entry"][entries].masked_fill(~valid, float("-inf")), generator)
            current = current.index_put((idx,), a["child_ids"][entries[torch.arange(idx.numel()), pick]])
        return current


class LabelSmoother:
    """Smoothed target distributions and their cross-entropy, for `SmoothingConfig`.

    Args:
        num_classes: V.
        config: the smoothing.
        tree: the tree whose distances ``kind="tree"`` uses (any tree over the V classes:
            the head's own, or a semantic one for a full softmax).

    Example:
        >>> smoother = LabelSmoother(3, SmoothingConfig(0.3, "uniform"))
        >>> [round(v, 3) for v in smoother.targets(torch.tensor([2]))[0].tolist()]
        [0.1, 0.1, 0.8]
    """

    def __init__(self, num_classes: int, config: SmoothingConfig, tree: Tree | None = None) -> None:
        if config.kind == "tree":
            if tree is None:
                raise ValueError('SmoothingConfig(kind="tree") needs the tree whose distances spread the mass')
            if tree.num_classes != num_classes:
                raise ValueError(f"the smoothing tree has {tree.num_classes} classes, the head {num_classes}")
        self.num_classes, self.config = int(num_classes), config
        self._distances = _Distances(tree) if config.kind == "tree" else None
        self._sampler = _TreeSampler(tree, config.decay) if config.kind == "tree" and config.samples else None

    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) one class per label drawn from its smoothing distribution ``u_y`` (what ``eps`` is spread by).

        ``"uniform"``: uniform over all V classes; ``"tree"``: ``∝ decay ** dist(y, c)`` over
        ``c != y``, drawn top-down (the branch leaving y's path, then children by their
        subtree weight) in a loop over depth levels: no (B, V) table.
        """
        _check_labels(y, self.num_classes)
        if self.config.kind == "none":
            raise ValueError('kind="none" has no smoothing distribution to sample')
        if self.config.kind == "uniform":
            return torch.randint(0, self.num_classes, y.shape, device=y.device, generator=generator)
        if self._sampler is None:
            self._sampler = _TreeSampler(self._distances.tree, self.config.decay)
        return self._sampler(y.long(), generator)

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """(B, V) target distribution of each label (rows sum to one)."""
        _check_labels(y, self.num_classes)
        y = y.long()
        eps, B, V = self.config.epsilon, y.shape[0], self.num_classes
        if self.config.kind == "none" or eps == 0.0:
            return torch.zeros(B, V, device=y.device).scatter_(1, y[:, None], 1.0)
        if self.config.kind == "uniform":
            q = torch.full((B, V), eps / V, device=y.device)
            return q.scatter_(1, y[:, None], 1.0 - eps + eps / V)
        assert self._distances is not None
        if V == 1:
            raise ValueError("tree smoothing needs at least two classes to move mass to")
        log_weight = self._distances(y).float() * math.log(self.config.decay)  # (B, V) log decay ** dist
        log_weight = log_weight.scatter(1, y[:, None], float("-inf"))  # over the other classes only
        q = eps * torch.softmax(log_weight, dim=1)
        return q.scatter(1, y[:, None], 1.0 - eps)

    def loss(self, log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) cross-entropy ``-sum_c q_y(c) log p(c)`` of (B, V) ``log_probs`` against the targets of ``y``."""
        if log_probs.dim() != 2 or log_probs.shape != (y.shape[0], self.num_classes):
            raise ValueError(
                f"log_probs must be (B, V) = ({y.shape[0]}, {self.num_classes}), got {tuple(log_probs.shape)}"
            )
        q = self.targets(y)
        # classes with no target mass take no part (their log-probability may be -inf)
        return -torch.where(q > 0, q * log_probs, torch.zeros_like(log_probs)).sum(1)


class SmoothedHead(nn.Module):
    """A head whose ``forward`` loss is the label-smoothed cross-entropy; ``log_prob`` stays the head's own.

    So `tree_search.heads.fit` trains it as is (early stopping on the plain validation
    NLL). Its parameters are the wrapped head's. Exact smoothing (``samples=0``) scores every
    class (a full softmax's cost; dense gradients, so it lists no sparse parameters);
    ``samples=k`` draws k classes per row from the smoothing distribution and scores only
    their paths and the label's (an unbiased estimate of the same loss, ~(k+1) x the NLL's
    cost, sparse gradients as the head's own).

    Args:
        head: a `TreeSoftmaxHead`, `FullSoftmaxHead` or any head with ``log_probs_all``.
        config: the smoothing.
        tree: the tree of ``kind="tree"``; default the head's own (``head.tree``).

    Example:
        >>> from tree_search.builders import huffman
        >>> from tree_search.heads import FullSoftmaxHead
        >>> smoothed = SmoothedHead(FullSoftmaxHead(4, 8), SmoothingConfig(0.1, "tree"), tree=huffman([5, 3, 2, 1]))
        >>> output, loss = smoothed(torch.randn(2, 8), torch.tensor([0, 3]))
    """

    def __init__(self, head: nn.Module, config: SmoothingConfig = SmoothingConfig(), tree: Tree | None = None) -> None:
        super().__init__()
        self.head, self.config = head, config
        tree = tree if tree is not None else getattr(head, "tree", None)
        self.smoother = LabelSmoother(int(head.num_classes), config, tree)
        # exact smoothing needs every class's log-probability; "none" and sampled smoothing only paths
        self._on_paths = config.kind == "none" or config.epsilon == 0.0 or config.samples > 0

    @property
    def num_classes(self) -> int:
        """V."""
        return int(self.head.num_classes)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """``(log p(y|h) (B,), mean smoothed cross-entropy)``."""
        if self.config.kind == "none" or self.config.epsilon == 0.0:
            output = self.head.log_prob(h, y)
            return HeadOutput(output, -output.mean())
        if self.config.samples:  # an unbiased estimate: k classes drawn from the smoothing distribution
            k, eps = self.config.samples, self.config.epsilon
            drawn = self.smoother.sample(y.repeat_interleave(k))
            both = self.head.log_prob(torch.cat([h, h.repeat_interleave(k, 0)]), torch.cat([y.long(), drawn]))
            output, other = both[: y.shape[0]], both[y.shape[0] :].view(-1, k).mean(1)
            return HeadOutput(output, -((1.0 - eps) * output + eps * other).mean())
        log_probs = self.head.log_probs_all(h)
        output = log_probs.gather(1, y.long()[:, None]).squeeze(1)
        return HeadOutput(output, self.smoother.loss(log_probs, y).mean())

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The head's sparse-gradient parameters when the loss runs along paths (sampled or none), else none."""
        if self._on_paths and hasattr(self.head, "sparse_parameters"):
            return self.head.sparse_parameters()
        return []

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) log p(y | h) of the wrapped head."""
        return self.head.log_prob(h, y)

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities of the wrapped head."""
        return self.head.log_probs_all(h)

    @torch.no_grad()
    def predict(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` classes and log-probabilities of the wrapped head."""
        return self.head.predict(h, k)
