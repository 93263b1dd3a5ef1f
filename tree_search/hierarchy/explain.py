"""Path audit of a `TreeSoftmaxHead`: why it predicted what it did, and where it is unsure.

`explain(head, h)` walks each input's predicted path and records every decision: the node,
the child taken, its probability ``p(child | node, h)``, the best other child (the
runner-up) and its probability. A path's confidence is the product of its branch
probabilities (the class's probability) and their minimum (its weakest decision). Over
many inputs, `Explanation.least_confident` ranks the nodes by the mean probability of the
branch taken there (with the mean margin over the runner-up, and how many inputs passed).
Given the true classes, it also finds where each true path left the predicted one: the
deepest node both paths share, the child the model took and the one it should have taken
(`Explanation.departures` ranks those nodes).

The predicted path is the exact argmax class's (``path="argmax"``, as ``head.predict``
answers; its branch need not be the most probable at every node, so a margin can be
negative) or the greedy descent's (``path="greedy"``: the most probable child everywhere).
`Explanation.table` renders the audit as text, `Explanation.plot` as a PNG (matplotlib,
imported only there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tree_search.heads.tree_head import TreeSoftmaxHead
from tree_search.hierarchy.levels import check_head_inputs, class_vertices, greedy_descent
from tree_search.tree import Tree

__all__ = ["Explanation", "NodeStats", "describe", "explain"]

PATHS = ("argmax", "greedy")


def describe(tree: Tree, unified: int, labels: Sequence[str] | None = None, counts=None, top: int = 3) -> str:
    """A short readable name of a class (its token) or of an internal node (its most frequent classes).

    ``unified`` is a class id ``y < V`` or ``V + u`` for internal node ``u``.

    Example:
        >>> describe(Tree(3, [[0, 4], [1, 2]]), 4, labels=["a", "b", "c"])
        "node 1 (2 classes: 'b' 'c')"
    """
    V = tree.num_classes
    if unified < V:
        return repr(labels[unified]) if labels is not None else f"#{unified}"
    node = unified - V
    ptr, path_nodes, _ = tree.packed_paths()
    owner = np.repeat(np.arange(V), np.diff(ptr))
    below = owner[path_nodes == node]  # the classes whose path passes the node
    if counts is not None:
        below = below[np.argsort(-np.asarray(counts, dtype=float)[below], kind="stable")]
    shown = " ".join(repr(labels[c]) if labels is not None else f"#{c}" for c in below[:top])
    more = " ..." if below.size > top else ""
    return f"node {node} ({below.size:,} classes: {shown}{more})"


@dataclass(frozen=True)
class NodeStats:
    """Per-node confidence over many inputs, one entry per node (ranked by the method that made it)."""

    nodes: np.ndarray  # (K,) internal node ids
    inputs: np.ndarray  # (K,) inputs whose path passed the node
    mean_prob: np.ndarray  # (K,) mean probability of the child taken there
    mean_margin: np.ndarray  # (K,) mean (probability taken - runner-up's)


@dataclass(frozen=True)
class Explanation:
    """What `explain` returns: per input the decisions on its predicted path, and summaries.

    Tables are (B, D) with column k the k-th decision of the path (k = 0 at the root),
    padded with -1 (ids) and NaN (probabilities) past ``length``. ``V + u`` is internal
    node ``u`` in the ``chosen``/``runner_up``/``true_child`` columns.
    """

    tree: Tree
    labels: Sequence[str] | None  # class tokens, for display
    counts: np.ndarray | None  # class counts, to name nodes by their frequent classes
    path: str  # "argmax" or "greedy"
    classes: np.ndarray  # (B,) predicted class
    length: np.ndarray  # (B,) decisions on the predicted path
    nodes: np.ndarray  # (B, D) node of each decision
    chosen: np.ndarray  # (B, D) child taken (unified id)
    chosen_prob: np.ndarray  # (B, D) its probability
    runner_up: np.ndarray  # (B, D) the most probable other child
    runner_up_prob: np.ndarray  # (B, D) its probability
    path_prob: np.ndarray  # (B,) product of the branch probabilities: p(predicted class | h)
    min_prob: np.ndarray  # (B,) the weakest branch probability of the path
    true: np.ndarray | None = None  # (B,) true classes, when given
    left_node: np.ndarray | None = None  # (B,) node where the true path left the predicted one; -1: none
    left_depth: np.ndarray | None = None  # (B,) its depth (-1: none)
    true_child: np.ndarray | None = None  # (B,) the child towards the true class at that node (unified id)
    true_child_prob: np.ndarray | None = None  # (B,) its probability (NaN: none)

    def name(self, unified: int) -> str:
        """Readable name of a class or of an internal node ``V + u``."""
        return describe(self.tree, int(unified), self.labels, self.counts)

    def decisions(self, i: int) -> list[dict]:
        """The decisions on input ``i``'s predicted path, root first."""
        return [
            {"depth": k, "node": int(self.nodes[i, k]), "chosen": int(self.chosen[i, k]),
             "chosen_prob": float(self.chosen_prob[i, k]), "runner_up": int(self.runner_up[i, k]),
             "runner_up_prob": float(self.runner_up_prob[i, k])}
            for k in range(int(self.length[i]))
        ]  # fmt: skip

    def node_stats(self) -> NodeStats:
        """Confidence of every node that some predicted path passed, by node id."""
        mask = self.nodes >= 0
        nodes = self.nodes[mask]
        num_internal = self.tree.num_internal
        visits = np.bincount(nodes, minlength=num_internal)
        prob = np.bincount(nodes, weights=self.chosen_prob[mask], minlength=num_internal)
        margin = np.bincount(nodes, weights=(self.chosen_prob - self.runner_up_prob)[mask], minlength=num_internal)
        seen = np.flatnonzero(visits)
        return NodeStats(seen, visits[seen], prob[seen] / visits[seen], margin[seen] / visits[seen])

    def least_confident(self, top: int = 10, min_inputs: int = 1) -> NodeStats:
        """The ``top`` nodes passed by at least ``min_inputs`` inputs with the lowest mean branch probability."""
        stats = self.node_stats()
        keep = np.flatnonzero(stats.inputs >= min_inputs)
        order = keep[np.lexsort((-stats.inputs[keep], stats.mean_prob[keep]))][:top]
        return NodeStats(stats.nodes[order], stats.inputs[order], stats.mean_prob[order], stats.mean_margin[order])

    def departures(self, top: int = 10) -> NodeStats:
        """Nodes where true paths left the predicted ones, most frequent first.

        ``inputs`` counts the departures at the node, ``mean_prob`` is the mean probability of
        the true child there and ``mean_margin`` the mean (true child's - child taken's).
        """
        if self.true is None:
            raise ValueError("departures need the true classes: call explain(head, h, y)")
        left = self.left_node >= 0
        rows = np.flatnonzero(left)
        nodes = self.left_node[rows]
        taken = self.chosen_prob[rows, self.left_depth[rows]]
        num_internal = self.tree.num_internal
        count = np.bincount(nodes, minlength=num_internal)
        prob = np.bincount(nodes, weights=self.true_child_prob[rows], minlength=num_internal)
        margin = np.bincount(nodes, weights=self.true_child_prob[rows] - taken, minlength=num_internal)
        seen = np.flatnonzero(count)
        order = seen[np.lexsort((seen, -count[seen]))][:top]
        return NodeStats(order, count[order], prob[order] / count[order], margin[order] / count[order])

    def table(self, rows: int = 3, top: int = 10, min_inputs: int = 1) -> str:
        """A text report: the first ``rows`` inputs' paths, the ``top`` least confident nodes, departures."""
        lines: list[str] = []
        for i in range(min(rows, self.classes.shape[0])):
            head = (f"input {i}: predicted {self.name(self.classes[i])}, p={self.path_prob[i]:.4f}, "
                    f"weakest branch {self.min_prob[i]:.4f}")  # fmt: skip
            if self.true is not None:
                if self.left_node[i] < 0:
                    head += ", correct"
                else:
                    head += (f"; true {self.name(self.true[i])} left the path at depth {self.left_depth[i]} "
                             f"(node {self.left_node[i]}) towards {self.name(self.true_child[i])} "
                             f"p={self.true_child_prob[i]:.4f}")  # fmt: skip
            lines.append(head)
            lines.append(f"  {'depth':>5}  {'node':<40} {'chosen':<40} {'p':>7}  {'runner-up':<40} {'p':>7}")
            V = self.tree.num_classes
            for d in self.decisions(i):
                lines.append(
                    f"  {d['depth']:>5}  {_cut(self.name(V + d['node'])):<40} {_cut(self.name(d['chosen'])):<40} "
                    f"{d['chosen_prob']:>7.4f}  {_cut(self.name(d['runner_up'])):<40} {d['runner_up_prob']:>7.4f}"
                )
        n = self.classes.shape[0]
        lines.append(f"least confident nodes over {n:,} inputs ({self.path} paths, at least {min_inputs} inputs):")
        lines.append(f"  {'node':<60} {'inputs':>7} {'mean p':>7} {'margin':>7}")
        stats = self.least_confident(top, min_inputs)
        V = self.tree.num_classes
        for node, count, prob, margin in zip(
            stats.nodes, stats.inputs, stats.mean_prob, stats.mean_margin, strict=True
        ):
            lines.append(f"  {_cut(self.name(V + node), 60):<60} {count:>7,} {prob:>7.4f} {margin:>7.4f}")
        if not len(stats.nodes):
            lines.append(f"  (no node was passed by {min_inputs} inputs: lower min_inputs)")
        if self.true is not None:
            wrong = int((self.left_node >= 0).sum())
            lines.append(f"where the true path left the predicted one ({wrong:,} of {n:,} inputs mispredicted):")
            lines.append(f"  {'node':<60} {'inputs':>7} {'p true':>7} {'margin':>7}")
            away = self.departures(top)
            for node, count, prob, margin in zip(
                away.nodes, away.inputs, away.mean_prob, away.mean_margin, strict=True
            ):
                lines.append(f"  {_cut(self.name(V + node), 60):<60} {count:>7,} {prob:>7.4f} {margin:>7.4f}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str], top: int = 15, min_inputs: int = 1, title: str | None = None) -> None:
        """Write a PNG: the least confident nodes' mean branch probability and margin (and departures, given truths).

        Needs matplotlib (the ``search`` extra).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError('Explanation.plot needs matplotlib: pip install "tree_search[search]"') from None
        V = self.tree.num_classes
        stats = self.least_confident(top, min_inputs)
        panels = [("mean probability of the branch taken", stats, stats.mean_prob),
                  ("mean margin over the runner-up", stats, stats.mean_margin)]  # fmt: skip
        if self.true is not None and bool((self.left_node >= 0).any()):
            away = self.departures(top)
            panels.append(("inputs whose true path left here", away, away.inputs.astype(float)))
        rows = max(len(p[1].nodes) for p in panels)
        figure = Figure(figsize=(6.5 * len(panels), 1.2 + 0.42 * max(rows, 3)), layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, (label, data, values) in zip(axes, panels, strict=True):
            names = [f"{_cut(self.name(V + n), 44)} [{c:,}]" for n, c in zip(data.nodes, data.inputs, strict=True)]
            ax.barh(np.arange(len(names)), values, color="#4477aa")
            ax.set_yticks(np.arange(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        figure.suptitle(title or f"least confident nodes over {self.classes.shape[0]:,} inputs [inputs passing]")
        figure.savefig(path, dpi=120)


def _cut(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@torch.no_grad()
def explain(
    head: TreeSoftmaxHead,
    h: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    path: str = "argmax",
    labels: Sequence[str] | None = None,
    chunk: int = 1024,
) -> Explanation:
    """Audit the predicted path of every input: each decision, path confidence, least confident nodes.

    Args:
        head: the trained head.
        h: (B, d) inputs.
        y: optional (B,) true classes: then where each true path left the predicted one.
        path: ``"argmax"`` (the exact top-1 class's path) or ``"greedy"`` (the greedy descent).
        labels: class tokens for display (default: the head's).
        chunk: inputs scored at once.

    Example:
        >>> head = TreeSoftmaxHead(Tree(3, [[0, 4], [1, 2]]), dim=4)
        >>> audit = explain(head, torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        >>> audit.decisions(0)[0]["node"], audit.path_prob.shape
        (0, (8,))
        >>> print(audit.table(rows=0, top=2))  # doctest: +SKIP
    """
    check_head_inputs(head, h, y)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if y is not None and bool((y == head.ignore_index).any()):
        raise ValueError("y holds ignore_index targets; drop them before explain")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.shape[0] == 0:
        raise ValueError("explain needs at least one input (h has 0 rows)")
    tree, V, D = head.tree, head.num_classes, head.tree.max_depth
    position = torch.from_numpy(np.concatenate([tree.leaf_child_index, tree.node_child_index]).astype(np.int64))
    position = position.to(h.device)  # index of each unified id among its parent's children (root: unused)
    parts: dict[str, list[torch.Tensor]] = {}
    for begin in range(0, h.shape[0], chunk):
        hc = h[begin : begin + chunk]
        B = hc.shape[0]
        if path == "greedy":
            classes = greedy_descent(head, hc).answer
        else:
            classes = head.predict(hc, 1)[0][:, 0]
        rows, nodes, child, step = head.path_pairs(classes)
        log_sm = head.node_log_softmax(hc, rows, nodes).float()  # (P, F)
        taken = log_sm.gather(1, child[:, None]).squeeze(1)
        other_lp, other_pos = log_sm.scatter(1, child[:, None], float("-inf")).max(1)
        table = {
            "nodes": torch.full((B, D), -1, dtype=torch.int64, device=h.device),
            "chosen": torch.full((B, D), -1, dtype=torch.int64, device=h.device),
            "runner_up": torch.full((B, D), -1, dtype=torch.int64, device=h.device),
            "chosen_prob": torch.full((B, D), float("nan"), device=h.device),
            "runner_up_prob": torch.full((B, D), float("nan"), device=h.device),
        }
        table["nodes"][rows, step] = nodes
        table["chosen"][rows, step] = head.child_id(nodes, child)
        table["runner_up"][rows, step] = head.child_id(nodes, other_pos)
        table["chosen_prob"][rows, step] = taken.exp()
        table["runner_up_prob"][rows, step] = other_lp.exp()
        table["classes"] = classes
        table["length"] = (table["nodes"] >= 0).sum(1)
        table["path_prob"] = torch.zeros(B, device=h.device).index_add_(0, rows, taken).exp()
        table["min_prob"] = table["chosen_prob"].nan_to_num(nan=1.0).amin(1)
        if y is not None:
            yc = y[begin : begin + chunk].long()
            truth, predicted = class_vertices(tree, yc, D), class_vertices(tree, classes, D)
            differ = (truth != predicted) & (truth >= 0)  # (B, D + 1); column 0 (the root) never differs
            wrong = differ.any(1)
            first = differ.float().argmax(1)  # first differing depth, >= 1 where wrong
            at = (first - 1).clamp(min=0)
            left = truth.gather(1, at[:, None]).squeeze(1) - V
            true_child = truth.gather(1, first[:, None]).squeeze(1)
            true_prob = torch.full((B,), float("nan"), device=h.device)
            idx = torch.nonzero(wrong, as_tuple=True)[0]
            if idx.numel():
                there = head.node_log_softmax(hc, idx, left[idx]).float()
                true_prob[idx] = there.gather(1, position[true_child[idx]][:, None]).squeeze(1).exp()
            table["true"] = yc
            table["left_node"] = torch.where(wrong, left, -1)
            table["left_depth"] = torch.where(wrong, first - 1, -1)
            table["true_child"] = torch.where(wrong, true_child, -1)
            table["true_child_prob"] = true_prob
        for key, value in table.items():
            parts.setdefault(key, []).append(value)
    arrays = {key: torch.cat(value).cpu().numpy() for key, value in parts.items()}
    return Explanation(
        tree=tree,
        labels=labels if labels is not None else head.labels,
        counts=head.counts,
        path=path,
        **arrays,
    )
