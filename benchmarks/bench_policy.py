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
from tree_search.agents.policy_improvement import Instance, improve_policy
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


@dataclasses.dataclass
class _Judge:
    """An instance's reference points on validation: dp's tree at each cap and the classic trees."""

    name: str
    config: TreeEnvConfig
    scorer: LocalEvaluator
    demonstrations: list  # dp's plan at each cap, as episodes (`expert_demonstrations`)
    classic_scores: dict[str, float]
    classic_costs: dict[str, float]  # in binary Huffman's

    @classmethod
    def build(cls, instance: PlantedConfig | str, budget: int, show_classics: bool = False) -> _Judge:
        config = _config(instance)
        dataset = load_env_dataset(config)
        counts, dim, unit = dataset.class_weights, dataset.dim, huffman_cost(dataset)
        scorer = LocalEvaluator(dataset, config.train)
        if isinstance(instance, str):  # the product's classic front
            classics = {name: (c.tree, c.projections) for name, c in dataset_classics(dataset, "front").items()}
        else:
            classics = {k: (huffman(counts, k), {}) for k in (2, 3, 4, 8, 16)}
        scores = {k: scorer.evaluate(*t).valid_nll for k, t in classics.items()}
        costs = {k: head_cost(t[0], counts, dim, t[1]) / unit for k, t in classics.items()}
        demonstrations = expert_demonstrations(config, CAPS, budget, classics=show_classics)
        return cls(_name(instance), config, scorer, demonstrations, scores, costs)

    def demonstration(self, cap: float):
        """dp's demonstration at ``cap``, or None (each one's cap is its observation's last feature, log2(cap) / 4)."""
        return next((d for d in self.demonstrations if abs(_cap_of(d) - cap) < 1e-6), None)

    def expert_nll(self, cap: float) -> float:
        """Validation NLL of dp's tree at ``cap`` (NaN when dp found none)."""
        demo = self.demonstration(cap)
        return self.scorer.evaluate(demo.tree, demo.projections).valid_nll if demo is not None else float("nan")

    def adopt(self, demonstrations: list) -> int:
        """Keep, per cap, the better (validation NLL) of the current and the new demonstration; how many changed."""
        changed = 0
        for new in demonstrations:
            cap, old = _cap_of(new), self.demonstration(_cap_of(new))
            if old is None or self.scorer.evaluate(new.tree, new.projections).valid_nll < self.expert_nll(cap) - 1e-9:
                self.demonstrations = [d for d in self.demonstrations if d is not old] + [new]
                changed += 1
        return changed

    def best_classic(self, cap: float) -> tuple[str | None, float]:
        within = [k for k, c in self.classic_costs.items() if c <= cap * (1 + 1e-9)]
        best = min(within, key=self.classic_scores.get, default=None)
        return best, (self.classic_scores[best] if best is not None else float("nan"))

    def instance(self, cap: float) -> Instance:
        """This instance at ``cap`` for PPO (`tree_search.agents.policy_improvement`)."""
        return Instance(self.name, dataclasses.replace(self.config, cost_cap=cap), self.expert_nll(cap),
                        self.best_classic(cap)[1])  # fmt: skip

    def judge(self, module, cap: float) -> dict:
        """The policy's proposal at ``cap``, scored on validation against dp's and the best classic tree's."""
        at_cap = dataclasses.replace(self.config, cost_cap=cap)
        t0 = time.perf_counter()
        tree, projections, _ = propose(module, at_cap)
        seconds = time.perf_counter() - t0
        dataset = self.scorer.dataset
        proposal = self.scorer.evaluate(tree, projections)
        dp_nll = self.expert_nll(cap)
        best_classic, classic = self.best_classic(cap)
        cost = head_cost(tree, dataset.class_weights, dataset.dim, projections) / huffman_cost(dataset)
        margin = classic - dp_nll
        regret = (proposal.valid_nll - dp_nll) / margin if margin > 0 else float("nan")
        return {"instance": self.name, "cap": cap, "proposal_nll": proposal.valid_nll, "proposal_cost": cost,
                "over_cap": cost > cap * (1 + 1e-9), "dp_nll": dp_nll, "classic_nll": classic,
                "classic": str(best_classic), "propose_seconds": seconds, "regret_share": regret}  # fmt: skip


def _cap_of(demonstration) -> float:
    return round(2 ** (4 * float(demonstration.observations[0, -1])), 6)


def _median_regret(rows: list[dict]) -> float:
    shares = [r["regret_share"] for r in rows if not r["over_cap"] and np.isfinite(r["regret_share"])]
    return float(np.median(shares)) if shares else float("nan")


