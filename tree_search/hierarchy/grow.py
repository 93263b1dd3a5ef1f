"""Growing a trained head: add new classes to a `TreeSoftmaxHead` and its tree (`tree_search.builders.grow_tree`).

New classes get the next ids (``V, V+1, ...``); every existing internal node keeps its id and
its weights. Two ways to attach a new class:

- ``"sibling"`` (default): the new class becomes one more child of an existing internal node.
  Only that node's softmax changes, so only the classes below it change probability (each
  loses the same share); every other class's log-probability is unchanged.
- ``"split"``: the new class splits an existing class's leaf into a new binary node
  ``(old class, new class)``; only the old class changes, by exactly ``log(1 - prior)``.

Where to attach (placement):

- by embedding (`tree_search.builders.nearest_classes`): the existing class nearest by cosine to a vector given
  for the new class (e.g. rows of the model's input embeddings); ``"sibling"`` attaches the
  new class under that class's parent, ``"split"`` splits that class's leaf;
- by frequency (`tree_search.builders.place_by_frequency`): under the internal node whose children's mean mass,
  ``mass(n) / fanout(n)``, is closest (in log) to the new class's count, so the new class
  joins siblings of its own frequency, about the depth a Huffman tree would give it.

Initial weights of a new child (docs/architecture.md's scores ``s(n, c) = w_c . P_n h + b_c``):

- ``"sibling"``: ``w_new`` is the anchor class's row when the anchor is a sibling (placement
  by embedding: the new class starts out scoring like its nearest class), else the mean of
  the node's rows; ``b_new`` is set so that at ``h = 0`` (where scores are the biases) the new
  class gets ``prior`` of the node's probability: ``b_new = log(prior / (1 - K prior)) +
  logsumexp(b)`` for K new children of the node.
- ``"split"``: the new node's rows are zero, the old class's bias 0 and the new class's
  ``log(prior / (1 - K prior))``: ``p(new | node) = prior`` for every ``h``.

Growing copies each node's parameters once (a Python loop over internal nodes, ~0.1 ms each):
an edit made once, not a training or inference path.

Example:
    >>> import torch
    >>> from tree_search.builders import huffman
    >>> from tree_search.heads import TreeSoftmaxHead
    >>> head = TreeSoftmaxHead(huffman([50, 30, 10, 5, 5]), dim=4)
    >>> grown = grow_head(head, [1], prior=0.05)  # class 5 joins internal node 1's children
    >>> grown.tree.num_classes, round(float(grown.log_probs_all(torch.randn(3, 4)).detach().exp().sum(-1)[0]), 4)
    (6, 1.0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tree_search.builders.grow import checked_ids, grow_tree, nearest_classes, place_by_frequency
from tree_search.heads.tree_head import TreeSoftmaxHead

__all__ = ["GrowResult", "grow_by_embedding", "grow_by_frequency", "grow_head"]


@dataclass(frozen=True)
class GrowResult:
    """A grown head, and where each new class went."""

    head: TreeSoftmaxHead  # the new head; its tree is ``head.tree``
    targets: np.ndarray  # (K,) what was grown: internal nodes ("sibling") or classes split ("split")
    anchors: np.ndarray | None  # (K,) the nearest existing class of each new class (placement by embedding)
    attach: str  # "sibling" or "split"


def _check_prior(prior: float, children_added: np.ndarray) -> None:
    if not (isinstance(prior, (int, float)) and 0 < prior < 1):
        raise ValueError(f"prior must be a number in (0, 1), got {prior!r}")
    most = int(children_added.max())
    if most * prior >= 1:
        raise ValueError(f"{most} new classes share one node, each with prior {prior}: their total must stay below 1")


def grow_head(
    head: TreeSoftmaxHead,
    targets: Sequence[int] | np.ndarray,
    *,
    attach: str = "sibling",
    prior: float = 0.01,
    anchors: Sequence[int] | np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    counts: Sequence[float] | np.ndarray | None = None,
) -> TreeSoftmaxHead:
    """A new head on ``grow_tree(head.tree, targets, attach)``, with the old head's weights for every old node.

    Args:
        head: a (trained) head; it is not modified.
        targets: (K,) as in `grow_tree`.
        attach: ``"sibling"`` or ``"split"`` (see the module docstring).
        prior: the new class's initial share of its node (module docstring: exact at ``h = 0``
            for ``"sibling"``, for every ``h`` for ``"split"``).
        anchors: (K,) for ``"sibling"``: an existing child class of ``targets[k]`` whose weight
            row new class ``k`` copies (None: the mean of the node's rows).
        labels: (K,) tokens of the new classes, appended to ``head.labels`` when it has them.
        counts: (K,) counts of the new classes, appended to ``head.counts`` when it has them.

    Returns:
        The grown head (same settings, dtype and device).

    Raises:
        ValueError: a target out of range, an anchor that is not a child class of its target,
            a prior outside (0, 1) or K new children of one node with ``K * prior >= 1``, or a
            target node without biases (the prior needs one).
    """
    old = head.tree
    V, I = old.num_classes, old.num_internal  # noqa: E741 (I is the paper's name)
    tree = grow_tree(old, targets, attach)
    targets = np.asarray(targets, dtype=np.int64)
    K = targets.size
    _check_prior(prior, np.bincount(targets))
    bias_free = set(head._settings.get("bias_free_nodes", ()))  # noqa: SLF001 - the head's own settings
    if not head.bias or (attach == "sibling" and bias_free & set(targets.tolist())):
        raise ValueError("the new class's prior is set through its node's biases, and the target node has none")
    if anchors is not None:
        if attach != "sibling":
            raise ValueError("anchors are for attach='sibling' (a split node's rows start at zero)")
        anchors = checked_ids(anchors, "anchors", 0, V, "a class")
        if anchors.size != K or np.any(old.leaf_parent[anchors] != targets):
            k = int(np.flatnonzero(old.leaf_parent[anchors] != targets)[0]) if anchors.size == K else 0
            raise ValueError(f"anchors must be K={K} classes, anchors[k] a child of targets[k]; anchor {k} is not")
    settings = dict(head._settings)  # noqa: SLF001 - what `save` writes and `load` rebuilds from
    settings["projections"] = {int(n): int(size) for n, size in settings["projections"].items()}
    grown = TreeSoftmaxHead(tree, settings.pop("dim"), **settings)
    dtype, device = next(head.parameters()).dtype, next(head.parameters()).device
    # Copy through float64: an unchanged node's stored float32 values come back bit for bit.
    source = copy.deepcopy(head).to(device=device, dtype=torch.float64)
    grown = grown.to(device=device, dtype=torch.float64)
    reference = next(grown.parameters())
    grown_nodes = set(targets.tolist()) if attach == "sibling" else set()
    for node in range(I):
        weight, bias, projection = source.node_parameters(node)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        if node in grown_nodes:
            mine = np.flatnonzero(targets == node)
            share = math.log(prior) - math.log1p(-prior * mine.size)
            if anchors is not None:
                rows = weight[torch.as_tensor(old.leaf_child_index[anchors[mine]], device=weight.device)]
            else:
                rows = weight.mean(0, keepdim=True).expand(mine.size, -1)
            new_bias = torch.full((mine.size,), share, dtype=bias.dtype, device=bias.device) + torch.logsumexp(bias, 0)
            weight, bias = torch.cat([weight, rows]), torch.cat([bias, new_bias])
        grown.set_node_parameters(node, weight, None if node in bias_free else bias, projection)
    if attach == "split":
        for node in range(I, tree.num_internal):
            fanout = int(tree.fanout[node])
            share = math.log(prior) - math.log1p(-prior * (fanout - 1))
            bias = torch.full((fanout,), share, dtype=reference.dtype, device=reference.device)
            bias[0] = 0.0  # the old class
            grown.set_node_parameters(node, torch.zeros(fanout, head.dim, dtype=reference.dtype,
                                                         device=reference.device), bias)  # fmt: skip
    grown = grown.to(dtype=dtype)
    grown.labels = None
    if head.labels is not None:
        if labels is None or len(labels) != K:
            raise ValueError(f"the head has labels: give the {K} new classes' labels")
        grown.labels = [*head.labels, *labels]
    grown.counts = None
    if head.counts is not None and counts is not None:
        grown.counts = np.concatenate([np.asarray(head.counts, dtype=np.float64), np.asarray(counts, np.float64)])
    grown.metadata = {**head.metadata, "grown_from": {"num_classes": V, "attach": attach, "targets": targets.tolist()}}
    return grown.train(head.training)


def grow_by_embedding(
    head: TreeSoftmaxHead,
    class_vectors: np.ndarray,
    new_vectors: np.ndarray,
    *,
    attach: str = "sibling",
    prior: float = 0.01,
    labels: Sequence[str] | None = None,
) -> GrowResult:
    """Attach each new class next to its nearest existing class by cosine (see the module docstring).

    ``"sibling"``: under the nearest class's parent, starting with that class's weight row;
    ``"split"``: splitting the nearest class's leaf.
    """
    anchors = nearest_classes(class_vectors, new_vectors)
    if class_vectors.shape[0] != head.num_classes:
        raise ValueError(f"class_vectors has {class_vectors.shape[0]} rows; the head has {head.num_classes} classes")
    if attach == "sibling":
        targets = head.tree.leaf_parent[anchors]
        grown = grow_head(head, targets, attach="sibling", prior=prior, anchors=anchors, labels=labels)
    else:
        targets = anchors
        grown = grow_head(head, targets, attach=attach, prior=prior, labels=labels)
    return GrowResult(grown, np.asarray(targets), anchors, attach)


def grow_by_frequency(
    head: TreeSoftmaxHead,
    counts: np.ndarray,
    new_counts: Sequence[float] | np.ndarray,
    *,
    prior: float = 0.01,
    labels: Sequence[str] | None = None,
) -> GrowResult:
    """Attach each new class as a child of the node whose children weigh about as much (`place_by_frequency`).

    The new rows are the mean of the node's rows.
    """
    targets = place_by_frequency(head.tree, counts, new_counts)
    grown = grow_head(head, targets, attach="sibling", prior=prior, labels=labels, counts=new_counts)
    return GrowResult(grown, targets, None, "sibling")
