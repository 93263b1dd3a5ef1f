"""End-to-end validity of a front search's verdicts: each finalist's head trained together with the encoder.

Every reward and verdict of tree_search trains heads on the frozen features of a context
encoder; users train their encoder and head together. This benchmark takes a finished front
search (a run folder with its report's ``comparison.json``) and, for every finalist of the
report (the searched tree of each cap, the classic trees scored on test, the full softmax),
trains the context encoder (`tree_search.data.features.ContextEncoder`, the architecture,
optimiser, schedule and step budget that made the run's features) **from scratch together
with the tree's head** (`TreeSoftmaxHead`, dense gradients), for several seeds. It scores
each on the same test positions (a seeded sample of the corpus's test split) and prints:

- each tree's end-to-end test NLL (mean over seeds) beside its frozen-feature test NLL,
  and its training time per step;
- the Spearman rank correlation between the two over all finalists;
- for each cap of the report, the searched tree against the best classic tree within the
  cap, end to end: the difference with its paired 95% bootstrap interval over test documents
  and seeds (`tree_search.search.verdicts.FinalScores`), and whether the verdict keeps its sign.

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
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from tree_search.builders import frequency_cutoffs
from tree_search.data.cache import cache_root
from tree_search.data.corpus import TokenCorpus, cached_corpus
from tree_search.data.features import ContextEncoder, EncoderConfig
from tree_search.envs import TreeEnvConfig, load_env_dataset
from tree_search.heads import TreeSoftmaxHead
from tree_search.reward import trained_head
from tree_search.search.runs import Run
from tree_search.search.verdicts import Comparison, FinalScores, verdict_words


def _corpus(dataset) -> TokenCorpus:
    folder = Path(dataset.info["corpus"]["cache"])

    def missing() -> TokenCorpus:
        raise SystemExit(f"the run's corpus is no longer cached at {folder}: prepare the dataset again")

    return cached_corpus(folder, True, missing)


def _windows(ids: torch.Tensor, context: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([torch.full((context,), pad, dtype=torch.int64), ids]), torch.arange(context)


def train_and_score(tree, projections, corpus: TokenCorpus, config: EncoderConfig, seed: int, test: np.ndarray,
                    steps: int, start: tuple[dict, TreeSoftmaxHead] | None = None,
                    lr_scale: float = 1.0) -> tuple[np.ndarray, float]:  # fmt: skip
    """Train encoder + head (from scratch, or from ``start``: encoder weights and a head); return the test positions'
    NLL (N,) and the median seconds per step."""
    V = len(corpus.vocab)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = ContextEncoder(V, config)
    if start is None:
        head = TreeSoftmaxHead(tree, config.dim, projections=projections or None)
    else:
        encoder.load_state_dict(start[0])
        head = copy.deepcopy(start[1]).train()
    params = [*encoder.embed.parameters(), *encoder.mlp.parameters(), *head.parameters()]  # not the encoder's `out`
    optimizer = torch.optim.AdamW(params, lr=config.lr * lr_scale, weight_decay=config.weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # the encoder's own (`features._train_encoder`)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_ids = torch.from_numpy(np.asarray(corpus.splits["train"], dtype=np.int64))
    padded, offsets = _windows(train_ids, config.context, V)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        positions = torch.randint(0, train_ids.numel(), (config.batch_size,), generator=generator)
        loss = head(encoder.features(padded[positions[:, None] + offsets]), train_ids[positions]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - started)
    test_ids = torch.from_numpy(np.asarray(corpus.splits["test"], dtype=np.int64))
    padded, offsets = _windows(test_ids, config.context, V)
    out = np.empty(test.size)
    encoder.eval(), head.eval()
    with torch.no_grad():
        for lo in range(0, test.size, 8192):
            at = torch.from_numpy(test[lo : lo + 8192])
            out[lo : lo + at.numel()] = -head.log_prob(encoder.features(padded[at[:, None] + offsets]), test_ids[at])
    return out, statistics.median(times[len(times) // 10 :])


def _chosen(comparison: dict, count: int) -> list[dict]:
    """The finalists to train: those the verdicts name first, then the rest by frozen test NLL, ``count`` in all."""
    rows = comparison["rows"]
    if count <= 0 or count >= len(rows):
        return rows
    names = {cap[side]["name"] for cap in comparison.get("caps", []) for side in ("classic", "searched") if cap[side]}
    first = [r for r in rows if r["kind"] == "searched" or r["name"] in names or r["key"] == "full"
             or r["name"] == "huffman-2" or r["name"].startswith(("adaptive", "grave"))]  # fmt: skip
    rest = [r for r in sorted(rows, key=lambda r: r["test_nll"]) if r not in first]
    return (first + rest)[: max(count, len(first))]


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
    run = Run(args.run)
    comparison = json.loads((args.run / "comparison.json").read_text())
    dataset = load_env_dataset(TreeEnvConfig.from_env_config(run.config["env_config"]))
    corpus = _corpus(dataset)
    config = EncoderConfig(**dataset.info["encoder"])
    steps = args.warm or args.steps or config.steps
    warm_encoder = None
    if args.warm:
        warm_encoder = torch.load(cache_root() / "features" / dataset.key / "encoder.pt", map_location="cpu")
        recipe = TreeEnvConfig.from_env_config(run.config["env_config"]).train
    n = len(corpus.splits["test"])
    test = np.sort(np.random.default_rng(0).choice(n, size=min(args.positions, n), replace=False))
    documents = np.searchsorted(np.asarray(corpus.documents["test"]), test, side="right") - 1
    projections = {e.key: e.projections for e in run.evaluations()}
    rows = _chosen(comparison, args.trees)
    started = time.perf_counter()
    losses, step_seconds = {}, {}
    for index, row in enumerate(rows, start=1):
        if row["key"] == "full":
            tree, projected = frequency_cutoffs(dataset.class_weights, []), {}
        else:
            tree, projected = run.tree(row["key"]), projections.get(row["key"], {})
        per_seed, seconds = [], []
        start = None
        if warm_encoder is not None:
            head = trained_head(tree, dataset, recipe, projections=projected or None, device="cpu")
            start = (warm_encoder, head)
        for seed in range(args.seeds):
            nll, per_step = train_and_score(tree, projected, corpus, config, seed, test, steps, start, args.warm_lr)
            per_seed.append(nll)
            seconds.append(per_step)
            elapsed = time.perf_counter() - started
            done = (index - 1) * args.seeds + seed + 1
            left = elapsed / done * (len(rows) * args.seeds - done)
            print(f"  {row['name']:<20s} seed {seed + 1}/{args.seeds}: test NLL {nll.mean():.4f}, "
                  f"{per_step * 1e3:.1f} ms/step  ({elapsed / 60:.1f} min, about {left / 60:.1f} min left)",
                  flush=True)  # fmt: skip
        losses[row["key"]], step_seconds[row["key"]] = per_seed, statistics.median(seconds)
    scores = FinalScores.from_rows(losses, documents)
    print(f"\n{run.folder}: V = {dataset.num_classes:,}, {steps} steps of batch {config.batch_size}, "
          f"{args.seeds} seeds, {test.size:,} test positions in {scores.num_documents} documents\n")  # fmt: skip
    print(f"{'tree':<20s} {'kind':<10s} {'frozen test':>11s} {'end to end':>10s} {'±':>7s} {'ms/step':>8s}")
    table = []
    for row in sorted(rows, key=lambda r: scores.nll(r["key"])):
        e2e = scores.nll(row["key"])
        table.append({"name": row["name"], "kind": row["kind"], "frozen_test_nll": row["test_nll"],
                      "end_to_end_test_nll": e2e, "end_to_end_stderr": scores.stderr(row["key"]),
                      "ms_per_step": step_seconds[row["key"]] * 1e3})  # fmt: skip
        print(f"{row['name']:<20s} {row['kind']:<10s} {row['test_nll']:>11.4f} {e2e:>10.4f} "
              f"{scores.stderr(row['key']):>7.4f} {step_seconds[row['key']] * 1e3:>8.1f}")  # fmt: skip
    rho = float(spearmanr([t["frozen_test_nll"] for t in table], [t["end_to_end_test_nll"] for t in table])[0])
    print(f"\nSpearman rank correlation, frozen against end to end, over {len(table)} trees: {rho:.3f}\n")
    caps = []
    for cap in comparison.get("caps", []):
        classic, searched = cap.get("classic"), cap.get("searched")
        if not classic or not searched:
            continue
        found = scores.compare(searched["key"], classic["key"])
        kept = math.copysign(1, found.difference) == math.copysign(1, cap["difference"])
        caps.append({"cap": cap["cap"], "classic": classic["name"], "searched": searched["name"],
                     "frozen_difference": cap["difference"], "frozen_interval": cap["interval"],
                     **found.to_json(), "sign_kept": kept})  # fmt: skip
        frozen = verdict_words(type(found)(cap["difference"], *cap["interval"]))
        print(f"{cap['cap']:g}x: {searched['name']} against {classic['name']}: frozen {cap['difference']:+.4f} "
              f"({frozen}), end to end {found.difference:+.4f} [{found.low:+.4f}, {found.high:+.4f}] "
              f"({verdict_words(found)}); sign {'kept' if kept else 'flipped'}")  # fmt: skip
    summary = {
        "steps": steps,
        "seeds": args.seeds,
        "positions": int(test.size),
        "documents": scores.num_documents,
        "spearman": rho,
        "trees": table,
        "caps": caps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.warm:
        summary.update(warm=args.warm, warm_lr=args.warm_lr, against_scratch=_against_scratch(args.run, table, caps))
    out = args.run / (f"end_to_end_warm{args.warm}.json" if args.warm else "end_to_end.json")
    out.write_text(json.dumps(summary, indent=1))
    print(f"\n{out} ({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
