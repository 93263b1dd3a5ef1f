"""`TreeSoftmaxHead`: one hierarchical-softmax head for any `Tree`.

For class y with path (n1, c1), ..., (nL, cL) from the root,
``log p(y|h) = sum_k [ s(n_k, c_k) - logsumexp_c s(n_k, c) ]`` with
``s(n, c) = w_{n,c} . P_n h + b_{n,c}`` (docs/architecture.md, "Maths the heads share").

Layout, chosen from the tree's shape so that both extremes are fast:

- **Dense nodes**: the few widest nodes (fanout above `dense_fanout`, at most
  `max_dense_nodes` of them) and every node with a projection each own a weight block
  (fanout, dim_n). Their scores are one matmul over the samples that pass through them.
  This is the adaptive-softmax shape: a wide root plus a handful of tail clusters.
- **Packed nodes**: all other nodes are grouped in buckets by fanout rounded up to a
  power of two, each bucket one (nodes, width, dim) tensor. For each (sample, node) pair
  on the samples' actual paths (packed: no padding to the deepest path), the node's
  weights are gathered and scored. Binary and n-ary Huffman trees live here.

A Python loop runs over these groups only (a handful), never over samples or nodes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tree_search.cost import LAYOUT_DEFAULTS, head_layout
from tree_search.export import load_tree
from tree_search.heads.beam import BeamDecoder
from tree_search.heads.gathered import gathered_scores
from tree_search.heads.paths import DeviceArrays, LevelSums, packed_path_pairs
from tree_search.heads.schedule import step_scale
from tree_search.tree import Tree

__all__ = ["HEAD_FILE_FORMAT", "HeadOutput", "TreeSoftmaxHead"]

HEAD_FILE_FORMAT = "tree_search.head"  # `TreeSoftmaxHead.save` files: the tree, the settings and the weights
REDUCTIONS = ("mean", "sum", "none")
CHUNK_NUMBERS = 1 << 26  # `log_probs_all` and `predict` take rows in chunks whose big tensors stay near this size


class HeadOutput(NamedTuple):
    """What a head's ``forward`` returns, as in `torch.nn.AdaptiveLogSoftmaxWithLoss`."""

    output: torch.Tensor  # (B,) log-probability of each target
    loss: torch.Tensor  # () mean negative log-likelihood


