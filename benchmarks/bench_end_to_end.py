"""End-to-end validity of a front search's verdicts: each finalist's head trained together with the encoder.

Every reward and verdict of tree_search trains heads on the frozen features of a context
encoder; users train their encoder and head together. From scratch, this is the product's
`tree-search end-to-end RUN` (`tree_search.search.end_to_end`) with more finalists by default
(--trees 12: the verdicts' trees, binary Huffman, the full softmax, the searched trees and
adaptive shapes, then the others by frozen test NLL): the run's encoder architecture trained
from scratch with each tree's head for several seeds, scored on the same test positions,
with each tree's frozen and end-to-end test NLL, the Spearman rank correlation of the two,
and each cap's verdict end to end (paired bootstrap over test documents and seeds).

    python benchmarks/bench_end_to_end.py RUN_FOLDER [--seeds 3] [--steps STEPS] [--positions 50000]

It writes ``end_to_end.json`` into the run folder.

``--warm STEPS`` asks whether a cheaper final scoring predicts the end-to-end result: each
finalist starts from the run's own encoder (the one that made the frozen features) and its
head from the trained nodes (the search's recipe, through the node bank), and both are
trained together for STEPS steps at ``--warm-lr`` times the encoder's learning rate. It
writes ``end_to_end_warmSTEPS.json`` and, when ``end_to_end.json`` exists, compares its
verdicts and order with the from-scratch ones. Timings are of this machine, 2 threads
by default. The run's corpus must still be in the cache (``data prepare`` made it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from tree_search.data.cache import cache_root
from tree_search.data.features import EncoderConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads.joint import train_and_score
from tree_search.reward import trained_head
from tree_search.search.end_to_end import (
    END_TO_END_FILE,
    EndToEndConfig,
    chosen_finalists,
    end_to_end_lines,
    end_to_end_verdicts,
    finalist_tree,
    summarise,
    test_positions,
    token_corpus,
)
from tree_search.search.runs import Run
from tree_search.search.verdicts import Comparison, verdict_words


def _against_scratch(folder: Path, table: list[dict], caps: list[dict]) -> dict | None:
    """How a warm-started scoring agrees with the from-scratch one (``end_to_end.json``): order and verdicts."""
    path = folder / "end_to_end.json"
    if not path.exists():
        print("no end_to_end.json in the run: nothing to compare the warm start with")
        return None
    scratch = json.loads(path.read_text())
    e2e = {t["name"]: t["end_to_end_test_nll"] for t in scratch["trees"]}
    shared = [t for t in table if t["name"] in e2e]
    rho = float(spearmanr([t["end_to_end_test_nll"] for t in shared], [e2e[t["name"]] for t in shared])[0])
    frozen = float(spearmanr([t["frozen_test_nll"] for t in shared], [e2e[t["name"]] for t in shared])[0])
    print(f"\nagainst the from-scratch end-to-end NLL over {len(shared)} trees: Spearman {rho:.3f} "
          f"(frozen features: {frozen:.3f})")  # fmt: skip
    words = lambda found: verdict_words(Comparison(found["difference"], *found["interval"]))  # noqa: E731
    agree = []
    for cap in caps:
        other = next((c for c in scratch["caps"] if c["cap"] == cap["cap"]), None)
        if other is None:
            continue
        same = words(cap) == words(other)
        agree.append({"cap": cap["cap"], "warm": words(cap), "scratch": words(other), "frozen_difference":
                      cap["frozen_difference"], "warm_difference": cap["difference"],
                      "scratch_difference": other["difference"], "same_verdict": same})  # fmt: skip
        print(f"{cap['cap']:g}x: warm {cap['difference']:+.4f} ({words(cap)}), from scratch "
              f"{other['difference']:+.4f} ({words(other)}), frozen {cap['frozen_difference']:+.4f}: "
              f"{'same verdict' if same else 'different verdict'}")  # fmt: skip
    return {"spearman_warm_vs_scratch": rho, "spearman_frozen_vs_scratch": frozen, "caps": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the encoder's own (the run's features)")
    parser.add_argument("--positions", type=int, default=50_000, help="test positions scored (a seeded sample)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm", type=int, default=0,
                        help="STEPS: start from the run's encoder and each tree's trained nodes, train both together "
                             "for STEPS steps (0: from scratch)")  # fmt: skip
    parser.add_argument("--warm-lr", type=float, default=0.3, help="--warm: times the encoder's learning rate")
    parser.add_argument("--trees", type=int, default=12,
                        help="how many finalists: the searched tree and the best classic tree of each cap, the "
                             "adaptive shapes, binary Huffman and the full softmax first, then the other classic "
                             "trees by test NLL (0: all)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.warm:
        config = EndToEndConfig(seeds=args.seeds, steps=args.steps, positions=args.positions, trees=args.trees)
        summary = end_to_end_verdicts(args.run, config, progress=lambda line: print(line, flush=True))
        print("\n".join(end_to_end_lines(summary)))
        print(f"{args.run / END_TO_END_FILE} ({summary['seconds'] / 60:.1f} min)")
        return
    run = Run(args.run)
    comparison = json.loads((args.run / "comparison.json").read_text())
    dataset = load_env_dataset(TreeEnvConfig.from_env_config(run.config["env_config"]))
    corpus = token_corpus(dataset)
    config = EncoderConfig(**dataset.info["encoder"])
    steps = args.warm
    warm_encoder = torch.load(cache_root() / "features" / dataset.key / "encoder.pt", map_location="cpu")
    recipe = TreeEnvConfig.from_env_config(run.config["env_config"]).train
    test, documents = test_positions(corpus, args.positions)
    projections = {e.key: e.projections for e in run.evaluations()}
    rows = chosen_finalists(comparison, args.trees)
    started = time.perf_counter()
    losses, step_seconds = {}, {}
    for index, row in enumerate(rows, start=1):
        tree, projected = finalist_tree(run, row, dataset.class_weights, projections)
        per_seed, seconds = [], []
        head = trained_head(tree, dataset, recipe, projections=projected or None, device="cpu")
        for seed in range(args.seeds):
            nll, per_step = train_and_score(tree, projected, corpus, config, seed, test, steps, (warm_encoder, head),
                                            args.warm_lr)  # fmt: skip
            per_seed.append(nll)
            seconds.append(per_step)
            elapsed = time.perf_counter() - started
            done = (index - 1) * args.seeds + seed + 1
            left = elapsed / done * (len(rows) * args.seeds - done)
            print(f"  {row['name']:<20s} seed {seed + 1}/{args.seeds}: test NLL {nll.mean():.4f}, "
                  f"{per_step * 1e3:.1f} ms/step  ({elapsed / 60:.1f} min, about {left / 60:.1f} min left)",
                  flush=True)  # fmt: skip
        losses[row["key"]], step_seconds[row["key"]] = per_seed, statistics.median(seconds)
    summary = {"steps": steps, "seeds": args.seeds, "positions": int(test.size),
               **summarise(comparison, rows, losses, step_seconds, documents),
               "seconds": round(time.perf_counter() - started, 1), "warm": args.warm,
               "warm_lr": args.warm_lr}  # fmt: skip
    print(f"\n{run.folder}: V = {dataset.num_classes:,}, warm start, {steps} steps of batch {config.batch_size}, "
          f"{args.seeds} seeds, {test.size:,} test positions in {summary['documents']} documents\n")  # fmt: skip
    print(f"{'tree':<20s} {'kind':<10s} {'frozen test':>11s} {'warm':>10s} {'±':>7s} {'ms/step':>8s}")
    for t in summary["trees"]:
        print(f"{t['name']:<20s} {t['kind']:<10s} {t['frozen_test_nll']:>11.4f} {t['end_to_end_test_nll']:>10.4f} "
              f"{t['end_to_end_stderr']:>7.4f} {t['ms_per_step']:>8.1f}")  # fmt: skip
    print(f"\nSpearman rank correlation, frozen against warm, over {len(summary['trees'])} trees: "
          f"{summary['spearman']:.3f}\n")  # fmt: skip
    for cap in summary["caps"]:
        low, high = cap["interval"]
        print(f"{cap['cap']:g}x: {cap['searched']} against {cap['classic']}: frozen {cap['frozen_difference']:+.4f} "
              f"({cap['frozen_verdict']}), warm {cap['difference']:+.4f} [{low:+.4f}, {high:+.4f}] "
              f"({cap['verdict']})")  # fmt: skip
    summary["against_scratch"] = _against_scratch(args.run, summary["trees"], summary["caps"])
    out = args.run / f"end_to_end_warm{args.warm}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\n{out} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
