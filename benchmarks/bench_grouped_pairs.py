"""Packed nodes scored per pair (the head's gathered scores) against pairs grouped by node, side by side.

    python benchmarks/bench_grouped_pairs.py [--sizes 10000,50000] [--repeats 7]

Issue 27 asked whether reading each packed node's weights once per batch (its pairs grouped
into one block, multiplied by `torch.bmm`) beats the head's fused per-pair gather, which reads
a node's weights once per (token, node) pair. The grouped alternative lives here only: pairs
sorted by node, nodes binned by pair count rounded up to a power of two, one `bmm` per bin
forward and two backward, no per-pair weight copy. It first checks that both give the same
scores and gradients, then times a sparse training step of `TreeSoftmaxHead` with each
(Zipf classes, batch 4,096, d = 256). Findings: docs/cost-in-time.md, section 1.
"""

from __future__ import annotations

import argparse

import torch

from tree_search import builders
from tree_search.heads import TreeSoftmaxHead, tree_head
from tree_search.heads.gathered import gathered_scores
from tree_search.heads.timing import synthetic_classes, time_training_step, tune_allocator

TREES = ("huffman-2", "huffman-8", "huffman-32", "kmeans-16", "headtail-kmeans-16")


def _bins(nodes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(node ids, pair index (n, cap), valid (n, cap))`` per bin of nodes whose pair count rounds up to ``cap``."""
    order = torch.argsort(nodes, stable=True)
    unique, counts = torch.unique_consecutive(nodes[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    cap = torch.pow(2, torch.ceil(torch.log2(counts.double()))).long()
    out = []
    for c in torch.unique(cap).tolist():  # a loop over bins (at most log2(pairs) + 1), not over nodes
        members = torch.nonzero(cap == c, as_tuple=True)[0]
        slot = torch.arange(c, device=nodes.device)
        valid = slot[None, :] < counts[members][:, None]
        pair = order[(starts[members][:, None] + slot).clamp(max=nodes.shape[0] - 1)]
        out.append((unique[members], pair, valid))
    return out


class _GroupedScores(torch.autograd.Function):
    """`gathered_scores` with each node's pairs multiplied as one block (same arguments, same results)."""

    @staticmethod
    def forward(ctx, weight, h, nodes, rows, width, sparse):  # noqa: D102
        d = h.shape[1]
        bins = _bins(nodes)
        scores = torch.empty(nodes.shape[0], width, dtype=h.dtype, device=h.device)
        for node, pair, valid in bins:
            block = torch.bmm(h.detach()[rows[pair]], weight.detach()[node].view(-1, width, d).transpose(1, 2))
            scores[pair[valid]] = block[valid]
        ctx.save_for_backward(weight, h, rows)
        ctx.bins, ctx.width, ctx.sparse = bins, width, sparse
        return scores

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, h, rows = ctx.saved_tensors
        width, d = ctx.width, h.shape[1]
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[1] else None
        nodes, values = [], []
        for node, pair, valid in ctx.bins:
            g = grad[pair] * valid[..., None]  # (n, cap, width), padding zeroed
            if grad_h is not None:
                block = torch.bmm(g, weight[node].view(-1, width, d))
                grad_h.index_add_(0, rows[pair[valid]], block[valid])
            values.append(torch.bmm(g.transpose(1, 2), h[rows[pair]]).reshape(-1, width * d))
            nodes.append(node)
        node, value = torch.cat(nodes), torch.cat(values)
        if ctx.sparse:
            order = torch.argsort(node)
            grad_weight = torch.sparse_coo_tensor(
                node[order][None], value[order], weight.shape, is_coalesced=True, check_invariants=False
            )
        else:
            grad_weight = torch.zeros_like(weight).index_copy_(0, node, value)
        return grad_weight, grad_h, None, None, None, None


def grouped_scores(weight, h, nodes, rows, width, sparse=False):
    """(P, width) the scores of `gathered_scores`, computed per node block."""
    return _GroupedScores.apply(weight, h, nodes.long(), rows.long(), width, sparse)


def check_same(width: int = 8, dim: int = 16) -> float:
    """Largest difference of scores and gradients between the two implementations on random pairs."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, width * dim, generator=generator, requires_grad=True)
    h = torch.randn(30, dim, generator=generator, requires_grad=True)
    nodes, rows = torch.randint(0, 50, (400,), generator=generator), torch.randint(0, 30, (400,), generator=generator)
    a, b = gathered_scores(weight, h, nodes, rows, width), grouped_scores(weight, h, nodes, rows, width)
    g = torch.randn(a.shape, generator=generator)
    grads_a = torch.autograd.grad((a * g).sum(), (weight, h))
    grads_b = torch.autograd.grad((b * g).sum(), (weight, h))
    return max(
        float((a - b).abs().max().detach()),
        *(float((x - y).abs().max()) for x, y in zip(grads_a, grads_b, strict=True)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tune_allocator()
    print(f"largest difference between the two (scores and gradients): {check_same():.1e}")
    print(f"{torch.get_num_threads()} threads, batch 4096, d = 256, sparse gradients; ms per step")
    for V in (int(s) for s in args.sizes.split(",")):
        counts, embeddings = synthetic_classes(V)
        trees = builders.classic_trees(counts, TREES, embeddings=embeddings, dim=256)
        generator = torch.Generator().manual_seed(0)
        y = torch.multinomial(torch.from_numpy(counts / counts.sum()), 4096, replacement=True, generator=generator)
        h = torch.randn(4096, 256, generator=generator).requires_grad_(True)
        for name, classic in trees.items():
            times = []
            for scores in (gathered_scores, grouped_scores):
                tree_head.gathered_scores = scores  # the head looks the function up in its module at call time
                head = TreeSoftmaxHead(classic.tree, 256, projections=classic.projections, sparse=True)
                times.append(time_training_step(head, h, y, repeats=args.repeats) * 1e3)
            tree_head.gathered_scores = gathered_scores
            print(f"  V = {V:>7,} {name:<20} gathered {times[0]:6.1f}  grouped {times[1]:6.1f}  "
                  f"grouped / gathered {times[1] / times[0]:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
