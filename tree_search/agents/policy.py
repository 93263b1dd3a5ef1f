"""`PolicyConfig`: the policy-gradient settings of the RLlib searchers (its own module: no import cycle)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PolicyConfig"]


@dataclass(frozen=True)
class PolicyConfig:
    """Policy-gradient settings of the RLlib searchers."""

    lr: float = 3e-4  # learning rate of policy and value networks
    entropy_coeff: float = 0.01  # entropy bonus: keeps exploring structures
    vf_loss_coeff: float = 0.5  # weight of the value loss
    gamma: float = 1.0  # episodes are short: no discount (the episode's return is exactly -NLL)
    gae_lambda: float = 1.0  # PPO's GAE lambda; below 1, dense rewards (reward_mode="dense") lower the variance
    batch_steps: int = 32  # environment steps sampled per training iteration
    minibatch_size: int = 16  # PPO minibatch (steps)
    num_epochs: int = 8  # PPO: SGD passes over each batch
    hidden: tuple[int, ...] = (64, 64)  # hidden layers of policy and value networks
