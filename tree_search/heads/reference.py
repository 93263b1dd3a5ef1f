"""Reference heads: the full softmax, and PyTorch's adaptive softmax behind the same interface."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tree_search.heads.tree_head import HeadOutput

__all__ = ["AdaptiveSoftmaxHead", "FullSoftmaxHead"]


class FullSoftmaxHead(nn.Module):
    """``log_softmax(W h + b)`` over all V classes: the O(V) reference.

    Shape:
        h (B, d), y (B,) -> `log_prob` (B,); `log_probs_all` (B, V).
    """

    def __init__(self, num_classes: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(dim, num_classes, bias=bias)

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities."""
        return torch.log_softmax(self.linear(h).float(), dim=-1)

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) log p(y | h)."""
        return -nn.functional.cross_entropy(self.linear(h).float(), y, reduction="none")

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """Log-probabilities of the targets and the mean NLL."""
        output = self.log_prob(h, y)
        return HeadOutput(output, -output.mean())

    @torch.no_grad()
    def predict(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` classes and log-probabilities, (B, k) each."""
        lp, classes = self.log_probs_all(h).topk(k, dim=-1)
        return classes, lp


class AdaptiveSoftmaxHead(nn.Module):
    """`torch.nn.AdaptiveLogSoftmaxWithLoss` behind the head interface (tests and benchmarks only)."""

    def __init__(self, num_classes: int, dim: int, cutoffs: Sequence[int], div_value: float = 4.0,
                 head_bias: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.inner = nn.AdaptiveLogSoftmaxWithLoss(dim, num_classes, list(cutoffs), div_value, head_bias)

    def log_probs_all(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) log-probabilities."""
        return self.inner.log_prob(h)

    def log_prob(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) log p(y | h)."""
        return self.inner(h, y).output

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> HeadOutput:
        """Log-probabilities of the targets and the mean NLL."""
        result = self.inner(h, y)
        return HeadOutput(result.output, result.loss)
