"""PyTorch tree-softmax heads, their training and the reward (arrive with the heads issue)."""
