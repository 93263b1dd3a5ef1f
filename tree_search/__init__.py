"""tree_search: search for the best output-tree structure of a hierarchical softmax head."""

from tree_search.tree import Tree, TreeError

__all__ = ["Tree", "TreeError"]
__version__ = "0.1.0"
