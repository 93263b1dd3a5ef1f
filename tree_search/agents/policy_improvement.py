"""PPO from a cloned start, across instances: policy improvement beyond behaviour cloning (issue 24, step 3).

`improve_policy` takes a policy cloned from dp (`tree_search.agents.imitation.clone_policy`) and
trains it further with RLlib's PPO on episodes of many training instances at once: each episode
picks an instance and a cost cap at random (`InstanceMix`; the cap is the policy's input, one
policy for every cap) and builds a tree in that instance's two-level split environment, the
environment the policy was cloned in. The tree is evaluated by the instance's own evaluator, so
a tree or a node seen before costs nothing (the node bank).

Rewards. Losses differ between instances by nats (V, entropy), so the terminal reward is the
tree's validation NLL measured against two reference points of its instance and cap: dp's best
tree (`Instance.expert_nll`) and the best classic tree within the cap (`Instance.classic_nll`),

    reward = (expert_nll - nll) / max(classic_nll - expert_nll, MIN_MARGIN),

that is minus the regret as a share of dp's margin over the classic tree (0: as good as dp,
-1: no better than the classic tree), floored at ``-REWARD_FLOOR`` (which a tree over the cap
gets: the environment does not train it) and capped at ``REWARD_CEILING`` (where dp is barely
better than the classic tree, or dp's budget missed a much better tree, an uncapped share of a
tiny margin grows to tens, and PPO learned to chase that one instance: measured, planted instances).
Rewards come at the episode's end (``reward_mode="terminal"``): the affine scaling per instance
would have to be split over dense node rewards, and an episode has at most 17 decisions.

The value network starts untrained (cloning fits the policy only); PPO's clipped updates keep
the first iterations near the clone while it learns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.tune.registry import register_env

from tree_search.agents.imitation import two_level
from tree_search.agents.policy import PolicyConfig
from tree_search.agents.rllib_search import masked_module_spec, policy_gradient_training, ppo_training
from tree_search.distributed.ray_evaluator import ensure_ray
from tree_search.envs import TreeEnvConfig, load_env_dataset, make_env
from tree_search.reward.evaluator import LocalEvaluator

__all__ = [
    "FINE_TUNING",
    "MIN_MARGIN",
    "REWARD_CEILING",
    "REWARD_FLOOR",
    "Instance",
    "InstanceMix",
    "dataset_key",
    "improve_policy",
]

MIN_MARGIN = 0.01  # nats: the reward's scale where dp is barely better than the classic tree (or not at all)
REWARD_FLOOR = 5.0  # the lowest reward: a tree over the cap, or one five margins worse than dp's
REWARD_CEILING = 2.0  # the highest: two margins better than dp's (where dp's margin is tiny, PPO would chase it)
# PPO's settings for fine-tuning a cloned policy: small steps (the clone is already good), batches of several
# instances' episodes; the hidden layers are the clone's.
FINE_TUNING = PolicyConfig(lr=1e-4, entropy_coeff=0.001, batch_steps=256, minibatch_size=64, num_epochs=4)
_ENV_NAME = "tree_search_instance_mix"
_MIXES: dict[str, Callable[[], gym.Env]] = {}  # key -> factory of the mix (RLlib builds envs from a dict)


@dataclasses.dataclass(frozen=True)
class Instance:
    """One training instance at one cap: its environment settings and the reward's reference points."""

    name: str
    config: TreeEnvConfig  # the instance's settings, at this cap (``cost_cap``)
    expert_nll: float  # validation NLL of dp's best tree within the cap
    classic_nll: float  # validation NLL of the best classic tree within the cap

    def reward(self, nll: float) -> float:
        """Minus the regret of a tree of validation NLL ``nll``, as a share of dp's margin (floored and capped)."""
        margin = max(self.classic_nll - self.expert_nll, MIN_MARGIN)
        share = (self.expert_nll - nll) / margin
        return min(max(share, -REWARD_FLOOR), REWARD_CEILING) if math.isfinite(share) else -REWARD_FLOOR


