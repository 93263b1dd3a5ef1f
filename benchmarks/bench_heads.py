"""Forward+backward time and peak memory of tree heads against the references, side by side.

    python benchmarks/bench_heads.py [--sizes 10000,50000,200000] [--batch 4096] [--dim 256]
                                     [--device cuda] [--dtype bf16] [--repeats 5]

For each V: full softmax; torch's AdaptiveLogSoftmaxWithLoss (cutoffs V/25 and V/5,
div_value 4); our TreeSoftmaxHead on (a) the same adaptive shape with the same
projections, (b) a binary Huffman tree of Zipf(1) frequencies, (c) a balanced binary
tree; and a plain padded-gather binary hierarchical softmax as the naive reference.
Our heads use sparse gradients for their packed nodes, as `fit` trains them.
Targets come from the Zipf(1) distribution. Ratios are against full softmax and naive.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import resource
import time

import numpy as np
import torch
from torch import nn

from tree_search import builders
from tree_search.heads import AdaptiveSoftmaxHead, FullSoftmaxHead, TreeSoftmaxHead


class NaivePaddedHead(nn.Module):
    """Binary hierarchical softmax that gathers (B, max depth, 2, d) weights: the naive reference."""

    def __init__(self, tree, dim: int) -> None:
        super().__init__()
        nodes, codes, _ = tree.paths()
        self.register_buffer("nodes", torch.from_numpy(nodes.astype(np.int64)))
        self.register_buffer("codes", torch.from_numpy(codes.astype(np.int64)))
        self.weight = nn.Parameter(torch.randn(tree.num_internal, 2, dim) / dim**0.5)

    def forward(self, h, y):
        nodes, codes = self.nodes[y], self.codes[y]  # (B, L)
        on = nodes >= 0
        w = self.weight[nodes.clamp(min=0)]  # (B, L, 2, d)
        scores = torch.einsum("bltd,bd->blt", w, h).float()
        lp = torch.log_softmax(scores, -1).gather(-1, codes.clamp(min=0)[..., None]).squeeze(-1)
        out = (lp * on).sum(-1)
        return out, -out.mean()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_step(head, h, y, repeats, device, autocast_dtype):
    params = [p for p in head.parameters() if p.requires_grad]
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def step():
        for p in params:
            p.grad = None
        with ctx:
            loss = head(h, y)[1]
        loss.backward()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), peak_memory_mb(device)


def make_head(name: str, V: int, dim: int) -> nn.Module:
    """The head called ``name`` for V classes (Zipf(1) frequencies)."""
    zipf = 1.0 / np.arange(1, V + 1)
    cutoffs = [V // 25, V // 5]
    if name == "full softmax":
        return FullSoftmaxHead(V, dim)
    if name == "torch adaptive":
        return AdaptiveSoftmaxHead(V, dim, cutoffs, div_value=4.0)
    if name == "ours: adaptive shape":
        tree = builders.frequency_cutoffs(zipf, cutoffs)
        return TreeSoftmaxHead(tree, dim, projections={1: dim // 4, 2: dim // 16}, bias=False, sparse=True)
    if name == "naive padded huffman":
        return NaivePaddedHead(builders.huffman(zipf), dim)
    if name == "ours: huffman binary":
        return TreeSoftmaxHead(builders.huffman(zipf), dim, sparse=True)
    if name == "ours: balanced binary":
        return TreeSoftmaxHead(builders.balanced(V, 2), dim, sparse=True)
    raise ValueError(name)


HEADS = ["full softmax", "torch adaptive", "ours: adaptive shape", "naive padded huffman", "ours: huffman binary",
         "ours: balanced binary"]  # fmt: skip


def measure(name: str, V: int, args: argparse.Namespace) -> tuple[float, float]:
    """Time one head in this (fresh) process: seconds per step and peak memory growth in MiB."""
    device = torch.device(args.device)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    zipf = 1.0 / np.arange(1, V + 1)
    y = torch.from_numpy(np.random.default_rng(0).choice(V, size=args.batch, p=zipf / zipf.sum())).to(device)
    h = torch.randn(args.batch, args.dim, device=device)
    before = peak_memory_mb(device)
    seconds, peak = time_step(make_head(name, V, args.dim).to(device), h, y, args.repeats, device, autocast_dtype)
    return seconds, peak - (before if device.type != "cuda" else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--skip-full-above", type=int, default=10**9, help="skip full softmax above this V")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, dtype {args.dtype}, batch {args.batch}, d={args.dim}; median of {args.repeats} "
          "forward+backward steps, each head in a fresh process; peak memory: "
          f"{'CUDA max allocated' if device.type == 'cuda' else 'growth of max RSS'}")  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    for V in (int(s) for s in args.sizes.split(",")):
        zipf = 1.0 / np.arange(1, V + 1)
        huffman = builders.huffman(zipf)
        results = {}
        for name in HEADS:
            if name == "full softmax" and V > args.skip_full_above:
                continue
            with spawn.Pool(1) as pool:
                results[name] = pool.apply(measure, (name, V, args))
        full = results.get("full softmax", (float("nan"),))[0]
        naive = results["naive padded huffman"][0]
        adaptive = results["torch adaptive"][0]
        print(
            f"\nV={V:,}  (huffman max depth {huffman.max_depth}, mean depth {huffman.expected_path_length(zipf):.2f})"
        )
        print(f"  {'head':<24} {'s/step':>8} {'peak MiB':>9} {'vs full':>9} {'vs naive':>9} {'vs torch adaptive':>18}")
        for name, (seconds, memory) in results.items():
            print(f"  {name:<24} {seconds:>8.4f} {memory:>9.0f} {full / seconds:>8.1f}x {naive / seconds:>8.2f}x "
                  f"{seconds / adaptive:>17.2f}x time")  # fmt: skip


if __name__ == "__main__":
    main()
