"""Small heads of several shapes with random weights, shared by the hierarchy tests (explain, early answers)."""

import numpy as np
import torch
from torch import nn

from tree_search import builders
from tree_search.heads import TreeSoftmaxHead

SHAPES = {
    "binary huffman": (lambda: builders.huffman(np.random.default_rng(0).zipf(1.5, 40).astype(float)), {}),
    "adaptive projected": (lambda: builders.frequency_cutoffs(np.arange(60, 0, -1), [8, 30]), {1: 4, 2: 2}),
    "random 5-ary": (lambda: builders.random_tree(45, seed=3, max_arity=5), {}),
}


def make_head(name: str, seed: int = 0, dim: int = 8) -> TreeSoftmaxHead:
    """The head of shape ``name`` with N(0, 0.7^2) weights (seeded) and tokens ``tok0, tok1, ...``."""
    build, projections = SHAPES[name]
    torch.manual_seed(seed)
    head = TreeSoftmaxHead(build(), dim, projections=projections)
    for p in head.parameters():
        nn.init.normal_(p, std=0.7)
    head.labels = [f"tok{c}" for c in range(head.num_classes)]
    return head
