"""PPO from a cloned policy across instances: the regret reward, the instance mix, the fine-tuning loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from quick_settings import PLANTED, QUICK

from tree_search.agents.imitation import clone_policy, expert_demonstrations, propose
from tree_search.agents.policy_improvement import (
    FINE_TUNING,
    MIN_MARGIN,
    REWARD_CEILING,
    REWARD_FLOOR,
    Instance,
    InstanceMix,
    dataset_key,
    improve_policy,
)
from tree_search.builders import huffman
from tree_search.cost import head_cost
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.split_grammar import FLAT

CONFIG = TreeEnvConfig(dataset="planted", planted=PLANTED, train=QUICK, split_min_group=8)
OTHER = dataclasses.replace(CONFIG, planted=dataclasses.replace(PLANTED, num_classes=80, seed=3))


def test_the_reward_is_minus_the_regret_as_a_share_of_dp_s_margin_floored():
    instance = Instance("x", CONFIG, expert_nll=2.0, classic_nll=2.5)
    assert instance.reward(2.25) == pytest.approx(-0.5)  # halfway from dp's tree to the classic one
    assert instance.reward(1.9) == pytest.approx(0.2)  # better than dp
    assert instance.reward(2.0 - 10 * 0.5) == REWARD_CEILING
    assert instance.reward(2.5) == pytest.approx(-1.0)
    assert instance.reward(2.0 + 10 * 0.5) == -REWARD_FLOOR
    assert instance.reward(float("inf")) == -REWARD_FLOOR
    no_margin = Instance("y", CONFIG, expert_nll=2.0, classic_nll=1.99)  # dp no better than the classic tree
    assert no_margin.reward(2.0 + MIN_MARGIN) == pytest.approx(-1.0)


def _play(mix: InstanceMix, rng: np.random.Generator, first: int | None = None) -> tuple[int, float]:
    observation, info = mix.reset(seed=int(rng.integers(1 << 30)))
    done = truncated = False
    total, action = 0.0, first
    while not (done or truncated):
        if action is None:
            action = int(rng.choice(np.flatnonzero(observation["action_mask"])))
        observation, reward, done, truncated, _ = mix.step(action)
        total += reward
        action = None
    return info["instance"], total


def test_the_mix_draws_every_instance_and_pays_each_tree_its_regret_share():
    instances = [Instance("a", dataclasses.replace(CONFIG, cost_cap=8.0), 2.6, 3.1),
                 Instance("b", dataclasses.replace(OTHER, cost_cap=6.0), 2.8, 2.9)]  # fmt: skip
    evaluators = {dataset_key(i.config): LocalEvaluator(load_env_dataset(i.config), QUICK) for i in instances}
    mix = InstanceMix(instances, evaluators)
    rng = np.random.default_rng(0)
    drawn, over, within = set(), 0, 0
    for _ in range(12):
        index, total = _play(mix, rng)
        drawn.add(index)
        split, instance = mix.current.unwrapped, instances[index]
        tree, projections = split.last_tree, dict(split.last_projections)
        dataset = load_env_dataset(instance.config)
        assert tree.num_classes == dataset.num_classes
        cost = head_cost(tree, dataset.class_weights, dataset.dim, projections)
        if cost > instance.config.cost_cap * head_cost(huffman(dataset.class_weights, 2), dataset.class_weights,
                                                       dataset.dim) * (1 + 1e-9):  # fmt: skip
            assert total == -REWARD_FLOOR
            over += 1
            continue
        # the tree scored apart, by a fresh evaluator of the instance's recipe
        nll = LocalEvaluator(dataset, QUICK).evaluate(tree, projections).valid_nll
        expert, classic = instance.expert_nll, instance.classic_nll
        assert total == pytest.approx(min(max((expert - nll) / (classic - expert), -REWARD_FLOOR), REWARD_CEILING))
        within += 1
    assert drawn == {0, 1} and within >= 3


def test_a_tree_over_the_cap_gets_the_floor():
    instance = Instance("a", dataclasses.replace(CONFIG, cost_cap=1.0), 3.0, 3.5)
    mix = InstanceMix([instance], {dataset_key(CONFIG): LocalEvaluator(load_env_dataset(CONFIG), QUICK)})
    flat = mix.current.unwrapped.action_of(FLAT)  # one node over every class: 32x binary Huffman's cost at V = 64
    _, total = _play(mix, np.random.default_rng(1), first=flat)
    assert total == -REWARD_FLOOR


@pytest.fixture(scope="module")
def clone_and_instances():
    demos = expert_demonstrations(CONFIG, caps=(1.5, 4.0), budget=8)
    evaluator = LocalEvaluator(load_env_dataset(CONFIG), QUICK)
    instances = []
    for cap, demo in zip((1.5, 4.0), demos, strict=True):
        expert = evaluator.evaluate(demo.tree, demo.projections).valid_nll
        instances.append(Instance(f"planted@{cap:g}x", dataclasses.replace(CONFIG, cost_cap=cap), expert, expert + 0.1))
    return demos, instances


def test_ppo_starts_from_the_clone_moves_it_and_reports_every_round(clone_and_instances):
    demos, instances = clone_and_instances
    module = clone_policy(demos)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    rounds = []
    small = dataclasses.replace(FINE_TUNING, batch_steps=32, minibatch_size=16, num_epochs=2)
    improve_policy(module, instances, rounds=1, iterations=1, policy=small,
                   on_round=lambda r, stats: rounds.append((r, stats)))  # fmt: skip
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[name], before[name]) for name in before)  # the learner's weights came back
    # a few small clipped steps from the clone: it still takes every decision of dp's (the clone does, see
    # test_imitation); a learner left at its own random initialisation would agree at chance
    for instance, demo in zip(instances, demos, strict=True):
        assert propose(module, instance.config)[2] == demo.actions.tolist()
    assert [r for r, _ in rounds] == [0, 1]
    assert rounds[0][1]["episodes"] == 0 and rounds[1][1]["episodes"] >= 1
    assert -REWARD_FLOOR <= rounds[1][1]["reward"]