class _WholeTree:
    """Scores of every child of every internal node of a head at once (what `log_probs_all` needs).

    One matmul per weight group of the head (its dense nodes, its shared top block, its
    packed buckets), differentiable with respect to the head's parameters; the columns are
    the tree's child entries in CSR order (``tree.child_ptr``/``child_ids``). Index arrays
    are built once per head and kept per device.
    """

    def __init__(self, head: TreeSoftmaxHead) -> None:
        tree = head.tree
        ptr, fanout = tree.child_ptr.astype(np.int64), tree.fanout.astype(np.int64)
        group_of, local_of = head._group_of.cpu().numpy(), head._local_of.cpu().numpy()
        num_dense = len(head._dense_nodes)
        positions, host = [], {}
        for node in head._dense_nodes:
            positions.append(ptr[node] + np.arange(fanout[node]))
        top = np.flatnonzero(group_of == num_dense)
        column_entry = np.zeros(int(head.top_weight.shape[0]), dtype=np.int64)
        if top.size:
            owner = np.repeat(top, fanout[top])
            within = np.arange(owner.size) - np.repeat(np.cumsum(fanout[top]) - fanout[top], fanout[top])
            column_entry[local_of[owner] + within] = ptr[owner] + within
            positions.append(column_entry)
        self._has_top = bool(top.size)
        self._buckets = len(head._bucket_widths)
        for b, width in enumerate(head._bucket_widths):
            members = np.flatnonzero(group_of == num_dense + 1 + b)
            members = members[np.argsort(local_of[members])]  # row r of the bucket is members[r]
            valid = np.arange(width)[None, :] < fanout[members][:, None]  # (M, width)
            flat = np.flatnonzero(valid.ravel())
            host[f"bucket_columns_{b}"] = torch.from_numpy(flat)
            positions.append((ptr[members][:, None] + np.arange(width)[None, :]).ravel()[flat])
        position = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        if not np.array_equal(np.sort(position), np.arange(tree.child_ids.size)):
            raise RuntimeError("the head's weight layout does not cover every child entry once")
        host["order"] = torch.from_numpy(np.argsort(position))  # concatenated column -> CSR entry
        host["owner"] = torch.from_numpy(np.repeat(np.arange(tree.num_internal), fanout))  # (E,) node of each entry
        # the entry through which each internal node (the root: none, entry 0 masked) and each class is reached
        node_entry = ptr[np.maximum(tree.node_parent, 0)] + np.maximum(tree.node_child_index, 0)
        host["node_entry"] = torch.from_numpy(node_entry.astype(np.int64))
        host["not_root"] = torch.from_numpy(tree.node_parent >= 0)
        host["leaf_entry"] = torch.from_numpy((ptr[tree.leaf_parent] + tree.leaf_child_index).astype(np.int64))
        host["leaf_parent"] = torch.from_numpy(tree.leaf_parent.astype(np.int64))
        self._arrays = DeviceArrays(host)
        self.levels = LevelSums(tree)

    def child_scores(self, head: TreeSoftmaxHead, h: torch.Tensor) -> torch.Tensor:
        """(B, E) score of every child entry, CSR order, in float32 or wider.

        The scores of `TreeSoftmaxHead._pair_scores`, for every node at once: the same
        weights, scales and bias masks (bias-free nodes' stored biases take no part).
        """
        a = self._arrays.on(h.device)
        parts = []
        for k in range(len(head._dense_nodes)):
            z = head.dense_projections[k](h)
            weight, bias = head.dense_weights[k], head.dense_biases[k]
            s = torch.addmm(bias, z, weight.t()) if head._dense_biased[k] else z @ weight.t()
            parts.append(s * head._dense_scale[k])
        if self._has_top:
            bias = head.top_bias * head._top_bias_keep if head._top_bias_masked else head.top_bias
            s = torch.addmm(bias, h, head.top_weight.t()) if head.bias else h @ head.top_weight.t()
            parts.append(s * head._top_scale)
        for b in range(self._buckets):
            weight = head.bucket_weights[b].view(-1, head.dim)  # (M * width, d)
            s = h @ weight.t()
            if head.bias:
                bias = head.bucket_biases[b]
                if head._bucket_bias_masked[b]:
                    bias = bias * getattr(head, f"_bucket_bias_keep_{b}")
                s = s + bias.reshape(-1)
            parts.append((s * head._bucket_scale[b])[:, a[f"bucket_columns_{b}"]])
        acc = torch.promote_types(h.dtype, torch.float32)
        return torch.cat(parts, 1)[:, a["order"]].to(acc)

    def entry_log_probs(self, head: TreeSoftmaxHead, h: torch.Tensor) -> torch.Tensor:
        """(B, E) log p(child | node) of every child entry, CSR order (a segmented log-softmax)."""
        a = self._arrays.on(h.device)
        s = self.child_scores(head, h)  # (B, E)
        B, inner, owner = s.shape[0], head.tree.num_internal, a["owner"]
        peak = torch.full((B, inner), float("-inf"), dtype=s.dtype, device=s.device)
        peak = peak.scatter_reduce(1, owner[None, :].expand(B, -1), s.detach(), "amax")
        z = torch.exp(s - peak[:, owner])
        lse = torch.log(torch.zeros(B, inner, dtype=s.dtype, device=s.device).index_add(1, owner, z)) + peak
        return s - lse[:, owner]

    def log_probs_all(self, head: TreeSoftmaxHead, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities of every class (root-to-node sums level by level: work ~ B x (V + I))."""
        a = self._arrays.on(h.device)
        entry_lp = self.entry_log_probs(head, h)
        step = torch.where(a["not_root"], entry_lp[:, a["node_entry"]], 0.0)  # the root is reached for sure
        reach = self.levels.accumulate(step)  # (B, I) log p(reach node)
        return reach[:, a["leaf_parent"]] + entry_lp[:, a["leaf_entry"]]


class TreeSoftmaxHead(nn.Module, BeamDecoder):
    """Hierarchical softmax over an arbitrary tree.

    Args:
        tree: the tree; its classes are the head's output classes.
        dim: input size d.
        projections: optional ``{internal node: projected dim}``; node ``n`` then scores
            its children as ``w_c . (P_n h) + b_c`` with ``P_n`` of shape (dim_n, d), as
            the tail clusters of PyTorch's adaptive softmax do (``div_value``).
        bias: learn a bias per child.
        bias_free_nodes: internal nodes whose children have no bias: their biases stay
            exactly zero (masked in the scores, so they get no gradient), as the tail
            clusters of `torch.nn.AdaptiveLogSoftmaxWithLoss` have none; an exact export
            there (`tree_search.interop.to_torch_adaptive`) needs them bias-free.
        dense_fanout: nodes with a larger fanout get a dense block (see module docstring).
        max_dense_nodes: at most this many of the widest nodes are dense.
        top_columns: the top levels of the other nodes, up to this many children in all,
            share one weight block scored by a single matmul over the batch, while a
            sample's path uses at least half of the block and it holds at least
            ``top_columns / 2`` columns (`tree_search.cost.head_layout`); 0: no block.
        sparse: give the packed nodes' weights sparse gradients (only the rows a batch
            touched), for `torch.optim.SparseAdam`; `sparse_parameters` lists them.
        fanout_scaled_steps: parametrize each node's scores as ``scale * (w' . h + b')``
            with ``scale`` 0.3 up to fanout 16, rising log-linearly to 1 at fanout 256 and
            beyond (per bucket: its width), so that an optimizer's step on ``w'`` moves
            narrow nodes' scores less. Measured on code tokens, binary to 16-ary trees learn
            best with about a third of the step that the wide nodes of the adaptive shape
            need; with Adam's scale-free steps this lets one learning rate fit all shapes.
            The effective weights are unchanged at initialisation.
        ignore_index: targets equal to it take no part in the loss (their output is 0), as
            in `torch.nn.CrossEntropyLoss`.
        reduction: of the loss over the batch's counted targets: ``"mean"``, ``"sum"`` or
            ``"none"`` (per sample, 0 for ignored targets).

    Shape:
        h (B, d), y (B,) int64 -> `log_prob` (B,); `log_probs_all` (B, V).

    Example:
        >>> from tree_search.builders import huffman
        >>> head = TreeSoftmaxHead(huffman([5, 3, 1, 1]), dim=8)
        >>> h = torch.randn(2, 8)
        >>> head.log_probs_all(h).exp().sum(-1)  # doctest: +SKIP
        tensor([1.0000, 1.0000], grad_fn=<SumBackward1>)
        >>> out, loss = head(h, torch.tensor([0, 3]))
    """

    def __init__(
        self,
        tree: Tree,
        dim: int,
        *,
        projections: Mapping[int, int] | None = None,
        bias: bool = True,
        bias_free_nodes: Sequence[int] | None = None,
        dense_fanout: int = LAYOUT_DEFAULTS["dense_fanout"],
        max_dense_nodes: int = LAYOUT_DEFAULTS["max_dense_nodes"],
        top_columns: int = LAYOUT_DEFAULTS["top_columns"],
        sparse: bool = False,
        fanout_scaled_steps: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.tree, self.dim, self.sparse, self.bias = tree, int(dim), bool(sparse), bool(bias)
        self.ignore_index, self.reduction = int(ignore_index), reduction
        self.labels: list[str] | None = None  # class tokens, when the head came from a file that has them
        self.counts: np.ndarray | None = None
        self.metadata: dict[str, Any] = {}
        # what `save` writes and `load` rebuilds the layout from (the weights' shapes depend on it)
        self._settings = {
            "dim": int(dim), "bias": bool(bias), "dense_fanout": int(dense_fanout),
            "max_dense_nodes": int(max_dense_nodes), "top_columns": int(top_columns), "sparse": bool(sparse),
            "fanout_scaled_steps": bool(fanout_scaled_steps), "ignore_index": int(ignore_index),
            "reduction": reduction, "projections": {str(int(k)): int(v) for k, v in (projections or {}).items()},
            "bias_free_nodes": sorted({int(n) for n in bias_free_nodes or ()}),
        }  # fmt: skip

        def width_scale(width: np.ndarray | int) -> np.ndarray:
            if not fanout_scaled_steps:
                return np.ones_like(np.asarray(width), dtype=float)
            return step_scale(width)

        projections = dict(projections or {})
        for node, size in projections.items():
            if not 0 <= node < tree.num_internal or not 1 <= size <= dim:
                raise ValueError(f"projection {node}: {size} must name an internal node and a size in 1..{dim}")
        bad = [n for n in self._settings["bias_free_nodes"] if not 0 <= n < tree.num_internal]
        if bad:
            raise ValueError(f"bias_free_nodes {bad[:5]} are not internal nodes (0..{tree.num_internal - 1})")
        # True where a node's children have no bias (every node when bias=False)
        self._bias_free = np.full(tree.num_internal, not bias)
        self._bias_free[self._settings["bias_free_nodes"]] = True
        fanout = tree.fanout
        layout = head_layout(tree, projections, dense_fanout=dense_fanout, max_dense_nodes=max_dense_nodes,
                             top_columns=top_columns)  # fmt: skip
        dense_nodes = list(layout.dense_nodes)

        # group id of every internal node, and its index inside the group
        group_of = np.empty(tree.num_internal, dtype=np.int64)
        local_of = np.empty(tree.num_internal, dtype=np.int64)
        self.dense_weights = nn.ParameterList()
        self.dense_biases = nn.ParameterList()
        self.dense_projections = nn.ModuleList()
        self._dense_nodes = dense_nodes
        self._dense_scale = [float(width_scale(int(fanout[n]))) for n in dense_nodes]
        self._dense_biased = [not self._bias_free[n] for n in dense_nodes]
        for k, node in enumerate(dense_nodes):
            size = projections.get(node, dim)
            self.dense_weights.append(nn.Parameter(torch.empty(int(fanout[node]), size)))
            self.dense_biases.append(nn.Parameter(torch.zeros(int(fanout[node])), requires_grad=self._dense_biased[k]))
            self.dense_projections.append(nn.Linear(dim, size, bias=False) if node in projections else nn.Identity())
            group_of[node], local_of[node] = k, 0
        # The top levels of packed nodes, visited by most samples, may form one shared block whose
        # scores are a single matmul for the whole batch (cheaper than gathering their weights when little is wasted).
        top_nodes = np.flatnonzero(layout.top)
        self._has_top = top_nodes.size > 0
        top_offset = np.zeros(tree.num_internal, dtype=np.int64)
        top_offset[top_nodes] = np.cumsum(fanout[top_nodes]) - fanout[top_nodes]
        self.top_weight = nn.Parameter(torch.empty(int(fanout[top_nodes].sum()), dim))
        self.top_bias = nn.Parameter(torch.zeros(int(fanout[top_nodes].sum())), requires_grad=bias)
        self._top_width = int(fanout[top_nodes].max()) if self._has_top else 0
        column_scale = np.repeat(width_scale(fanout[top_nodes]), fanout[top_nodes]).astype(np.float32)
        self.register_buffer("_top_scale", torch.from_numpy(column_scale), persistent=False)
        # bias-free nodes of a shared block: their bias columns are multiplied by 0 in the scores
        top_free = self._bias_free[top_nodes]
        self._top_bias_masked = bool(bias and top_free.any())
        column_keep = np.repeat(~top_free, fanout[top_nodes]).astype(np.float32)
        self.register_buffer("_top_bias_keep", torch.from_numpy(column_keep), persistent=False)
        group_of[top_nodes], local_of[top_nodes] = len(dense_nodes), top_offset[top_nodes]
        is_packed = layout.packed
        first_bucket = len(dense_nodes) + 1
        widths = list(layout.bucket_widths)
        self.bucket_weights = nn.ParameterList()
        self.bucket_biases = nn.ParameterList()
        self._bucket_widths = widths
        self._bucket_scale = [float(width_scale(w)) for w in widths]
        masks, keeps = [], []
        self._bucket_bias_masked = []
        for b, width in enumerate(widths):
            members = np.flatnonzero(is_packed & (layout.width == width))
            group_of[members] = first_bucket + b
            local_of[members] = np.arange(members.size)
            # stored flat (nodes, width * dim) so that embedding lookups can give sparse gradients
            self.bucket_weights.append(nn.Parameter(torch.empty(members.size, width * dim)))
            self.bucket_biases.append(nn.Parameter(torch.zeros(members.size, width), requires_grad=bias))
            valid = torch.from_numpy(np.arange(width)[None, :] < fanout[members][:, None])
            masks.append(valid)
            self._bucket_bias_masked.append(bool(bias and self._bias_free[members].any()))
            keep = np.repeat(~self._bias_free[members, None], width, 1).astype(np.float32)  # 0: bias-free node
            keeps.append(torch.from_numpy(keep) if self._bucket_bias_masked[-1] else None)
        for b, (valid, keep) in enumerate(zip(masks, keeps, strict=True)):
            self.register_buffer(f"_bucket_valid_{b}", valid, persistent=False)
            if keep is not None:  # (members, width), only for buckets holding a bias-free node
                self.register_buffer(f"_bucket_bias_keep_{b}", keep, persistent=False)
        self.num_groups = first_bucket + len(widths)
        self.register_buffer("_group_of", torch.from_numpy(group_of), persistent=False)
        self.register_buffer("_local_of", torch.from_numpy(local_of), persistent=False)
        # Packed (unpadded) paths: memory ~ sum of depths, so a million-class Huffman tree costs
        # tens of MB where padded (V, max depth) tables would cost gigabytes.
        ptr, nodes, codes = tree.packed_paths()
        self.register_buffer("_path_ptr", torch.from_numpy(ptr.copy()), persistent=False)
        self.register_buffer("_path_nodes", torch.from_numpy(nodes.copy()), persistent=False)  # int32
        self.register_buffer("_path_codes", torch.from_numpy(codes.copy()), persistent=False)
        self.register_buffer("_fanout", torch.from_numpy(fanout.astype(np.int64)), persistent=False)
        self.register_buffer("_child_ptr", torch.from_numpy(tree.child_ptr.copy()), persistent=False)
        self.register_buffer("_child_ids", torch.from_numpy(tree.child_ids.copy()), persistent=False)
        self._whole: _WholeTree | None = None  # built on the first `log_probs_all`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise effective child weights like `nn.Linear` (uniform in ±1/sqrt(fan-in)); biases at zero."""
        for weight, scale in zip(self.dense_weights, self._dense_scale, strict=True):
            bound = 1.0 / np.sqrt(weight.shape[-1]) / scale
            nn.init.uniform_(weight, -bound, bound)
        for weight, scale in zip(self.bucket_weights, self._bucket_scale, strict=True):
            bound = 1.0 / np.sqrt(self.dim) / scale
            nn.init.uniform_(weight, -bound, bound)
        with torch.no_grad():
            nn.init.uniform_(self.top_weight, -1.0, 1.0)
            self.top_weight.mul_(1.0 / np.sqrt(self.dim) / self._top_scale[:, None])
        for bias in [*self.dense_biases, *self.bucket_biases, self.top_bias]:
            nn.init.zeros_(bias)
        for projection in self.dense_projections:
            if isinstance(projection, nn.Linear):
                projection.reset_parameters()

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (empty unless ``sparse=True``)."""
        if not self.sparse:
            return []
        return [p for p in [*self.bucket_weights, *self.bucket_biases] if p.requires_grad]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters with dense gradients."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in sparse]

    @torch.no_grad()
    def set_node_parameters(
        self,
        node: int,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> None:
        """Set the child weights (fanout, dim_n), bias (fanout,) and projection (dim_n, d) of a node.

        Works whichever layout (dense or packed) the node lives in; used to copy weights
        from other heads (e.g. `torch.nn.AdaptiveLogSoftmaxWithLoss`) and to load exports.
        The values are the effective ones (the step-size scale is divided out here).

        Raises:
            ValueError: a shape that does not fit the node, a projection for a node without
                one, or a non-zero bias for a bias-free node.
        """
        fanout = int(self._fanout[node])
        group = int(self._group_of[node])
        num_dense = len(self._dense_nodes)
        scale = self._node_scale(node)
        weight = weight / scale
        if bias is not None and self._bias_free[node]:
            if bool(torch.any(bias != 0)):
                raise ValueError(
                    f"node {node} is bias-free (bias=False or bias_free_nodes) and was given a non-zero bias"
                )
            bias = None
        bias = bias / scale if bias is not None else None
        if group < num_dense:
            if tuple(weight.shape) != tuple(self.dense_weights[group].shape):
                raise ValueError(f"node {node}: weight must be {tuple(self.dense_weights[group].shape)}")
            self.dense_weights[group].copy_(weight)
            if bias is not None:
                self.dense_biases[group].copy_(bias)
            if projection is not None:
                self.dense_projections[group].weight.copy_(projection)
            return
        if projection is not None:
            raise ValueError(f"node {node} has no projection")
        if tuple(weight.shape) != (fanout, self.dim):
            raise ValueError(f"node {node}: weight must be ({fanout}, {self.dim})")
        if group == num_dense:  # the shared top block
            start = int(self._local_of[node])
            self.top_weight[start : start + fanout] = weight
            if bias is not None:
                self.top_bias[start : start + fanout] = bias
            return
        b, local = group - num_dense - 1, int(self._local_of[node])
        width = self._bucket_widths[b]
        row = torch.zeros(width, self.dim, dtype=weight.dtype, device=weight.device)
        row[:fanout] = weight
        self.bucket_weights[b][local] = row.reshape(-1)
        if bias is not None:
            self.bucket_biases[b][local, :fanout] = bias

    @torch.no_grad()
    def scale_nodes(self, factors: np.ndarray | Sequence[float]) -> None:
        """Multiply each node's scores by ``factors[node]`` (I,) in place: its child weights and biases.

        Projections are left as they are (a projected node's scores scale through its child
        weights). One vectorised update per weight group, never a loop over nodes.
        """
        factors = np.asarray(factors, dtype=np.float64)
        if factors.shape != (self.tree.num_internal,) or not np.all(np.isfinite(factors)):
            raise ValueError(f"scale_nodes takes {self.tree.num_internal} finite factors, one per internal node, "
                             f"got shape {factors.shape}")  # fmt: skip
        group_of, local_of = self._group_of.cpu().numpy(), self._local_of.cpu().numpy()
        fanout, num_dense = self.tree.fanout, len(self._dense_nodes)

        def factor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(values, dtype=like.dtype, device=like.device)

        for k, node in enumerate(self._dense_nodes):  # a handful of wide or projected nodes
            self.dense_weights[k].mul_(float(factors[node]))
            self.dense_biases[k].mul_(float(factors[node]))
        top = np.flatnonzero(group_of == num_dense)
        if top.size:
            column = np.ones(self.top_weight.shape[0])
            owner = np.repeat(top, fanout[top])
            within = np.arange(owner.size) - np.repeat(np.cumsum(fanout[top]) - fanout[top], fanout[top])
            column[local_of[owner] + within] = factors[owner]
            self.top_weight.mul_(factor(column, self.top_weight)[:, None])
            self.top_bias.mul_(factor(column, self.top_bias))
        for b in range(len(self._bucket_widths)):
            members = np.flatnonzero(group_of == num_dense + 1 + b)
            row = np.ones(self.bucket_weights[b].shape[0])
            row[local_of[members]] = factors[members]
            self.bucket_weights[b].mul_(factor(row, self.bucket_weights[b])[:, None])
            self.bucket_biases[b].mul_(factor(row, self.bucket_biases[b])[:, None])

    def _node_scale(self, node: int) -> float:
        """The step-size scale of a node's stored parameters (effective = scale * stored)."""
        group, num_dense = int(self._group_of[node]), len(self._dense_nodes)
        if group < num_dense:
            return self._dense_scale[group]
        if group == num_dense:
            return float(self._top_scale[int(self._local_of[node])])
        return self._bucket_scale[group - num_dense - 1]

    @torch.no_grad()
    def node_parameters(self, node: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The effective child weights (fanout, dim_n), bias (fanout,) and projection (dim_n, d) of a node.

        The inverse of `set_node_parameters`: ``s(node, c) = weight[c] . (projection @ h) + bias[c]``;
        ``bias`` is None for a bias-free node (``bias=False`` or ``bias_free_nodes``) and
        ``projection`` None for a node without one (the identity). New tensors.
        """
        fanout, group, num_dense = int(self._fanout[node]), int(self._group_of[node]), len(self._dense_nodes)
        scale, local = self._node_scale(node), int(self._local_of[node])
        projection = None
        if group < num_dense:
            weight, bias = self.dense_weights[group], self.dense_biases[group]
            if isinstance(self.dense_projections[group], nn.Linear):
                projection = self.dense_projections[group].weight.detach().clone()
        elif group == num_dense:
            weight, bias = self.top_weight[local : local + fanout], self.top_bias[local : local + fanout]
        else:
            b = group - num_dense - 1
            weight = self.bucket_weights[b][local].view(self._bucket_widths[b], self.dim)[:fanout]
            bias = self.bucket_biases[b][local, :fanout]
        return weight * scale, None if self._bias_free[node] else bias * scale, projection

    @property
    def num_classes(self) -> int:
        """V."""
        return self.tree.num_classes

    def _bucket_valid(self, b: int) -> torch.Tensor:
        return getattr(self, f"_bucket_valid_{b}")

    # ------------------------------------------------------------------ core
    def _pair_scores(self, h: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor):
        """Scores of every child for (sample, node) pairs, group by group.

        Yields ``(pair_index, scores, valid)`` per group: ``pair_index`` (P_g,) positions
        into the pairs, ``scores`` (P_g, F_g), ``valid`` (P_g, F_g) bool or None (all valid).
        """
        groups = self._group_of[nodes]
        num_dense = len(self._dense_nodes)
        for g in range(self.num_groups):
            index = torch.nonzero(groups == g, as_tuple=True)[0]
            if index.numel() == 0:
                continue
            if g < num_dense:
                z = self.dense_projections[g](h[rows[index]])  # (P_g, dim_n)
                weight, bias = self.dense_weights[g], self.dense_biases[g]
                scores = torch.addmm(bias, z, weight.t()) if self._dense_biased[g] else z @ weight.t()  # (P_g, fanout)
                scale = self._dense_scale[g]
                yield index, scores if scale == 1.0 else scores * scale, None
            elif g == num_dense:
                top_bias = self.top_bias * self._top_bias_keep if self._top_bias_masked else self.top_bias
                block = torch.addmm(top_bias, h, self.top_weight.t()) if self.bias else h @ self.top_weight.t()
                block = block * self._top_scale
                position = torch.arange(self._top_width, device=h.device)
                fan = self._fanout[nodes[index]]
                columns = (self._local_of[nodes[index]][:, None] + position).clamp(max=block.shape[1] - 1)
                scores = block[rows[index][:, None], columns]  # (P_g, top width)
                yield index, scores, position[None, :] < fan[:, None]
            else:
                b = g - num_dense - 1
                local = self._local_of[nodes[index]]
                scores = gathered_scores(self.bucket_weights[b], h, local, rows[index], self._bucket_widths[b],
                                         self.sparse)  # fmt: skip
                if self.bias:
                    bias = nn.functional.embedding(local, self.bucket_biases[b], sparse=self.sparse)  # (P_g, F)
                    if self._bucket_bias_masked[b]:
                        bias = bias * getattr(self, f"_bucket_bias_keep_{b}")[local]  # bias-free nodes: 0
                    scores = scores + bias
                scale = self._bucket_scale[b]
                yield index, scores if scale == 1.0 else scores * scale, self._bucket_valid(b)[local]

    def node_log_prob(
        self, h: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor, child: torch.Tensor
    ) -> torch.Tensor:
        """(P,) ``log p(child | node, h[row])`` for each (row, node, child index) pair (see `path_pairs`)."""
        acc = torch.promote_types(h.dtype, torch.float32)  # reductions in at least float32
        out = torch.empty(rows.shape[0], dtype=acc, device=h.device)
        for index, scores, valid in self._pair_scores(h, rows, nodes):
            scores = scores.to(acc)
            if valid is not None:
                scores = scores.masked_fill(~valid, float("-inf"))
            # log_softmax + gather: on CPU its backward is about twice as fast as cross_entropy's
            out[index] = torch.log_softmax(scores, dim=1).gather(1, child[index, None]).squeeze(1)
        return out

    def node_log_softmax(self, h: torch.Tensor, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """(P, max fanout) log-probabilities of each child of each pair's node given ``h[row]``; -inf padded.

        Column j is the node's j-th child in the tree's order (`child_id` gives its id).
        """
        width = self._widest_group()
        acc = torch.promote_types(h.dtype, torch.float32)
        out = torch.full((rows.shape[0], width), float("-inf"), dtype=acc, device=h.device)
        for index, scores, valid in self._pair_scores(h, rows, nodes):
            scores = scores.to(acc)
            if valid is not None:
                scores = scores.masked_fill(~valid, float("-inf"))
            out[index, : scores.shape[1]] = torch.log_softmax(scores, dim=1)
        return out

    def child_id(self, nodes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The unified ids (class ``< V``, internal node ``V + n``) of child ``positions`` of ``nodes`` (broadcast)."""
        return self._child_ids[self._child_ptr[nodes] + positions]

    # ------------------------------------------------------------------ public
    def path_pairs(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, nodes, child, step)`` (P,) each: every (sample, node on its class's path) pair of ``y`` (B,).

        Pairs come sample by sample, root first; ``child`` is the index of the child taken and
        ``step`` the pair's depth on its path (0: the root). What `log_prob` sums over.
        """
        return packed_path_pairs(self._path_ptr, self._path_nodes, self._path_codes, y)

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) exact log p(y | h)."""
        rows, nodes, child, _ = self.path_pairs(y)
        pair = self.node_log_prob(h, rows, nodes, child)
        return torch.zeros(y.shape[0], dtype=pair.dtype, device=h.device).index_add_(0, rows, pair)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """``(output, loss)`` as `torch.nn.AdaptiveLogSoftmaxWithLoss`: targets' log-probabilities and the NLL.

        ``output`` is (B,) log p(y | h), 0 where ``y == ignore_index``; ``loss`` the negative
        log-likelihood reduced by ``reduction`` over the other targets (``"mean"``: NaN when
        every target is ignored, as in `torch.nn.CrossEntropyLoss`).
        """
        keep = y != self.ignore_index
        if bool(keep.all()):
            output = self.log_prob(h, y)
        else:
            output = torch.zeros(y.shape[0], dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
            output = output.index_put((keep,), self.log_prob(h[keep], y[keep]))
        if self.reduction == "none":
            return HeadOutput(output, -output)
        total = -output.sum()
        return HeadOutput(output, total if self.reduction == "sum" else total / keep.sum())

    def loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood of ``y`` (nats), with ``ignore_index`` and ``reduction`` (see `forward`)."""
        return self(h, y).loss

    # ------------------------------------------------------------------ files
    def save(
        self,
        path: str | os.PathLike[str],
        *,
        labels: Sequence[str] | None = None,
        counts: Sequence[float] | np.ndarray | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the head to ``path``: its tree (with class ``labels`` and ``counts``), settings and weights.

        The file holds only tensors, numbers, strings, lists and dicts, so
        ``torch.load(path, weights_only=True)`` reads it; `load` rebuilds the head.
        """
        tree = self.tree
        payload = {
            "format": HEAD_FILE_FORMAT,
            "version": 1,
            "num_classes": int(tree.num_classes),
            "child_ptr": torch.from_numpy(tree.child_ptr.astype(np.int64)),
            "child_ids": torch.from_numpy(tree.child_ids.astype(np.int64)),
            "settings": dict(self._settings),
            "labels": list(labels) if labels is not None else None,
            "counts": torch.tensor(np.asarray(counts, dtype=np.float64)) if counts is not None else None,
            "metadata": dict(metadata or {}),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        torch.save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], map_location: str | torch.device | None = None) -> TreeSoftmaxHead:
        """A head written by `save` (``torch.load(weights_only=True)``: no code runs from the file).

        Its ``labels``, ``counts`` and ``metadata`` are kept as attributes of the same names.

        Raises:
            ValueError: when the file is not a tree_search head, naming what is wrong.
        """
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != HEAD_FILE_FORMAT:
            raise ValueError(f"{path}: not a tree_search head file (format {HEAD_FILE_FORMAT!r})")
        if payload.get("version") != 1:
            raise ValueError(f"{path}: head file version {payload.get('version')!r}; this code reads version 1")
        ptr, ids = payload["child_ptr"].numpy(), payload["child_ids"].numpy()
        tree = Tree(int(payload["num_classes"]), [ids[a:b].tolist() for a, b in zip(ptr[:-1], ptr[1:], strict=True)])
        settings = dict(payload["settings"])
        settings["projections"] = {int(k): int(v) for k, v in settings["projections"].items()}
        head = cls(tree, **settings)
        head.load_state_dict(payload["state_dict"])
        head.labels = payload["labels"]
        head.counts = payload["counts"].numpy() if payload["counts"] is not None else None
        head.metadata = payload["metadata"]
        return head.to(map_location) if map_location is not None else head

    @classmethod
    def from_tree_file(cls, path: str | os.PathLike[str], dim: int, **settings: Any) -> TreeSoftmaxHead:
        """A new (untrained) head on the tree of a tree file (``tree.json`` or ``codes.npz``), to train from scratch.

        ``settings`` are the constructor's keyword arguments; a ``tree.json`` written by a
        search carries the projections of its adaptive nodes (``built_by.projections``),
        used unless ``projections`` is given. ``labels`` and ``counts`` of the file are kept.
        """
        record = load_tree(path)
        stored = (record.built_by or {}).get("projections") or {}
        settings.setdefault("projections", {int(k): int(v) for k, v in stored.items()})
        head = cls(record.tree, dim, **settings)
        head.labels = list(record.labels) if record.labels is not None else None
        head.counts = record.counts
        return head

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities of every class; costs as much as a full softmax.

        Every node's children are scored by one matmul per weight group (never a gather of
        weights per sample), then a segmented log-softmax and root-to-node sums level by
        level. Differentiable, with dense gradients. Rows go in chunks of about 64M numbers.
        """
        if self._whole is None:
            self._whole = _WholeTree(self)
        per_row = 3 * self.tree.child_ids.size + self.tree.num_internal + self.num_classes
        chunk = max(1, CHUNK_NUMBERS // per_row)
        if h.shape[0] > chunk:
            return torch.cat([self._whole.log_probs_all(self, h[i : i + chunk]) for i in range(0, h.shape[0], chunk)])
        return self._whole.log_probs_all(self, h)

    def _widest_group(self) -> int:
        """The most columns of one node's scores in any weight group (buckets pad fanouts to powers of two)."""
        return max([int(self._fanout.max()), self._top_width, *self._bucket_widths])

    def _beam_rows(self, k: int, width: int) -> int:
        """Rows per `_beam` pass of ``width`` whose tables, scores and gathered weights stay near `CHUNK_NUMBERS`."""
        per_row = max(
            3 * int(self._fanout.max()),  # a dense node's scores: every row at most once per dense node
            3 * width * (k + min(width + 1, self._widest_group())),  # the candidate tables
            width * max([self._top_width, *self._bucket_widths]) * self.dim,  # packed nodes' gathered weights
        )
        return max(1, CHUNK_NUMBERS // per_row)
