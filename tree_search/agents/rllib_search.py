"""RLlib policy-gradient searchers (PPO, APPO) with an action-masking RL module.

The policy sees the environment's ``observations``; its logits of illegal actions are
set to the smallest float before sampling, so it never sends an illegal action (the
environments raise on one). With ``env_runners=0`` episodes are sampled in the driver
process: the environments reach the run's `Evaluator` through a key in ``env_config``
looked up in this module (RLlib pickles ``env_config``, so a live object cannot travel
in it). With ``env_runners=N`` RLlib samples in N Ray actors anywhere in the cluster, N
episodes at once; their environments reach the same `Evaluator` through an evaluation
relay (`tree_search.agents.relay`), so deduplication, the budget and the run's records
are the same in both modes. Training stops mid-iteration when the evaluation budget is
used up (with remote runners the episodes then in flight end truncated, without a
reward, and that last iteration is neither counted nor checkpointed). A checkpoint of
the algorithm is saved in ``<run>/checkpoints/<agent>`` after every iteration and
restored when the run is resumed. A search gives up after ``FRUITLESS_ITERATIONS``
iterations in a row without a new counted evaluation (a cap that no tree of the
environment fits penalises every episode, and the budget would never be used).

Seeding (``seed_classics``, on by default, not on resume): before the first iteration the
searcher plays the homogeneous episodes of its environment through the evaluator
(`tree_search.agents.seeding`: in the split environment, the classic trees it can
express; at most half the budget, the most expensive within the cap first), then clones
the actions of the best of them into the initial policy (a few steps of cross-entropy on
its observations, until the policy gives those actions probability ``demo_probability``
on average) and sends the weights to the env runners. PPO then samples around the best
classic tree instead of uniformly, and the search's best is never worse than the classic
trees it played. The seed episodes are not in PPO's first batch (PPO learns only from
its own samples). With remote env runners no environment is built in the driver, and the
search is not seeded.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.appo.torch.default_appo_torch_rl_module import DefaultAPPOTorchRLModule
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.torch_utils import FLOAT_MIN
from ray.tune.registry import register_env

from tree_search.agents.base import EnvFactory, Searcher, SearcherReward
from tree_search.agents.policy import PolicyConfig
from tree_search.agents.relay import RelayReward, RelayServer
from tree_search.agents.seeding import nearest_legal, seed_episodes
from tree_search.data.features import FeatureDataset
from tree_search.distributed.ray_evaluator import ensure_ray
from tree_search.envs import SearchStopped, make_env
from tree_search.reward.evaluator import BudgetExhausted, Evaluation, Evaluator, evaluation_key, failed_result
from tree_search.reward.reward import Result
from tree_search.tree import Tree

__all__ = [
    "MaskedAPPOTorchRLModule",
    "MaskedPPOTorchRLModule",
    "RLlibSearcher",
    "masked_module_spec",
    "policy_gradient_training",
    "ppo_training",
]

_ENV_NAME = "tree_search_env"
FRUITLESS_ITERATIONS = 25  # a search stops after this many iterations in a row without a new counted evaluation
_FACTORIES: dict[str, EnvFactory] = {}  # evaluator key -> factory of environments scoring through that evaluator


class _BudgetReached(BaseException):  # noqa: N818 - a BaseException passes RLlib's `except Exception` and stops sampling
    """Raised inside an environment when the evaluation budget is used up."""


class _MaskingMixin:
    """Networks read ``obs["observations"]``; logits of masked actions become FLOAT_MIN (-inf: NaN entropy)."""

    def __init__(self, *, observation_space=None, **kwargs: Any) -> None:
        self._observation_space_with_mask = observation_space
        super().__init__(observation_space=observation_space["observations"], **kwargs)

    def setup(self) -> None:
        super().setup()
        self.observation_space = self._observation_space_with_mask

    @staticmethod
    def _split(batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(mask, a copy of the batch whose observations are the plain vector); never mutates ``batch``."""
        observation = batch[Columns.OBS]
        if isinstance(observation, dict):
            batch = dict(batch)
            batch["action_mask"] = observation["action_mask"]
            batch[Columns.OBS] = observation["observations"]
        return batch["action_mask"], batch

    def _masked(self, forward, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        mask, batch = self._split(batch)
        out = forward(batch, **kwargs)
        out[Columns.ACTION_DIST_INPUTS] = out[Columns.ACTION_DIST_INPUTS].masked_fill(mask < 0.5, FLOAT_MIN)
        return out

    def _forward_inference(self, batch, **kwargs):
        return self._masked(super()._forward_inference, batch, **kwargs)

    def _forward_exploration(self, batch, **kwargs):
        return self._masked(super()._forward_exploration, batch, **kwargs)

    def _forward_train(self, batch, **kwargs):
        return self._masked(super()._forward_train, batch, **kwargs)

    def compute_values(self, batch, embeddings=None):
        _, batch = self._split(batch)
        return super().compute_values(batch, embeddings)


class MaskedPPOTorchRLModule(_MaskingMixin, DefaultPPOTorchRLModule):
    """PPO's default module with action masking."""


class MaskedAPPOTorchRLModule(_MaskingMixin, DefaultAPPOTorchRLModule):
    """APPO's default module with action masking (the target network is masked too)."""

    def forward_target(self, batch, **kwargs):
        """Target-network logits, masked like the policy's."""
        mask, batch = self._split(batch)
        out = super().forward_target(batch, **kwargs)
        out[TARGET_NETWORK_ACTION_DIST_INPUTS] = out[TARGET_NETWORK_ACTION_DIST_INPUTS].masked_fill(
            mask < 0.5, FLOAT_MIN
        )
        return out


def policy_gradient_training(policy: PolicyConfig) -> dict[str, Any]:
    """RLlib ``training(...)`` settings every policy-gradient algorithm takes from a `PolicyConfig`."""
    return {"train_batch_size_per_learner": policy.batch_steps, "lr": policy.lr,
            "entropy_coeff": policy.entropy_coeff, "vf_loss_coeff": policy.vf_loss_coeff,
            "gamma": policy.gamma}  # fmt: skip


def ppo_training(policy: PolicyConfig) -> dict[str, Any]:
    """PPO's own ``training(...)`` settings from a `PolicyConfig` (beside `policy_gradient_training`)."""
    return {"lambda_": policy.gae_lambda, "minibatch_size": policy.minibatch_size, "num_epochs": policy.num_epochs}


def masked_module_spec(policy: PolicyConfig, module: type = None, observation_space=None,
                       action_space=None) -> RLModuleSpec:  # fmt: skip
    """The searchers' policy network: ``module`` (default `MaskedPPOTorchRLModule`) with ``policy.hidden`` layers."""
    return RLModuleSpec(
        module_class=module or MaskedPPOTorchRLModule,
        observation_space=observation_space,
        action_space=action_space,
        model_config={
            "fcnet_hiddens": list(policy.hidden),
            "fcnet_activation": "tanh",
            "head_fcnet_hiddens": [],
            "vf_share_layers": False,
        },  # fmt: skip
    )


class _StringKeyedInfo(gym.Wrapper):
    """Gives RLlib ``info`` dicts whose nested dicts have string keys (``info["projections"]`` is keyed by node).

    Gymnasium's vector wrappers, which RLlib's env runners apply, walk nested info dicts and need
    string keys; the environments' own ``info`` keeps its integer node ids.
    """

    def reset(self, **kwargs):  # noqa: D102
        observation, info = self.env.reset(**kwargs)
        return observation, _string_keyed(info)

    def step(self, action):  # noqa: D102
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated, truncated, _string_keyed(info)


def _string_keyed(info: dict[str, Any]) -> dict[str, Any]:
    return {k: {str(a): b for a, b in v.items()} if isinstance(v, dict) else v for k, v in info.items()}


def make_rllib_env(env_config: dict[str, Any]):
    """The creator registered with RLlib.

    ``{"relay": name, "env_config": {...}}``: an environment in a remote env runner, scoring
    through the driver's relay; ``{"evaluator_key": key}``: in the driver, the run's own
    environment factory.
    """
    if "relay" in env_config:
        reward = RelayReward(env_config["relay"])
        return _StringKeyedInfo(make_env(dict(env_config["env_config"]), dataset=reward.dataset(), reward_fn=reward))
    key = env_config["evaluator_key"]
    if key not in _FACTORIES:
        raise RuntimeError(
            f"evaluator {key!r} is not registered in this process: the in-process evaluator needs env_runners=0"
        )
    return _StringKeyedInfo(_FACTORIES[key]())


class RLlibSearcher(Searcher):
    """PPO or APPO learning a policy that builds trees; every episode's tree is evaluated once."""

    def __init__(self, agent: str, env_factory: EnvFactory, evaluator: Evaluator, *, run=None, policy=None,
                 seconds: float | None = None, seed: int = 0, ray_address: str | None = None,
                 env_runners: int = 0, env_config: dict[str, Any] | None = None,
                 dataset: FeatureDataset | None = None, seed_classics: bool = True,
                 demo_probability: float = 0.5, give_up_after: int = FRUITLESS_ITERATIONS) -> None:  # fmt: skip
        """Args: agent: "ppo" or "appo"; run: the `Run` (checkpoints, TensorBoard); policy: a `PolicyConfig`.

        With ``env_runners > 0`` RLlib samples in that many Ray actors, whose environments
        are built from ``env_config`` (`make_env`'s dict) on ``dataset``: both are then required.
        ``seed_classics``: start from the homogeneous episodes and clone the best one into the
        policy, to ``demo_probability`` (see the module docstring). ``give_up_after``: iterations
        in a row without a new counted evaluation before the search stops.
        """
        super().__init__(env_factory, evaluator, seconds=seconds, seed=seed)
        if agent not in ("ppo", "appo"):
            raise ValueError(f"RLlib agent must be 'ppo' or 'appo', got {agent!r}")
        self.name, self.run, self.policy, self.ray_address = agent, run, policy or PolicyConfig(), ray_address
        if env_runners < 0:
            raise ValueError(f"env_runners must be >= 0, got {env_runners}")
        if env_runners > 0 and (env_config is None or dataset is None):
            raise ValueError("remote env runners (env_runners > 0) need the env_config dict and the dataset")
        self.env_runners, self.env_config, self.dataset = env_runners, env_config, dataset
        if not 0.0 < demo_probability < 1.0:
            raise ValueError(f"demo_probability must be in (0, 1), got {demo_probability}")
        self.seed_classics, self.demo_probability = seed_classics, demo_probability
        self.demonstration: list[int] | None = None  # the actions cloned into the initial policy
        self.demonstration_probability: float | None = None  # what the sampling policy then gives them, on average
        self.iterations = 0
        self.give_up_after = int(give_up_after)
        self.gave_up = False  # stopped after `give_up_after` iterations without a counted evaluation
        self.relay: RelayServer | None = None  # the last search's relay (its `served` and `clients` stay readable)

    def _reward(self, tree: Tree, projections=None):
        if self.done and not self.evaluator.knows(evaluation_key(tree, projections)):
            raise _BudgetReached
        return self.evaluator.reward(tree, projections, searcher=self.label)[0]

    def _remote_reward(self, tree: Tree, projections=None) -> Result:
        """The relay's answer to a remote environment; `SearchStopped` rather than a made-up failure."""
        if self.done and not self.evaluator.knows(evaluation_key(tree, projections)):
            raise SearchStopped("the search's evaluation budget or time is used up")
        try:  # two runners can race for the last evaluation of the budget: the loser stops
            evaluation = self.evaluator.evaluate(tree, projections, searcher=self.label)
        except BudgetExhausted as exhausted:
            raise SearchStopped(str(exhausted)) from exhausted
        return Result.from_json(evaluation.result) if evaluation.result else failed_result(tree, evaluation.error)

    def _play_seeds(self) -> list[tuple[list[tuple[Any, Any, int]], float]]:
        """Play the seed episodes through the evaluator: each finished one's ``([(obs, mask, action)], return)``."""
        trained, free = seed_episodes(self.env_factory, self.evaluator, self.seed)
        env, played = self.env_factory(SearcherReward(self._reward, self.evaluator, self.label)), []
        for episode in trained + [e for e in free if e.within_cap]:  # over-cap ones teach nothing
            observation, _ = env.reset(seed=self.seed)
            steps, total, done, truncated = [], 0.0, False, False
            try:
                while not (done or truncated):
                    action = nearest_legal(episode.action, observation["action_mask"])
                    steps.append((observation["observations"], observation["action_mask"], action))
                    observation, reward, done, truncated, _ = env.step(action)
                    total += float(reward)
            except _BudgetReached:
                break
            if done:
                played.append((steps, total))
        return played

    def _clone(self, algo, steps: list[tuple[Any, Any, int]]) -> None:
        """Fit the learner's policy to ``steps``' actions (to ``demo_probability``); send it to the env runners."""
        observations = {
            "observations": torch.as_tensor(np.stack([s[0] for s in steps]), dtype=torch.float32),
            "action_mask": torch.as_tensor(np.stack([s[1] for s in steps]), dtype=torch.float32),
        }
        actions = torch.as_tensor([s[2] for s in steps], dtype=torch.int64)
        module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]  # noqa: SLF001 - the local learner (no API)
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        for _ in range(500):
            logits = module.forward_train({Columns.OBS: observations})[Columns.ACTION_DIST_INPUTS]
            if torch.softmax(logits, 1).gather(1, actions[:, None]).mean() >= self.demo_probability:
                break
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(logits, actions).backward()
            optimizer.step()
        algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True,
                                           timeout_seconds=60.0)  # fmt: skip
        with torch.no_grad():  # what the sampling policy now gives the demonstration
            logits = algo.get_module().forward_inference({Columns.OBS: observations})[Columns.ACTION_DIST_INPUTS]
            self.demonstration_probability = float(torch.softmax(logits, 1).gather(1, actions[:, None]).mean())
        self.demonstration = actions.tolist()

    def algorithm_config(self, key: str, relay: str | None = None):
        """The RLlib config: masked module, small batches; sampling in the driver or in remote env runners."""
        p = self.policy
        if self.name == "ppo":
            config, module = PPOConfig(), MaskedPPOTorchRLModule
            training = ppo_training(p)
        else:
            config, module = APPOConfig(), MaskedAPPOTorchRLModule
            # With remote runners, wait for their samples instead of polling in a loop that takes a core.
            training = {"timeout_s_sampler_manager": 0.5} if relay else {}
            config = config.reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=p.batch_steps)
        if relay is None:
            env_config = {"evaluator_key": key}
        else:
            env_config = {"relay": relay, "env_config": dict(self.env_config)}
        return (
            config.environment(env=_ENV_NAME, env_config=env_config)
            .env_runners(
                num_env_runners=self.env_runners if relay else 0,
                num_envs_per_env_runner=1,
                rollout_fragment_length="auto",
                num_cpus_per_env_runner=0,  # runners mostly wait for rewards; the evaluation actors hold the CPUs
                sample_timeout_s=None,  # a fragment waits for its head trainings (RLlib drops late ones by default)
                # Remote runners: one whole episode per sample call, so every round of PPO's synchronous
                # sampling has all N runners waiting for a reward at once (fixed-length fragments would
                # leave a runner idle at the barrier while another evaluates several short episodes).
                batch_mode="complete_episodes" if relay else "truncate_episodes",
            )
            .learners(num_learners=0)
            .training(**policy_gradient_training(p), **training)
            .rl_module(rl_module_spec=masked_module_spec(p, module))
            .debugging(seed=self.seed, log_level="ERROR")
        )

    def search(self) -> Iterator[Evaluation]:
        """Train until the budget is used; yield the evaluations each iteration produced."""
        ensure_ray(self.ray_address)
        key = uuid.uuid4().hex
        arrived: queue.SimpleQueue[Evaluation] = queue.SimpleQueue()  # listeners may run on relay threads
        listener = lambda evaluation, tree: arrived.put(evaluation) if evaluation.counted else None  # noqa: E731
        self.evaluator.listeners.append(listener)
        _FACTORIES[key] = lambda: self.env_factory(SearcherReward(self._reward, self.evaluator, self.label))
        register_env(_ENV_NAME, make_rllib_env)
        relay = None
        if self.env_runners > 0:
            threads = self.env_runners if self.evaluator.thread_safe else 1
            charge = SearcherReward(self._remote_reward, self.evaluator, self.label).charge_nodes
            relay = self.relay = RelayServer(self._remote_reward, self.dataset, threads=threads, charge_fn=charge)
        algo = None
        checkpoint = None if self.run is None else self.run.folder / "checkpoints" / self.label

        def drain() -> Iterator[Evaluation]:
            while not arrived.empty():
                yield arrived.get()

        finished = False
        try:
            algo = self.algorithm_config(key, relay.name if relay else None).build_algo()
            if checkpoint is not None and (checkpoint / "algorithm_state.pkl").exists():
                algo.restore_from_path(str(checkpoint.resolve()))
            elif self.seed_classics and relay is None:  # remote runners: no environment in the driver (not seeded)
                played = self._play_seeds()
                yield from drain()
                if played:
                    self._clone(algo, max(played, key=lambda episode: episode[1])[0])
            fruitless = 0  # iterations in a row that added no counted evaluation
            while not self.done:
                if fruitless >= self.give_up_after:
                    self.gave_up = True  # e.g. a cap no tree of the environment fits: every episode is penalised
                    break
                truncated_before, used_before = (relay.stopped if relay else 0), self.evaluator.used
                try:
                    result = algo.train()
                except _BudgetReached:
                    break
                if relay is not None and relay.error is not None:
                    raise relay.error  # a bug in the driver's evaluation: stop the search with its message
                if relay is not None and relay.stopped > truncated_before:
                    break  # the search ended during this iteration: its update saw truncated episodes, keep none of it
                self.iterations += 1
                fruitless = 0 if self.evaluator.used > used_before else fruitless + 1
                if self.run is not None:
                    learner = result.get("learners", {}).get("default_policy", {})
                    runners = result.get("env_runners", {})
                    stats = {k: learner.get(k) for k in ("policy_loss", "vf_loss", "entropy", "mean_kl_loss")}
                    stats["episode_return_mean"] = runners.get("episode_return_mean")
                    self.run.log_scalars("policy", stats, self.iterations)
                    algo.save_to_path(str(checkpoint.resolve()))
                yield from drain()
            finished = True
        finally:
            try:
                if relay is not None:
                    relay.stop()  # runners waiting for rewards truncate their episodes, so RLlib can stop them
                if algo is not None:
                    algo.stop()
            finally:
                if relay is not None:  # after a normal end the evaluations in flight (APPO) finish and are recorded
                    relay.close(wait=finished)
                self.evaluator.listeners.remove(listener)
                _FACTORIES.pop(key, None)
        yield from drain()
