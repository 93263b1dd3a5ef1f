"""Environment throughput: steps per second (reward stubbed out) and evaluations per second (real reward).

Random masked rollouts in every environment on the built-in code corpus (V = 10,000)
and on planted-hierarchy data. "steps/s" measures the environment alone: its reward
function returns at once, so the numbers are the cost of observations, masks, splits,
merges and tree building. "evals/s" runs the real reward (a head trained on the
validation split's budget) for a few episodes per environment.

    python benchmarks/bench_envs.py [--episodes 20] [--evals 3]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from tree_search.data.planted import PlantedConfig
from tree_search.envs import ENV_IDS, TreeEnvConfig, load_env_dataset, make_env
from tree_search.reward.reward import Result


def instant_reward(tree, projections=None) -> Result:
    return Result(tree.canonical_hash, 3.0, 0.0, math.exp(3.0), 0.0, 0.0, 1.0, 0.1, 0.0, 1, "cpu", (0,))


def rollouts(env, episodes: int, seed: int) -> tuple[int, float, list[float]]:
    rng = np.random.default_rng(seed)
    steps, rewards, started = 0, [], time.perf_counter()
    for episode in range(episodes):
        _, info = env.reset(seed=seed + episode)
        done = False
        while not done:
            _, reward, done, _, info = env.step(int(rng.choice(np.flatnonzero(info["action_mask"]))))
            steps += 1
        rewards.append(reward)
    return steps, time.perf_counter() - started, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--evals", type=int, default=3)
    args = parser.parse_args()
    datasets = {
        "builtin": TreeEnvConfig(),
        "planted V=1000": TreeEnvConfig(dataset="planted", planted=PlantedConfig(num_classes=1000)),
    }
    print(f"{'data':<16s} {'env':<8s} {'steps/s':>9s} {'episodes/s':>11s} {'steps/ep':>9s} {'evals/s':>8s} "
          f"{'s/eval':>7s} {'best reward':>11s}")  # fmt: skip
    for data_name, config in datasets.items():
        dataset = load_env_dataset(config)
        for env_name in ENV_IDS:
            env = make_env({"env": env_name, **config.to_env_config()}, dataset=dataset, reward_fn=instant_reward)
            rollouts(env, 1, 10_000)  # warm-up: embeddings, Huffman reference
            steps, seconds, _ = rollouts(env, args.episodes, 0)
            real = make_env({"env": env_name, **config.to_env_config(), "cost_mode": "tradeoff"}, dataset=dataset)
            _, eval_seconds, rewards = rollouts(real, args.evals, 100)
            print(f"{data_name:<16s} {env_name:<8s} {steps / seconds:9.1f} {args.episodes / seconds:11.2f} "
                  f"{steps / args.episodes:9.1f} {args.evals / eval_seconds:8.3f} {eval_seconds / args.evals:7.1f} "
                  f"{max(rewards):11.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