def _beats_classic(rows: list[dict]) -> int:
    """Instance-caps whose proposal is within the cap and better than the best classic tree within it."""
    return sum(not r["over_cap"] and r["proposal_nll"] < r["classic_nll"] for r in rows)


def _learning_curve_png(curve: list[dict], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=130)
    rounds = [c["round"] for c in curve]
    left.plot(rounds, [100 * c["held_out_median_regret"] for c in curve], "o-", label="held out")
    left.plot(rounds, [100 * c["train_median_regret"] for c in curve], "s--", label="training instances")
    left.axhline(0, color="grey", lw=0.8)
    left.axhline(100, color="grey", lw=0.8, ls=":")
    left.set_title("median regret (% of dp's margin over the classic tree)", fontsize=10)
    left.set_ylabel("%")
    left.legend()
    total = len(curve[0]["held_out"])
    right.plot(rounds, [_beats_classic(c["held_out"]) for c in curve], "o-", color="C2")
    right.set_ylim(0, total + 0.5)
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_title(f"held-out instance-caps (of {total}) beating the best classic tree", fontsize=10)
    right.set_ylabel("instance-caps")
    for ax in (left, right):
        ax.set_xticks(rounds)
        ax.set_xlabel(f"{what} round (0: the behaviour-cloned policy)")
    fig.suptitle(f"Zero-search proposals, {what} rounds (validation NLL)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=16, help="dp's evaluations per cap")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-policy"))
    parser.add_argument("--real", action="store_true", help="also the real corpora (prepared under their names)")
    parser.add_argument("--ship", action="store_true", help=f"write the policy to {SHIPPED_POLICY}")
    parser.add_argument(
        "--real-train",
        default=",".join(REAL_TRAIN),
        help="with --real: the real training corpora (comma-separated names; default all seven)",
    )
    parser.add_argument(
        "--ppo-rounds",
        type=int,
        default=0,
        help="then fine-tune the clone with PPO for this many rounds (measured after each)",
    )
    parser.add_argument("--ppo-iterations", type=int, default=4, help="PPO iterations per round")
    parser.add_argument("--ppo-real", action="store_true", help="PPO also on the real training corpora (slow)")
    parser.add_argument(
        "--show-classics",
        action="store_true",
        help="the expert demonstrates the best of dp's plan and the grammar's classic trees",
    )
    parser.add_argument(
        "--expert-rounds",
        type=int,
        default=0,
        help="expert iteration: rounds of dp guided by the policy, then cloning on the better plans",
    )
    args = parser.parse_args()
    train, held_out = list(TRAIN), list(HELD_OUT)
    if args.real:
        train, held_out = [*train, *args.real_train.split(",")], [*held_out, *REAL_HELD_OUT]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    judges = []
    for instance in train:
        judges.append(_Judge.build(instance, args.budget, show_classics=args.show_classics))
        demos = judges[-1].demonstrations
        print(f"[{time.time() - start:6.0f}s] train {_name(instance)}: {len(demos)} demonstrations", flush=True)
    demonstrations = [d for j in judges for d in j.demonstrations]
    module = clone_policy(demonstrations)
    names = [_name(p) for p in train]
    save_policy(module, args.out / "policy.pt", _config(TRAIN[0]), instances=names)
    if args.ship:
        save_policy(module, SHIPPED_POLICY, _config(TRAIN[0]), instances=names)
        print(f"shipped: {SHIPPED_POLICY}", flush=True)
    decisions = sum(d.actions.size for d in demonstrations)
    print(f"cloned on {len(demonstrations)} episodes, {decisions} decisions", flush=True)
    held_out_judges = [_Judge.build(instance, args.budget) for instance in held_out]
    rows = [judge.judge(module, cap) for judge in held_out_judges for cap in CAPS]
    for r in rows:
        print(f"[{time.time() - start:6.0f}s] {r['instance']} cap {r['cap']:g}x: proposal {r['proposal_nll']:.4f} "
              f"({r['proposal_cost']:.2f}x{', over the cap' if r['over_cap'] else ''}, "
              f"{r['propose_seconds'] * 1e3:.0f} ms), dp {r['dp_nll']:.4f}, best classic within the cap "
              f"{r['classic_nll']:.4f} ({r['classic']}), regret {r['regret_share']:.0%} of dp's margin",
              flush=True)  # fmt: skip
    print(f"held out: {len(rows)} instance-caps, {sum(r['over_cap'] for r in rows)} proposals over the cap; median "
          f"regret of the others {_median_regret(rows):.0%} of dp's margin over the best classic tree")  # fmt: skip
    (args.out / "bench_policy.json").write_text(json.dumps(rows, indent=1))
    if args.expert_rounds > 0:
        _expert_iteration(module, judges, held_out_judges, args, start)
    if args.ppo_rounds > 0:
        _fine_tune(module, judges, held_out_judges, args, start)


def _round_entry(round_: int, module, judges: list[_Judge], held_out_judges: list[_Judge], **stats) -> dict:
    held = [judge.judge(module, cap) for judge in held_out_judges for cap in CAPS]
    trained_on = [judge.judge(module, cap) for judge in judges for cap in CAPS]
    return {"round": round_, **stats, "held_out_median_regret": _median_regret(held),
            "held_out_over_cap": sum(r["over_cap"] for r in held), "train_median_regret": _median_regret(trained_on),
            "train_over_cap": sum(r["over_cap"] for r in trained_on), "held_out_beats_classic": _beats_classic(held),
            "held_out_mean_gap_to_dp": float(np.mean([r["proposal_nll"] - r["dp_nll"] for r in held])),
            "held_out": held}  # fmt: skip


def _summary(c: dict) -> str:
    return (f"held out: median regret {c['held_out_median_regret']:.0%}, {c['held_out_beats_classic']} of "
            f"{len(c['held_out'])} beat the best classic tree, mean gap to dp {c['held_out_mean_gap_to_dp']:+.4f}, "
            f"{c['held_out_over_cap']} over the cap; training instances: median regret "
            f"{c['train_median_regret']:.0%}, {c['train_over_cap']} over the cap")  # fmt: skip


def _expert_iteration(module, judges: list[_Judge], held_out_judges: list[_Judge], args, start: float) -> None:
    """Rounds of dp guided by the current policy (its prior) on the training instances; per cap the better plan
    (validation) becomes the target, and the policy is cloned anew on the targets. Judged after each round.

    The training judges are copied: their targets change here, PPO's rewards keep dp's own plans as reference."""
    judges = [dataclasses.replace(judge) for judge in judges]
    curve = [_round_entry(0, module, judges, held_out_judges, improved=0)]
    print(f"[{time.time() - start:6.0f}s] expert iteration round 0: {_summary(curve[0])}", flush=True)
    for round_ in range(1, args.expert_rounds + 1):
        improved = sum(judge.adopt(expert_demonstrations(judge.config, CAPS, args.budget, prior=module,
                                                         classics=args.show_classics))
                       for judge in judges)  # fmt: skip
        module = clone_policy([d for j in judges for d in j.demonstrations])
        curve.append(_round_entry(round_, module, judges, held_out_judges, improved=improved))
        c = curve[-1]
        print(f"[{time.time() - start:6.0f}s] expert iteration round {round_}: {improved} of the training "
              f"instance-caps got a better plan from dp guided by the policy; {_summary(c)}", flush=True)  # fmt: skip
        (args.out / "bench_policy_expert_iteration.json").write_text(json.dumps(curve, indent=1))
    save_policy(module, args.out / "policy_expert_iteration.pt", _config(TRAIN[0]), instances=[j.name for j in judges])
    _learning_curve_png(curve, args.out / "bench_policy_expert_iteration.png", "expert-iteration")


def _fine_tune(module, judges: list[_Judge], held_out_judges: list[_Judge], args, start: float) -> None:
    """PPO from the clone on the training instances (planted, and real with --ppo-real), judged after each round."""
    rl_judges = [j for j in judges if args.ppo_real or j.config.dataset == "planted"]
    instances = [j.instance(cap) for j in rl_judges for cap in CAPS]
    instances = [i for i in instances if np.isfinite(i.expert_nll) and np.isfinite(i.classic_nll)]
    curve = []

    def measure(round_: int, stats: dict) -> None:
        curve.append(_round_entry(round_, module, rl_judges, held_out_judges, **stats))
        c = curve[-1]
        print(f"[{time.time() - start:6.0f}s] PPO round {round_}: mean episode reward {stats['reward']:+.3f} "
              f"({stats['episodes']} episodes, {stats['nodes_trained']:,} node trainings so far); {_summary(c)}",
              flush=True)  # fmt: skip
        (args.out / "bench_policy_ppo.json").write_text(json.dumps(curve, indent=1))

    improve_policy(module, instances, rounds=args.ppo_rounds, iterations=args.ppo_iterations, on_round=measure)
    save_policy(module, args.out / "policy_ppo.pt", _config(TRAIN[0]), instances=[j.name for j in rl_judges])
    _learning_curve_png(curve, args.out / "bench_policy_ppo.png", "PPO")
    print(f"learning curve: {args.out / 'bench_policy_ppo.png'}", flush=True)


if __name__ == "__main__":
    main()
