"""Issue 24: how close a policy cloned from dp comes to dp on instances it never saw, with no head trained.

Training instances: planted hierarchies (`tree_search.data.planted`) of several sizes, branchings,
Zipf exponents and signals; held out: other seeds and shapes, never seen in training. For each
instance and cap, dp searches (``--budget`` evaluations a cap) and its chosen plan is replayed as
demonstrations (`tree_search.agents.imitation`); the masked RLlib policy module is cloned on the
training instances' demonstrations. On each held-out instance and cap the script scores, on the
validation split with the same node recipe:

- the policy's proposal (built in milliseconds; one evaluation to score it, not part of proposing),
- dp's best tree at the cap (``--budget`` evaluations),
- the best Huffman tree (fanouts 2-16) within the cap, the classic baseline,

and prints the regret of the proposal against dp as a share of dp's margin over that classic tree
(0%: as good as dp; 100%: no better than the classic tree), and how often the proposal is over the cap.

    python benchmarks/bench_policy.py --budget 16 --out runs/bench-policy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from tree_search.agents.imitation import clone_policy, expert_demonstrations, propose, save_policy
from tree_search.builders import huffman
from tree_search.cost import head_cost
from tree_search.data.planted import PlantedConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.reward import NodeRecipe
from tree_search.reward.evaluator import LocalEvaluator
from tree_search.reward.reward import huffman_cost

RECIPE = NodeRecipe(train_tokens=None, valid_tokens=None, steps=32, batch_size=256, lr=0.05, measurements=2)
CAPS = (1.0, 1.5, 2.0, 4.0)


def _planted(num_classes: int, fanout: int, zipf: float, signal: float, seed: int) -> PlantedConfig:
    return PlantedConfig(num_classes=num_classes, dim=16, fanout=fanout, zipf=zipf, signal=signal,
                         num_train=60 * num_classes, num_valid=15 * num_classes, num_test=15 * num_classes,
                         seed=seed)  # fmt: skip


TRAIN = [_planted(v, f, z, s, seed) for seed, (v, f, z, s) in enumerate([
    (256, 4, 1.1, 3.0), (512, 2, 1.0, 2.5), (384, 8, 1.2, 3.0), (256, 3, 0.9, 2.0),
    (512, 4, 1.1, 2.0), (320, 6, 1.0, 3.5)])]  # fmt: skip
HELD_OUT = [_planted(v, f, z, s, 100 + seed) for seed, (v, f, z, s) in enumerate([
    (448, 4, 1.05, 2.5), (288, 5, 1.15, 3.0), (640, 3, 1.0, 3.0)])]  # fmt: skip


def _config(planted: PlantedConfig) -> TreeEnvConfig:
    return TreeEnvConfig(dataset="planted", planted=planted, train=RECIPE, split_min_group=8)


def _name(p: PlantedConfig) -> str:
    return f"planted V={p.num_classes} fanout={p.fanout} zipf={p.zipf} signal={p.signal} seed={p.seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=16, help="dp's evaluations per cap")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-policy"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    demonstrations = []
    for planted in TRAIN:
        demos = expert_demonstrations(_config(planted), CAPS, args.budget)
        demonstrations += demos
        print(f"[{time.time() - start:6.0f}s] train {_name(planted)}: {len(demos)} demonstrations", flush=True)
    module = clone_policy(demonstrations)
    save_policy(module, args.out / "policy.pt", _config(TRAIN[0]), instances=[_name(p) for p in TRAIN])
    decisions = sum(d.actions.size for d in demonstrations)
    print(f"cloned on {len(demonstrations)} episodes, {decisions} decisions", flush=True)
    rows = []
    for planted in HELD_OUT:
        config = _config(planted)
        dataset = load_env_dataset(config)
        counts, dim = dataset.class_weights, dataset.dim
        unit = huffman_cost(dataset)
        scorer = LocalEvaluator(dataset, RECIPE)
        classics = {k: huffman(counts, k) for k in (2, 3, 4, 8, 16)}
        classic_scores = {k: scorer.evaluate(t).valid_nll for k, t in classics.items()}
        # each demonstration's cap is its observation's last feature, log2(cap) / 4
        expert = {round(2 ** (4 * float(d.observations[0, -1])), 6): d
                  for d in expert_demonstrations(config, CAPS, args.budget)}  # fmt: skip
        for cap in CAPS:
            at_cap = dataclasses.replace(config, cost_cap=cap)
            t0 = time.perf_counter()
            tree, projections, _ = propose(module, at_cap)
            seconds = time.perf_counter() - t0
            proposal = scorer.evaluate(tree, projections)
            demo = expert.get(round(cap, 6))
            dp_nll = scorer.evaluate(demo.tree, demo.projections).valid_nll if demo is not None else float("nan")
            within = [k for k, t in classics.items() if head_cost(t, counts, dim) <= cap * unit * (1 + 1e-9)]
            classic = min((classic_scores[k] for k in within), default=float("nan"))
            cost = head_cost(tree, counts, dim, projections) / unit
            margin = classic - dp_nll
            regret = (proposal.valid_nll - dp_nll) / margin if margin > 0 else float("nan")
            rows.append({"instance": _name(planted), "cap": cap, "proposal_nll": proposal.valid_nll,
                         "proposal_cost": cost, "over_cap": cost > cap * (1 + 1e-9), "dp_nll": dp_nll,
                         "classic_nll": classic, "propose_seconds": seconds,
                         "regret_share": regret})  # fmt: skip
            r = rows[-1]
            print(f"[{time.time() - start:6.0f}s] {_name(planted)} cap {cap:g}x: proposal {r['proposal_nll']:.4f} "
                  f"({cost:.2f}x{', over the cap' if r['over_cap'] else ''}, {seconds * 1e3:.0f} ms), dp "
                  f"{dp_nll:.4f}, best Huffman within the cap {classic:.4f}, regret {regret:.0%} of dp's margin",
                  flush=True)  # fmt: skip
    shares = [r["regret_share"] for r in rows if not r["over_cap"] and np.isfinite(r["regret_share"])]
    print(f"held out: {len(rows)} instance-caps, {sum(r['over_cap'] for r in rows)} proposals over the cap; median "
          f"regret of the others {np.median(shares):.0%} of dp's margin over the best Huffman tree")  # fmt: skip
    (args.out / "bench_policy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
