"""Dense vs terminal rewards for PPO, with random search as the floor: learning curves and best trees found.

Each agent searches the same environment with the same budget of counted tree
evaluations (`run_search`, no baselines), for several seeds:

* ``ppo-terminal``: PPO, the whole reward at the end of an episode (``reward_mode="terminal"``);
* ``ppo-dense``: PPO, each decision paid at once by the loss of the node it fixes, the last step
  the exact remainder (``reward_mode="dense"``: the same episode returns, spread out);
* ``random``: Optuna's random sampler alone (terminal rewards: a black-box search sees only the
  total), without the classic-tree warm start `run_search` gives Optuna samplers, so that no agent
  starts from known good trees (built here from `OptunaSearcher` with ``seed_classics=False``);
* ``random-classics`` (not run by default): the same as `run_search` runs it, the homogeneous
  classic trees first.

Printed: PPO's per-iteration mean episode return as RLlib reports it (the learning curve),
the mean return of the evaluated trees per block of counted evaluations (all agents, the same
scale), and the best validation NLL found per agent and seed. Dense node queries are not
counted evaluations; the node bank shares their nodes with the whole-tree evaluations.

    python benchmarks/bench_dense.py                      # planted data, split env, budget 40, 3 seeds
    python benchmarks/bench_dense.py --budget 100 --dataset builtin
    python benchmarks/bench_dense.py --budget 80 --gae-lambda 0.9
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from tree_search.agents import OptunaSearcher, PolicyConfig
from tree_search.data.planted import PlantedConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset, make_env
from tree_search.reward import NodeRecipe
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.search import SearchConfig, run_search
from tree_search.search.runs import Run

AGENTS = {
    "ppo-terminal": ("ppo", "terminal"),
    "ppo-dense": ("ppo", "dense"),
    "random": ("random", "terminal"),
    "random-classics": ("random", "terminal"),
}
DEFAULT_AGENTS = ["ppo-terminal", "ppo-dense", "random"]


def random_search(config: SearchConfig, folder: Path) -> Run:
    """Optuna's random sampler without `run_search`'s classic-tree warm start, into a run folder."""
    run = Run.create(folder, config.to_json())
    dataset = load_env_dataset(config.env_config)
    evaluator = LocalEvaluator(dataset, config.env_config.train, config.env_config.seeds, budget=config.budget,
                               listeners=[run.record])  # fmt: skip
    env_config = {"env": config.env, **config.env_config.to_env_config()}
    searcher = OptunaSearcher("random", lambda reward_fn: make_env(env_config, dataset=dataset, reward_fn=reward_fn),
                              evaluator, seed=config.seed, seed_classics=False)  # fmt: skip
    try:
        for _ in searcher.search():
            pass
        run.write_json("evaluator.json", {"sessions": [evaluator.stats()]})
    finally:
        evaluator.close()
        run.close()
    return run


def learning_curve(folder: Path) -> list[float]:
    """RLlib's ``episode_return_mean`` after each training iteration (from the run's TensorBoard log)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if "policy/episode_return_mean" not in events.Tags().get("scalars", []):
        return []
    return [point.value for point in events.Scalars("policy/episode_return_mean")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=DEFAULT_AGENTS, choices=list(AGENTS))
    parser.add_argument("--env", default="split", choices=["split", "merge", "cutoffs"])
    parser.add_argument("--dataset", default="planted", help="'planted' (default), 'builtin', .npz or feature folder")
    parser.add_argument("--classes", type=int, default=1000, help="planted data: number of classes")
    parser.add_argument("--budget", type=int, default=40, help="counted tree evaluations per agent and seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="node recipe: optimizer steps per node")
    parser.add_argument("--max-steps", type=int, default=8, help="decisions per episode")
    parser.add_argument("--block", type=int, default=10, help="evaluations per point of the evaluation curve")
    parser.add_argument("--gae-lambda", type=float, default=1.0, help="PPO's GAE lambda (< 1: dense rewards matter)")
    parser.add_argument("--out", type=Path, default=Path("runs") / time.strftime("bench-dense-%Y%m%d-%H%M%S"))
    args = parser.parse_args()

    planted = PlantedConfig(num_classes=args.classes, dim=32, num_train=100_000, num_valid=10_000, num_test=10_000)
    base = TreeEnvConfig(
        dataset=args.dataset,
        planted=planted,
        train=NodeRecipe(steps=args.steps, measurements=2, train_tokens=100_000, valid_tokens=10_000),
        max_steps=args.max_steps,
    )
    # gamma = 1: the return PPO maximises is the same in both reward modes; with lambda = 1 (the default) dense
    # rewards change only the variance of the advantages, with lambda < 1 they also move credit to each decision.
    policy = PolicyConfig(batch_steps=32, minibatch_size=16, num_epochs=8, gae_lambda=args.gae_lambda)
    table: dict[str, dict[int, dict]] = {name: {} for name in args.agents}
    for seed in range(args.seeds):
        for name in args.agents:
            agent, mode = AGENTS[name]
            # No agent starts from the classic trees (PPO's seeding would clone the best of them into its policy),
            # except random-classics: this measures what each agent learns on its own.
            config = SearchConfig(agent=agent, env=args.env, budget=args.budget, baselines="none", seed=seed,
                                  env_config=base.with_updates(reward_mode=mode), policy=policy,
                                  seed_classics=name == "random-classics")  # fmt: skip
            folder = args.out / f"{name}-seed{seed}"
            started = time.perf_counter()
            run = random_search(config, folder) if name == "random" else run_search(config, folder, log=None)
            seconds = time.perf_counter() - started
            rows = [e for e in run.evaluations() if e.counted]
            nll = np.array([e.valid_nll if e.ok else math.inf for e in rows])
            blocks = [-float(np.mean(b[np.isfinite(b)])) for b in np.split(nll, range(args.block, nll.size, args.block))
                      if np.isfinite(b).any()]  # fmt: skip
            stats = (run.read_json("evaluator.json") or {"sessions": [{}]})["sessions"][-1]
            table[name][seed] = {
                "best_valid_nll": float(nll.min()) if nll.size else math.inf,
                "evaluations": len(rows),
                "seconds": seconds,
                "curve": learning_curve(folder) if agent == "ppo" else [],
                "blocks": blocks,
                "nodes_trained": stats.get("nodes_trained"),
            }
            r = table[name][seed]
            print(f"{name:<13s} seed {seed}: best valid NLL {r['best_valid_nll']:.4f} after {r['evaluations']} "
                  f"evaluations, {seconds:.0f} s, {len(r['curve'])} PPO iterations", flush=True)  # fmt: skip
    print("\nPPO learning curves: RLlib episode_return_mean per iteration")
    for name in args.agents:
        for seed, r in table[name].items():
            if r["curve"]:
                print(f"  {name:<13s} seed {seed}: " + " ".join(f"{v:.3f}" for v in r["curve"]))
    print(f"\nmean return (-valid NLL) of the evaluated trees, per block of {args.block} counted evaluations")
    for name in args.agents:
        for seed, r in table[name].items():
            print(f"  {name:<13s} seed {seed}: " + " ".join(f"{v:.4f}" for v in r["blocks"]))
    print("\nbest validation NLL found (nats/token)")
    print(f"  {'agent':<13s} " + " ".join(f"{'seed ' + str(s):>8s}" for s in range(args.seeds)) + f" {'mean':>8s}")
    for name in args.agents:
        best = [table[name][s]["best_valid_nll"] for s in range(args.seeds)]
        print(f"  {name:<13s} " + " ".join(f"{b:8.4f}" for b in best) + f" {np.mean(best):8.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dense.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": table}, indent=1))  # fmt: skip
    print(f"\nwritten: {args.out / 'bench_dense.json'}")


if __name__ == "__main__":
    main()
