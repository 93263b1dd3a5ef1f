"""Issue 24: a policy cloned from dp across corpora, and how close it comes to dp on instances it never saw.

Training instances: planted hierarchies (`tree_search.data.planted`) of several sizes, branchings,
Zipf exponents and signals, and real corpora of four domains (``--real``: Perl's manuals, Vim's help,
the Linux kernel's documentation, man pages; English text from Debian packages,
``make_large_english_corpus.py --by-source``, prepared at V = 3,000-4,000, and three of them at
10,000, the size of the held-out corpora: the observation gives sizes relative to V, so the policy
cannot tell a 3k corpus's root from a 10k one's). Held out, never seen in
training: other planted seeds and shapes and, with ``--real``, two other domains at V = 10,000
(Python's documentation, PostgreSQL's manual) and the built-in code corpus. For each instance and
cap, dp searches (``--budget`` evaluations a cap) and its chosen plan is replayed as demonstrations
(`tree_search.agents.imitation`); the masked RLlib policy module is cloned on the training
instances' demonstrations. On each held-out instance and cap the script scores, on the validation
split with the instance's node recipe:

- the policy's proposal (built in about a second; one evaluation to score it, not part of proposing),
- dp's best tree at the cap (``--budget`` evaluations),
- the best classic tree within the cap: Huffman (fanouts 2-16) on planted instances, the whole
  ``front`` set (clustered, head-and-tail, adaptive shapes, Grave et al.'s cutoffs) on real ones,

and prints the regret of the proposal against dp as a share of dp's margin over that classic tree
(0%: as good as dp; 100%: no better than the classic tree), and how often the proposal is over the cap.
``--ship`` writes the policy into the package (`tree_search/agents/learned_policy.pt`), the one
``tree-search propose`` and ``search --agent policy`` use by default.

    python benchmarks/make_large_english_corpus.py --by-source runs/english-domains
    for f in perl-manuals:3000 vim-help:3000 linux-kernel-documentation:4000 man-pages:4000 \
             linux-kernel-documentation:10000 man-pages:10000 perl-manuals:10000 \
             python-documentation:10000 postgresql-manual:10000; do
        tree-search data prepare --text runs/english-domains/${f%%:*}.txt --max-size ${f##*:} --name ${f%%:*}-${f##*:}
    done
    python benchmarks/bench_policy.py --budget 16 --real --ship --out runs/bench-policy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from tree_search.agents.baselines import dataset_classics
from tree_search.agents.imitation import SHIPPED_POLICY, clone_policy, expert_demonstrations, propose, save_policy
from tree_search.builders import huffman
from tree_search.cost import head_cost
from tree_search.data.names import resolve_dataset
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
REAL_TRAIN = ["perl-manuals-3000", "vim-help-3000", "linux-kernel-documentation-4000", "man-pages-4000",
              "linux-kernel-documentation-10000", "man-pages-10000", "perl-manuals-10000"]  # fmt: skip
REAL_HELD_OUT = ["python-documentation-10000", "postgresql-manual-10000", "builtin"]


def _config(instance: PlantedConfig | str) -> TreeEnvConfig:
    """A planted instance with the small recipe, or a prepared dataset (by name) as the product searches it."""
    if isinstance(instance, str):
        return TreeEnvConfig(dataset=resolve_dataset(instance))
    return TreeEnvConfig(dataset="planted", planted=instance, train=RECIPE, split_min_group=8)


def _name(p: PlantedConfig | str) -> str:
    if isinstance(p, str):
        return p
    return f"planted V={p.num_classes} fanout={p.fanout} zipf={p.zipf} signal={p.signal} seed={p.seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=16, help="dp's evaluations per cap")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-policy"))
    parser.add_argument("--real", action="store_true", help="also the real corpora (prepared under their names)")
    parser.add_argument("--ship", action="store_true", help=f"write the policy to {SHIPPED_POLICY}")
    args = parser.parse_args()
    train, held_out = list(TRAIN), list(HELD_OUT)
    if args.real:
        train, held_out = [*train, *REAL_TRAIN], [*held_out, *REAL_HELD_OUT]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    demonstrations = []
    for instance in train:
        demos = expert_demonstrations(_config(instance), CAPS, args.budget)
        demonstrations += demos
        print(f"[{time.time() - start:6.0f}s] train {_name(instance)}: {len(demos)} demonstrations", flush=True)
    module = clone_policy(demonstrations)
    names = [_name(p) for p in train]
    save_policy(module, args.out / "policy.pt", _config(TRAIN[0]), instances=names)
    if args.ship:
        save_policy(module, SHIPPED_POLICY, _config(TRAIN[0]), instances=names)
        print(f"shipped: {SHIPPED_POLICY}", flush=True)
    decisions = sum(d.actions.size for d in demonstrations)
    print(f"cloned on {len(demonstrations)} episodes, {decisions} decisions", flush=True)
    rows = []
    for planted in held_out:
        config = _config(planted)
        dataset = load_env_dataset(config)
        counts, dim = dataset.class_weights, dataset.dim
        unit = huffman_cost(dataset)
        scorer = LocalEvaluator(dataset, config.train)
        if isinstance(planted, str):  # the product's classic front
            classics = {name: (c.tree, c.projections) for name, c in dataset_classics(dataset, "front").items()}
        else:
            classics = {k: (huffman(counts, k), {}) for k in (2, 3, 4, 8, 16)}
        classic_scores = {k: scorer.evaluate(*t).valid_nll for k, t in classics.items()}
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
            within = [k for k, t in classics.items() if head_cost(t[0], counts, dim, t[1]) <= cap * unit * (1 + 1e-9)]
            best_classic = min(within, key=classic_scores.get, default=None)
            classic = classic_scores[best_classic] if best_classic is not None else float("nan")
            cost = head_cost(tree, counts, dim, projections) / unit
            margin = classic - dp_nll
            regret = (proposal.valid_nll - dp_nll) / margin if margin > 0 else float("nan")
            rows.append({"instance": _name(planted), "cap": cap, "proposal_nll": proposal.valid_nll,
                         "proposal_cost": cost, "over_cap": cost > cap * (1 + 1e-9), "dp_nll": dp_nll,
                         "classic_nll": classic, "classic": str(best_classic), "propose_seconds": seconds,
                         "regret_share": regret})  # fmt: skip
            r = rows[-1]
            print(f"[{time.time() - start:6.0f}s] {_name(planted)} cap {cap:g}x: proposal {r['proposal_nll']:.4f} "
                  f"({cost:.2f}x{', over the cap' if r['over_cap'] else ''}, {seconds * 1e3:.0f} ms), dp "
                  f"{dp_nll:.4f}, best classic within the cap {classic:.4f} ({best_classic}), regret {regret:.0%} of "
                  f"dp's margin",
                  flush=True)  # fmt: skip
    shares = [r["regret_share"] for r in rows if not r["over_cap"] and np.isfinite(r["regret_share"])]
    print(f"held out: {len(rows)} instance-caps, {sum(r['over_cap'] for r in rows)} proposals over the cap; median "
          f"regret of the others {np.median(shares):.0%} of dp's margin over the best classic tree")  # fmt: skip
    (args.out / "bench_policy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
