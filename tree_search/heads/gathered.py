"""Scores of (node, sample) pairs whose node weights are gathered per pair: the packed nodes of `TreeSoftmaxHead`.

One autograd function, `gathered_scores`. On CPU in float32 its forward and backward are the C
kernels of `tree_search.heads.native` when they build; otherwise a forward compiled by
`torch.compile` on CPU for big batches (eager torch otherwise), and a backward of weighted
`embedding_bag` calls. No path writes a per-pair copy of the weights (docs/cost-in-time.md).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from tree_search.heads import native

__all__ = ["COMPILE_ENV", "FUSED_MIN_NUMBERS", "gathered_scores"]


def _scores_of_pairs(weight: torch.Tensor, h: torch.Tensor, nodes: torch.Tensor, rows: torch.Tensor,
                     width: int) -> torch.Tensor:  # fmt: skip
    """(P, width): each pair's gathered weight rows (width, d) times its row of ``h``."""
    gathered = weight.index_select(0, nodes).view(nodes.shape[0], width, h.shape[1])  # (P, F, d)
    return (gathered * h.index_select(0, rows).unsqueeze(1)).sum(-1)


COMPILE_ENV = "TREE_SEARCH_COMPILE"  # "auto" (default), "1": always, "0": never compile the gathered scores
FUSED_MIN_NUMBERS = 1 << 22  # "auto" fuses on CPU when the gathered weights would hold this many numbers or more
_fused: dict[str, Any] = {}


def _fused_kernel(weight: torch.Tensor, numbers: int):
    """`_scores_of_pairs`, compiled by `torch.compile` into one loop that never writes the (P, F, d) gather.

    On CPU it is about 10x faster than eager torch at V = 50k (1.2 ms against 11 ms for 25k pairs of
    binary Huffman); compiling costs seconds once per process, so "auto" uses it only for big batches,
    and only on CPU (CUDA is untested here). Should compiling fail (no C++ compiler), eager is used.
    """
    mode = os.environ.get(COMPILE_ENV, "auto")
    wanted = mode == "1" or (mode == "auto" and weight.device.type == "cpu" and numbers >= FUSED_MIN_NUMBERS)
    if not wanted or _fused.get("failed"):
        return _scores_of_pairs
    if "kernel" not in _fused:
        # dynamic_threads: with dynamic sizes inductor otherwise emits a one-thread loop (2 threads: 1.7x faster)
        compiled = torch.compile(_scores_of_pairs, dynamic=True, fullgraph=True,
                                 options={"cpp.dynamic_threads": True})  # fmt: skip

        def kernel(*args):
            try:
                return compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path gives the same scores
                if not _fused.get("failed"):
                    warnings.warn(f"tree_search: compiling the gathered scores failed ({type(err).__name__}: "
                                  f"{err}); using eager torch", RuntimeWarning, stacklevel=2)  # fmt: skip
                _fused["failed"] = True
                return _scores_of_pairs(*args)

        _fused["kernel"] = kernel
    return _fused["kernel"]


