"""PyTorch tree-softmax heads, their training on cached features, and the reward function."""

from tree_search.heads.reference import AdaptiveSoftmaxHead, FullSoftmaxHead
from tree_search.heads.tree_head import HeadOutput, TreeSoftmaxHead

__all__ = ["AdaptiveSoftmaxHead", "FullSoftmaxHead", "HeadOutput", "TreeSoftmaxHead"]