class InstanceMix(gym.Env):
    """Each episode: one (instance, cap) drawn at random, played in its two-level split environment.

    The observation and action spaces are every instance's (they must agree: the split environment's
    observation holds no V). The terminal reward is `Instance.reward` of the tree's validation NLL;
    ``info`` is reduced to the drawn instance's index (``"instance"``).
    """

    def __init__(self, instances: Sequence[Instance], evaluators: dict[str, LocalEvaluator]) -> None:
        """``evaluators``: one per dataset (by its ``TreeEnvConfig.dataset``/planted key, `dataset_key`)."""
        if not instances:
            raise ValueError("InstanceMix needs at least one instance")
        self.instances = list(instances)
        self._envs = []
        for instance in self.instances:
            evaluator = evaluators[dataset_key(instance.config)]
            reward_fn = functools.partial(_scored, evaluator)
            self._envs.append(make_env({"env": "split", **two_level(instance.config).to_env_config()},
                                       dataset=evaluator.dataset, reward_fn=reward_fn))  # fmt: skip
        first = self._envs[0]
        for instance, env in zip(self.instances, self._envs, strict=True):
            if env.observation_space != first.observation_space or env.action_space != first.action_space:
                raise ValueError(f"{instance.name}: its split environment's spaces differ from the first instance's")
        self.observation_space, self.action_space = first.observation_space, first.action_space
        self._current = 0

    @property
    def current(self) -> gym.Env:
        """The environment of the episode under way (its ``unwrapped.last_tree`` is the episode's tree)."""
        return self._envs[self._current]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):  # noqa: D102
        super().reset(seed=seed)
        self._current = int(self.np_random.integers(len(self.instances)))
        observation, _ = self._envs[self._current].reset()
        return observation, {"instance": self._current}

    def step(self, action):  # noqa: D102
        observation, reward, terminated, truncated, info = self._envs[self._current].step(action)
        if terminated:  # a tree over the cap is not trained (no result): the floor
            result = info["result"] if not info["over_cap"] and info["error"] is None else None
            reward = self.instances[self._current].reward(math.inf if result is None else result["valid_nll"])
        return observation, float(reward), terminated, truncated, {"instance": self._current}


def _scored(evaluator: LocalEvaluator, tree, projections=None):
    return evaluator.reward(tree, projections, searcher="ppo-fine-tuning")[0]


def dataset_key(config: TreeEnvConfig) -> str:
    """What identifies an instance's dataset (configs at several caps share one evaluator)."""
    return f"{config.dataset}|{config.planted}"


def improve_policy(
    module,
    instances: Sequence[Instance],
    *,
    rounds: int,
    iterations: int = 4,
    policy: PolicyConfig = FINE_TUNING,
    seed: int = 0,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
):
    """Train ``module`` (a cloned policy) with PPO on episodes of ``instances``; it is updated in place.

    Each round is ``iterations`` PPO iterations (``policy.batch_steps`` decisions each); after each
    round the module holds the learner's weights and ``on_round(round, stats)`` is called (stats:
    the round's mean episode reward, episodes, and the evaluators' node trainings so far), so the
    caller can measure the policy per round. Round 0 (before any PPO step) is reported too.
    """
    if rounds < 0 or iterations < 1:
        raise ValueError(f"improve_policy needs rounds >= 0 and iterations >= 1, got {rounds} and {iterations}")
    evaluators: dict[str, LocalEvaluator] = {}
    for instance in instances:
        key = dataset_key(instance.config)
        if key not in evaluators:
            evaluators[key] = LocalEvaluator(load_env_dataset(instance.config), instance.config.train)
    ensure_ray(None)
    key = uuid.uuid4().hex
    _MIXES[key] = lambda: InstanceMix(instances, evaluators)
    register_env(_ENV_NAME, _make_mix)
    policy = dataclasses.replace(policy, hidden=tuple(module.policy_config.hidden))
    config = (
        PPOConfig()
        .environment(env=_ENV_NAME, env_config={"key": key})
        .env_runners(
            num_env_runners=0,
            num_envs_per_env_runner=1,
            rollout_fragment_length="auto",
            batch_mode="complete_episodes",
            sample_timeout_s=None,
        )  # fmt: skip
        .learners(num_learners=0)
        .training(**policy_gradient_training(policy), **ppo_training(policy))
        .rl_module(rl_module_spec=masked_module_spec(policy))
        .debugging(seed=seed, log_level="ERROR")
    )
    algo = config.build_algo()
    try:
        algo.learner_group.set_weights({DEFAULT_MODULE_ID: module.get_state()})
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True,
                                           timeout_seconds=60.0)  # fmt: skip
        if on_round is not None:
            on_round(0, {"reward": math.nan, "episodes": 0, "nodes_trained": _trained(evaluators)})
        for round_ in range(1, rounds + 1):
            rewards, episodes = [], 0
            for _ in range(iterations):
                result = algo.train()
                runners = result.get("env_runners", {})
                rewards.append(runners.get("episode_return_mean", math.nan))
                episodes += int(runners.get("num_episodes", 0))
            module.set_state(algo.learner_group.get_weights()[DEFAULT_MODULE_ID])
            if on_round is not None:
                on_round(round_, {"reward": float(np.nanmean(rewards)), "episodes": episodes,
                                  "nodes_trained": _trained(evaluators)})  # fmt: skip
    finally:
        algo.stop()
        _MIXES.pop(key, None)
    return module


def _make_mix(env_config: dict[str, Any]) -> gym.Env:
    """The creator registered with RLlib (a module-level function: Ray pickles it by name)."""
    return _MIXES[env_config["key"]]()


def _trained(evaluators: dict[str, LocalEvaluator]) -> int:
    return int(sum(e.counters["nodes_trained"] for e in evaluators.values()))