class _GatheredScores(torch.autograd.Function):
    """Scores ``W[node] . h[row]`` of (node, row) pairs, node rows of width F; its backward writes no (P, F, d) tensor.

    Forward gathers each pair's weight rows once. Backward: the gradient of ``h`` is one
    weighted `embedding_bag` over ``W``'s rows (bags: the pairs of each row), the gradient
    of ``W`` one per child position over ``h``'s rows (bags: the pairs of each node), so
    neither gathers a copy of the weights per pair; it is sparse over the touched node rows
    (coalesced) or dense. On CPU a training step of binary Huffman is about 2x faster than
    autograd through the gather (benchmarks/bench_head_time.py).
    """

    @staticmethod
    def forward(ctx, weight, h, nodes, rows, width, sparse):  # noqa: D102
        dtype = torch.promote_types(weight.dtype, h.dtype)
        ctx.native = dtype == torch.float32 and native.usable(weight, h, nodes, rows)
        if ctx.native:
            scores = native.pair_scores(weight.detach().float(), h.detach().float(), nodes, rows, int(width))
        else:
            kernel = _fused_kernel(weight, nodes.shape[0] * weight.shape[1])
            # detached: plain tensors, whose sizes the compiled kernel takes as dynamic (a parameter's sizes would be
            # static, one compilation per bucket size, and past torch's recompile limit the kernel would fail)
            scores = kernel(weight.detach().to(dtype), h.detach().to(dtype), nodes, rows, int(width))  # (P, F)
        ctx.save_for_backward(weight, h, nodes, rows)
        ctx.width, ctx.sparse = int(width), bool(sparse)
        return scores

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, h, nodes, rows = ctx.saved_tensors
        width, d = ctx.width, h.shape[1]
        grad = grad.contiguous()
        use_native = ctx.native and grad.dtype == torch.float32
        grad_weight = grad_h = None
        if ctx.needs_input_grad[1]:
            order = None if bool((rows[1:] >= rows[:-1]).all()) else torch.argsort(rows, stable=True)
            by_row = rows if order is None else rows[order]
            g = grad if order is None else grad[order]
            n = nodes if order is None else nodes[order]
            if use_native:
                grad_h = native.pair_grad_rows(weight.detach().float(), g, n, by_row, h.shape[0])
            else:
                flat = (n[:, None] * width + torch.arange(width, device=n.device)).reshape(-1)  # W's rows (M*F, d)
                offsets = torch.searchsorted(by_row, torch.arange(h.shape[0], device=h.device)) * width
                grad_h = nn.functional.embedding_bag(flat, weight.view(-1, d), offsets, mode="sum",
                                                     per_sample_weights=g.reshape(-1).to(weight.dtype))  # fmt: skip
            grad_h = grad_h.to(h.dtype)
        if ctx.needs_input_grad[0] and use_native:
            unique, values = native.pair_grad_nodes(h.detach().float(), grad, rows, nodes, weight.shape[0])
            grad_weight = _weight_gradient(unique, values, weight, ctx.sparse)
        elif ctx.needs_input_grad[0]:
            order = torch.argsort(nodes, stable=True)
            unique, counts = torch.unique_consecutive(nodes[order], return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            # one bag per (node j, child f), laid out j-major: bag (j, f) starts at starts[j] * F + f * counts[j]
            # and holds node j's pairs, so the bags' sums are the (U, F * d) gradient rows with no stacking copy
            segment = torch.repeat_interleave(torch.arange(unique.shape[0], device=nodes.device), counts)
            within = torch.arange(nodes.shape[0], device=nodes.device) - starts[segment]
            child = torch.arange(width, device=nodes.device)
            position = ((starts * width)[segment, None] + child * counts[segment, None] + within[:, None]).reshape(-1)
            pair_rows = rows[order, None].expand(-1, width).reshape(-1)
            bag_rows = torch.empty_like(position).index_copy_(0, position, pair_rows)
            bag_weights = torch.empty(position.shape[0], dtype=h.dtype, device=h.device)
            bag_weights.index_copy_(0, position, grad[order].to(h.dtype).reshape(-1))
            offsets = ((starts * width)[:, None] + child * counts[:, None]).reshape(-1)
            values = nn.functional.embedding_bag(bag_rows, h, offsets, mode="sum", per_sample_weights=bag_weights)
            grad_weight = _weight_gradient(unique, values.view(-1, width * d).to(weight.dtype), weight, ctx.sparse)
        return grad_weight, grad_h, None, None, None, None


def _weight_gradient(unique: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The gradient of ``weight`` whose rows ``unique`` (sorted) are ``values``: sparse (coalesced) or dense."""
    if sparse:
        return torch.sparse_coo_tensor(unique[None], values, weight.shape, is_coalesced=True, check_invariants=False)
    return torch.zeros_like(weight).index_copy_(0, unique, values)


def gathered_scores(
    weight: torch.Tensor, h: torch.Tensor, nodes: torch.Tensor, rows: torch.Tensor, width: int, sparse: bool = False
) -> torch.Tensor:
    """(P, width) scores ``weight[nodes[p]].view(width, d) @ h[rows[p]]``, differentiable in ``weight`` and ``h``.

    ``weight`` (M, width * d) holds one node per row. The gradient of ``weight`` is sparse
    (coalesced, over the touched rows) when ``sparse``, else dense.
    """
    return _GatheredScores.apply(weight, h, nodes.long(), rows.long(), width, sparse)
