"""dp's trees as decisions of the split environment: the expert's demonstrations a policy imitates (issue 24).

`DPSearcher.best_plan` gives dp's choice at a cap as a two-level plan: a root rule, and for each
part of the root split a completion rule applied through the part's whole subtree. The split
environment in its two-level mode (``TreeEnvConfig.split_two_level``: dp's grammar, whose actions
include Huffman subtrees, the adaptive softmax's root splits and flat nodes of any size) decides
exactly that: first the root, then each root part in order of token mass. `demonstrate` plays a
plan in such an environment and records each step's observation, action mask and action, so
behaviour cloning sees dp's decisions in the states a policy will meet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tree_search.split_grammar import FLAT, SplitRule
from tree_search.tree import Tree

__all__ = ["Demonstration", "demonstrate", "demonstrate_homogeneous"]


@dataclass(frozen=True)
class Demonstration:
    """One episode of the expert: per decision, the observation, the legal actions and the action taken."""

    observations: np.ndarray  # (steps, features) float32
    action_masks: np.ndarray  # (steps, actions) bool
    actions: np.ndarray  # (steps,) int64
    tree: Tree  # the episode's tree
    projections: dict[int, int]


def demonstrate(
    env, root: SplitRule, completions: Mapping[int, SplitRule], parts: Sequence[np.ndarray]
) -> Demonstration:
    """Play dp's plan in ``env`` (a two-level split environment) and record its decisions.

    Args:
        env: a ``TreeSearch/Split-v1`` environment with ``split_two_level`` (wrapped or not); its
            reward function is called once at the end (one that raises `SearchStopped` gives the
            tree without training anything).
        root: the root rule.
        completions: the completion rule of each root part with more than one class, by part index.
        parts: the root split's parts (as `DPSearcher.best_plan` returns them), which identify
            each group the environment offers.

    Raises:
        ValueError: when the environment is not in two-level mode, or offers a group that is
            no part of the plan, or an action of the plan is illegal there.
    """
    part_of = {int(part.min()): index for index, part in enumerate(parts) if part.size > 1}

    def rule_for(group: np.ndarray, num_classes: int) -> SplitRule:
        if group.size == num_classes:
            return root
        index = part_of.get(int(group.min()))
        if index is None or index not in completions:
            raise ValueError(f"the environment offers a group of {group.size} classes that is no part of the plan")
        return completions[index]

    return _record(env, rule_for)


def demonstrate_homogeneous(env, rule: SplitRule) -> Demonstration:
    """Play ``rule`` at the root and as every part's completion: the classic tree of that rule in dp's grammar.

    Raises:
        ValueError: as `demonstrate`, when ``rule`` is illegal at some decision.
    """
    return _record(env, lambda group, num_classes: rule)


def _record(env, rule_for) -> Demonstration:
    """Play ``rule_for(group, V)`` at each decision of a two-level split environment and record the episode."""
    split = env.unwrapped
    if not split.config.split_two_level:
        raise ValueError("demonstrate needs a split environment with split_two_level=True (dp's grammar)")
    observation, info = env.reset()
    observations, masks, actions = [], [], []
    done = truncated = False
    while not (done or truncated):
        group = split.current_group()
        rule = rule_for(group, split.num_classes)
        if group.size < split.num_classes and not rule.flat and rule.cut != "cutoffs" and group.size <= rule.fanout:
            rule = FLAT  # a split into at least as many parts as classes: every class a leaf (`plan_head`'s too)
        action = split.action_of(rule)
        if not info["action_mask"][action]:
            raise ValueError(f"the plan's rule '{rule}' is not legal for a group of {group.size} classes")
        observations.append(np.asarray(observation["observations"], dtype=np.float32))
        masks.append(np.asarray(info["action_mask"], dtype=bool))
        actions.append(action)
        observation, _, done, truncated, info = env.step(action)
    return Demonstration(np.stack(observations), np.stack(masks), np.array(actions, dtype=np.int64), split.last_tree,
                         dict(split.last_projections))  # fmt: skip
