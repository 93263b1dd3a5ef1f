"""`run_search`: one run = the classic baselines plus one searcher, written to a run folder as results arrive."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from tree_search.agents.base import Searcher
from tree_search.agents.baselines import BaselineSearcher, split_baselines
from tree_search.agents.dp_search import DPCaches, DPSearcher
from tree_search.agents.optuna_search import OPTUNA_SAMPLERS, OptunaSearcher
from tree_search.cost import head_cost, parse_cost_spec
from tree_search.data.corpus import ProgressFactory
from tree_search.data.features import FeatureDataset, default_device
from tree_search.envs import load_env_dataset, make_env
from tree_search.heads.timing import resolve_cost
from tree_search.reward.blas import one_blas_thread
from tree_search.reward.decode_cap import decode_cap_for
from tree_search.reward.evaluator import Evaluation, Evaluator, LocalEvaluator
from tree_search.reward.reward import full_softmax_cost, huffman_cost
from tree_search.search.config import EXECUTION_FIELDS, SearchConfig
from tree_search.search.runs import SELECTION_FREE, WRITER_LOCK, Run, RunError, hold_run
from tree_search.tree import Tree

__all__ = ["make_searcher", "run_search"]


def make_searcher(
    config: SearchConfig,
    evaluator: Evaluator,
    run: Run,
    dataset: FeatureDataset,
    label: str | None = None,
    dp_caches: DPCaches | None = None,
) -> Searcher:
    """The searcher named by ``config.agent``, its environments scoring through ``evaluator``.

    ``label`` names its evaluations (default: the agent), e.g. ``tpe@2x`` in a front search;
    ``dp_caches``: what the dp searchers of a run's caps share.
    """
    searcher = _make_searcher(config, evaluator, run, dataset, label or config.agent, dp_caches)
    searcher.label = label or config.agent
    return searcher


def _make_searcher(
    config: SearchConfig, evaluator: Evaluator, run: Run, dataset: FeatureDataset, label: str,
    dp_caches: DPCaches | None = None,
) -> Searcher:  # fmt: skip
    env_config = {"env": config.env, **config.env_config.to_env_config()}
    if config.agent in OPTUNA_SAMPLERS:  # a trial is scored by its episode's total: per-step rewards would only cost
        env_config["reward_mode"] = "terminal"

    def env_factory(reward_fn):
        return make_env(env_config, dataset=dataset, reward_fn=reward_fn)

    if config.agent == "dp":  # (SearchConfig has checked its environment and cost rule)
        prior = None
        if config.prior:
            from tree_search.agents.imitation import PolicyPrior, load_policy, shipped_policy

            module = load_policy(config.policy_file or shipped_policy(), config.env_config, dataset)
            prior = PolicyPrior(module, config.env_config, dataset)
        return DPSearcher(evaluator, dataset, config.env_config, seconds=config.seconds, seed=config.seed,
                          caches=dp_caches, prior=prior)  # fmt: skip
    if config.agent == "policy":
        from tree_search.agents.policy_search import PolicySearcher

        return PolicySearcher(evaluator, dataset, config.env_config, config.policy_file or None,
                              seconds=config.seconds, seed=config.seed)  # fmt: skip
    if config.agent == "jtm":
        from tree_search.agents.jtm_search import JTMSearcher

        return JTMSearcher(evaluator, dataset, config.env_config, seconds=config.seconds, seed=config.seed)
    if config.agent in OPTUNA_SAMPLERS:
        storage = config.storage or run.optuna_storage()
        return OptunaSearcher(
            config.agent,
            env_factory,
            evaluator,
            storage=storage,
            # one study per cap: a study's values carry its cap's penalties
            study_name=(f"{config.study}-{label}" if label != config.agent else config.study)
            if config.study
            else f"{label}-{config.env}",
            prune=config.prune,  # with Ray actors too: their measurements come back to this process's pruner
            # Trials at once only with a thread-safe pool of workers; in process they would only contend.
            parallel=(config.parallel or config.eval_workers or 1) if config.uses_ray else 1,
            owner=str(run.folder.resolve()),
            seconds=config.seconds,
            seed=config.seed,
            # a study other processes may share is not seeded: they would race for its enqueued trials
            seed_classics=config.seed_classics and config.study is None and config.storage is None,
        )
    from tree_search.agents.rllib_search import RLlibSearcher  # Ray is imported only when needed

    return RLlibSearcher(
        config.agent,
        env_factory,
        evaluator,
        run=run,
        policy=config.policy,
        seconds=config.seconds,
        seed=config.seed,
        ray_address=config.ray_address,
        env_runners=config.env_runners,
        env_config=env_config,
        dataset=dataset,
        seed_classics=config.seed_classics,
    )


def run_search(
    config: SearchConfig,
    out: str | Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] | None = print,
    progress: ProgressFactory | None = None,
) -> Run:
    """Evaluate the baselines, then search until the budget is used; every result is on disk as it arrives.

    Returns the `Run`. Interrupting (Ctrl-C) loses nothing: resume with ``resume=True``. A new
    run that fails (or is interrupted) before its first evaluation leaves no run folder behind:
    what it created is removed, so nothing that is not a run looks like one. ``progress``: a
    bar for the classic front and one for each cap's search (counted evaluations).
    """
    folder = Path(out)
    existed = folder.exists()
    if resume and not (folder / "config.json").exists():
        raise RunError(f"{folder / 'config.json'}: nothing to resume (no config.json)")
    folder.mkdir(parents=True, exist_ok=True)
    with hold_run(folder):  # one process writes a run: a second resume of it stops here
        try:
            run = Run.create(folder, config.to_json(), resume=resume, may_differ=EXECUTION_FIELDS)
        except RunError:
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)  # made here only to be refused
            raise
        try:
            with one_blas_thread():  # its idle threads would slow node training
                return _search(config, run, log, progress)
        except BaseException:
            if not resume and not run.evaluations():
                _remove_new_run(run.folder, existed)
            raise


def _remove_new_run(folder: Path, existed: bool) -> None:
    """Remove what a new run created before it evaluated anything (the whole folder when it made it)."""
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in ("config.json", "leaderboard.jsonl", Run.COST_PROFILE, Run.CHARGES, SELECTION_FREE, "evaluator.json",
                 Run.OPTUNA_JOURNAL, "optuna.db", Run.LIBRARY_LOG, WRITER_LOCK):  # fmt: skip
        (folder / name).unlink(missing_ok=True)
    for name in ("trees", "tb", "checkpoints"):
        shutil.rmtree(folder / name, ignore_errors=True)


def _search(config: SearchConfig, run: Run, log: Callable[[str], None] | None,
            progress_bar: ProgressFactory | None = None) -> Run:  # fmt: skip
    """`run_search` in a run folder already created (or opened to resume)."""
    dataset = load_env_dataset(config.env_config)
    cost_model = resolve_cost(run.cost_spec(config.env_config.cost), dim=dataset.dim,
                              device_type=default_device().type, dataset=dataset)  # fmt: skip
    if cost_model is not None:  # the run keeps the profile it searched with: its caps keep their meaning
        own = f"{parse_cost_spec(config.env_config.cost)[0]}:{run.folder / Run.COST_PROFILE}"
        if not (run.folder / Run.COST_PROFILE).exists():
            cost_model.save(run.folder / Run.COST_PROFILE)
        config = dataclasses.replace(config, env_config=config.env_config.with_updates(cost=own))
    run.labels, run.counts = dataset.vocab.tokens, dataset.counts  # every tree file says which class is which token
    best: dict[str, float] = {}

    decode_cap = config.env_config.decode_cap

    bar: dict[str, Callable[[int], None]] = {}  # the phase's bar: "front" (every baseline) or a cap's label

    def progress(evaluation: Evaluation, tree: Tree) -> None:
        group = evaluation.searcher.split(":")[0]
        phase = "front" if group == "baseline" else evaluation.searcher if evaluation.counted else ""
        if phase in bar:
            bar[phase](1)
        within = evaluation.cost_ratio <= caps.get(group, math.inf) * (1 + 1e-9)  # probes over it: no
        if evaluation.ok and within and evaluation.within_decode_cap(decode_cap):
            best[group] = min(best.get(group, math.inf), evaluation.valid_nll)
        if log is None:
            return
        what = "failed: " + str(evaluation.error) if evaluation.error else f"valid NLL {evaluation.valid_nll:.4f}"
        budget = f"{evaluator.used}/{total_budget}" if evaluation.counted else "extra"
        log(
            f"[{evaluation.index:3d}] {evaluation.searcher:<20s} {budget:>7s}  {what}"
            f"{' (pruned)' if evaluation.pruned else ''}  cost {100 * evaluation.cost_ratio:.3g}% of full"
            f"{f'  decoding {evaluation.decode_vs_huffman:.2f}x' if decode_cap else ''}"
            f"  best {best.get(group, math.inf):.4f}  {evaluation.train_seconds:.1f}s"
        )

    def counters(evaluation: Evaluation, tree: Tree) -> None:
        run.log_scalars("evaluator", evaluator.stats(), evaluation.index)

    listeners = [run.record, progress, counters]
    searches = config.searches()
    full_cost = full_softmax_cost(dataset, cost_model)
    huffman_ratio = huffman_cost(dataset, cost_model) / full_cost
    caps = {label: cap * huffman_ratio for label, cap in config.caps().items()}  # / full softmax
    run.cap_ratio = max(caps.values(), default=math.inf)  # best_tree.json: the best searched tree within a cap
    run.decode_cap = decode_cap
    total_budget = config.budget * len(searches)
    train, seeds = config.env_config.train, config.env_config.seeds
    if config.uses_ray:
        from tree_search.distributed.ray_evaluator import RayEvaluator

        evaluator = RayEvaluator(
            dataset,
            train,
            seeds,
            budget=total_budget,
            listeners=listeners,
            workers=max(1, config.eval_workers or config.env_runners),  # default: one per env runner
            cpus_per_eval=config.cpus_per_eval,
            gpus_per_eval=config.gpus_per_eval,
            address=config.ray_address,
            batch=config.eval_batch,
            node_bank=config.node_bank,
        )
    else:
        evaluator = LocalEvaluator(
            dataset, train, seeds, budget=total_budget, listeners=listeners, node_bank=config.node_bank
        )
    if cost_model is not None:  # the leaderboard's costs in the profile's time, as the environments' caps

        def measured(tree: Tree, projections: Mapping[int, int] | None) -> tuple[float, float]:
            cost = head_cost(tree, dataset.counts, dataset.dim, projections, cost_model)  # zero counts: uniform
            return cost, cost / full_cost

        evaluator.cost_fn = measured
    decoding = decode_cap_for(config.env_config.cost, decode_cap, dataset)  # the run's own profile, as the caps
    if decoding is not None:
        evaluator.decode_ratio_fn = decoding.ratio
    previous = run.evaluations()
    evaluator.preload(previous)
    evaluator.restore_charges(run.read_json(Run.CHARGES))
    evaluator.on_charge = lambda charges: run.write_json(Run.CHARGES, charges)
    if previous and log:
        log(
            f"resuming {run.folder}: {len(previous)} evaluations on disk, "
            f"{evaluator.used}/{total_budget} of the budget used"
        )
    searcher = None
    dp_caches = DPCaches() if config.agent == "dp" else None
    try:
        if dp_caches is not None:  # a cap below every tree dp can build is a mistake: say so before training anything
            label, lowest = min(searches, key=lambda item: item[1].env_config.cost_cap)
            classics = split_baselines(config.baselines, check_files=False)[0] if config.baselines != "none" else ()
            cheapest = make_searcher(lowest, evaluator, run, dataset, label, dp_caches).cheapest_ratio(classics)
            if cheapest > lowest.env_config.cost_cap * (1 + 1e-9):
                raise ValueError(f"cost cap {lowest.env_config.cost_cap:g}x: the cheapest tree dp can yield costs "
                                 f"{cheapest:.2f}x binary Huffman's (its grammar's trees, and the whole Huffman "
                                 f"trees among the baselines); give caps of at least {cheapest:.2f}")  # fmt: skip
        if config.agent == "policy":  # a policy file that cannot act here: said before anything trains
            make_searcher(searches[0][1], evaluator, run, dataset, searches[0][0])
        if config.baselines != "none" or config.taxonomy:
            if progress_bar is not None:
                named, files = split_baselines(config.baselines, check_files=False) if config.baselines != "none" \
                    else ((), ())  # fmt: skip
                bar["front"] = progress_bar("classic trees", len(named) + len(files) + bool(config.taxonomy))
            for _ in BaselineSearcher(evaluator, dataset, config.baselines, seed=config.seed, taxonomy=config.taxonomy,
                                      unknown=config.env_config.taxonomy_unknown, log=log).search():  # fmt: skip
                pass
        done_before = Counter(e.searcher for e in previous if e.counted)
        for number, (label, search) in enumerate(searches, start=1):
            # Each cap's search has its own budget (what a resumed run's cap has used and been charged counts). The
            # evaluator and the node bank are shared: a tree found under one cap is free for the others, unless
            # the caps are kept apart (`SearchConfig.share_caps`), when only the baselines are.
            evaluator.scope = None if config.share_caps else label
            left = config.budget - done_before[label] - evaluator.charged.get(label, 0.0)
            evaluator.budget = evaluator.used + math.fsum(evaluator.charged.values()) + max(0.0, left)
            if evaluator.exhausted:
                continue
            if log and len(searches) > 1:
                log(f"search {number}/{len(searches)}: {label}, cost cap {search.env_config.cost_cap:g}x binary "
                    f"Huffman, {evaluator.remaining} evaluations")  # fmt: skip
            if progress_bar is not None:
                bar.clear()
                bar[label] = progress_bar(f"search {label}", evaluator.remaining or 0)
            searcher = make_searcher(search, evaluator, run, dataset, label=label, dp_caches=dp_caches)
            for _ in searcher.search():
                pass
            estimate = searcher.selection_free_nll()
            if estimate is not None:  # the report shows it beside the searcher's own, optimistic, figure
                run.write_json(SELECTION_FREE, {**(run.read_json(SELECTION_FREE) or {}), label: estimate})
            if log and evaluator.charged.get(label):
                log(f"{label}: node losses its dense rewards revealed outside evaluations were charged "
                    f"{evaluator.charged[label]:.2f} evaluations of its budget")  # fmt: skip
            if log and not evaluator.exhausted:
                why = searcher.stop_reason or ("its time ran out, or no new tree within the cap came in as many "
                                               "tries as its searcher allows")  # fmt: skip
                log(f"{label}: stopped with {evaluator.remaining} of its budget unused ({why})")
    finally:
        stats = evaluator.stats()
        if config.uses_ray:
            stats["nodes"] = evaluator.nodes()
        relay = getattr(searcher, "relay", None)
        if relay is not None:  # where the remote environments ran, and how many rewards they asked for
            clients = sorted(relay.clients)
            stats["env_runners"] = {
                "processes": len(clients),
                "nodes": len({client.split(":")[0] for client in clients}),
                "rewards_served": relay.served,
                "episodes_truncated": relay.stopped,
            }
        previous_stats = run.read_json("evaluator.json") or {}
        sessions = [*previous_stats.get("sessions", []), stats]
        run.write_json("evaluator.json", {"sessions": sessions})
        evaluator.close()
        run.close()
    return run
