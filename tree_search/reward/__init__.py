"""The node-exact reward: each internal node trained on its own, the node bank, `evaluate`, and the `Evaluator`.

A tree's validation NLL is the sum of its nodes' losses, and a node's result depends only on
its content, so trained nodes are kept in the bank and reused by every tree that contains them
(docs/reward.md). `converged` trains the full-softmax reference reports measure gaps against.
"""

from tree_search.reward.node_bank import NodeBank
from tree_search.reward.node_train import NodeRecipe, node_keys, train_nodes
from tree_search.reward.reward import FINAL_SEED_OFFSET, Result, evaluate, score_test, trained_head

__all__ = [
    "FINAL_SEED_OFFSET",
    "NodeBank",
    "NodeRecipe",
    "Result",
    "evaluate",
    "node_keys",
    "score_test",
    "train_nodes",
    "trained_head",
]
