"""Commands on searches: ``search``, ``compare``, ``runs``, ``report``."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from tree_search.builders import UNKNOWN_MODES
from tree_search.cli.app import (
    COST_HELP,
    DATASET,
    DATASET_HELP,
    console,
    float_list,
    friendly_errors,
    library_logs,
    main,
    progress_bars,
)
from tree_search.data import CorpusConfig, name_dataset, prepare_dataset
from tree_search.data.planted import COMMAND_LINE_PLANTED
from tree_search.envs.config import REWARD_MODES, TreeEnvConfig
from tree_search.reward import NodeRecipe
from tree_search.search.config import AGENTS, RLLIB_AGENTS, SearchConfig
from tree_search.search.end_to_end import (
    END_TO_END_FILE,
    EndToEndConfig,
    current_summary,
    end_to_end_lines,
    end_to_end_verdicts,
)
from tree_search.search.final_training import AUTO_WORKERS_MAX
from tree_search.search.runs import Run

if TYPE_CHECKING:
    from tree_search.search.report import ComparisonReport


def _print_comparison(comparison: ComparisonReport, folder: Path) -> None:
    table = Table(title="Test split: mean over seeds ± standard error over test documents and seeds")
    for column in ("tree", "kind", "valid NLL", "test NLL", "±", "perplexity", "cost / full", "cost / Huffman"):
        table.add_column(column, justify="left" if column in ("tree", "kind") else "right")
    for row in comparison.rows:
        valid = "" if math.isnan(row["valid_nll"]) else f"{row['valid_nll']:.4f}"
        kind = row["kind"] + ("" if row["within_cap"] else " (over cap)")
        table.add_row(
            row["name"],
            kind,
            valid,
            f"{row['test_nll']:.4f}",
            f"{row['test_stderr']:.4f}",
            f"{row['perplexity']:.2f}",
            f"{row['cost_ratio']:.3%}",
            f"{row['cost_vs_huffman']:.2f}",
        )
    console.print(table)
    for line in [*comparison.verdicts, *comparison.cap_lines()]:  # a front search: a line per cap, with its interval
        console.print(line)
    from tree_search.search.report import ADAPTIVE_HEAD

    console.print(f"next, with this run ({folder}):")
    for label, text in _next_steps(folder, (folder / "best_head.pt").exists(), (folder / ADAPTIVE_HEAD).exists()):
        console.print(f"  {label:<24}{text}", markup=False, soft_wrap=True)


def _next_steps(folder: Path, head: bool, adaptive: bool) -> list[tuple[str, str]]:
    """What to do with a scored run: (what, the exact command or file for ``folder``)."""
    report = f"{folder / 'report.md'} (plots beside it); tables again: tree-search report {folder}"
    steps = [("read the report", report)]
    if (folder / "best_tree.json").exists():  # the best searched tree within a cap
        steps.append(("export the tree", f"tree-search export {folder} tree.npz  (word2vec-style codes; or tree.json, "
                                         "--to gensim --model MODEL, --to pecos DIR)"))  # fmt: skip
    if head:
        load = f"TreeSoftmaxHead.load({str(folder / 'best_head.pt')!r})"
        steps.append(("use the trained head", f"from tree_search.heads import TreeSoftmaxHead; head = {load}"))
    if adaptive:
        steps.append(("as torch's adaptive", f"tree-search export {folder} adaptive.pt --to torch-adaptive"))
    steps.append(("training curves", f"tensorboard --logdir {folder / 'tb'}"))
    if (folder / Run.LIBRARY_LOG).exists():
        steps.append(("other libraries' logs", str(folder / Run.LIBRARY_LOG)))
    return steps


@main.command()
@click.argument("root", type=click.Path(path_type=Path, file_okay=False), default="runs")
@friendly_errors
def runs(root: Path) -> None:
    """List the runs under ROOT (default: runs/), newest first, with how far each got and its verdicts."""
    from tree_search.search.runs import find_runs

    found = find_runs(root)
    if not found:
        console.print(f"no runs under {root} (a run folder holds config.json; start one with tree-search search)")
        return
    table = Table(title=f"Runs under {root}, newest first")
    for column in ("run", "status", "agent", "dataset", "evaluated", "best valid", "caps: verdict on test", "last"):
        table.add_column(column, justify="right" if column in ("evaluated", "best valid") else "left",
                         no_wrap=column != "caps: verdict on test")  # fmt: skip
    short = {"searched wins": "win", "classic wins": "loss", "tie": "tie"}
    for summary in found:
        if summary.verdicts:
            caps = ", ".join(f"{v.cap:g}x {short.get(v.verdict, v.verdict)}" for v in summary.verdicts)
        else:
            caps = ", ".join(f"{c:g}" for c in summary.caps) + "x"
        table.add_row(
            str(summary.folder.relative_to(root) if summary.folder.is_relative_to(root) else summary.folder),
            summary.status,
            summary.agent,
            summary.dataset[:16],
            f"{summary.evaluated}/{summary.budget}",
            "" if math.isinf(summary.best_valid_nll) else f"{summary.best_valid_nll:.4f}",
            caps,
            time.strftime("%m-%d %H:%M", time.localtime(summary.modified)),
        )
    console.print(table)
    console.print("finished: tree-search report RUN prints its tables; searched: tree-search compare RUN scores it on "
                  "test; unfinished (stopped, or still running): tree-search search --resume RUN; empty: nothing "
                  "evaluated")  # fmt: skip


@main.command()
@click.argument("run_folder", type=click.Path(path_type=Path, file_okay=False, exists=True))
@friendly_errors
def report(run_folder: Path) -> None:
    """Print a finished run's test-split tables and verdicts again, from its comparison.json (no recomputation)."""
    from tree_search.search.report import ComparisonReport

    _print_comparison(ComparisonReport.load(run_folder), run_folder)
    summary = current_summary(run_folder)
    if summary is not None:
        _print_end_to_end(summary)
    elif (run_folder / END_TO_END_FILE).exists():
        console.print(f"{run_folder / END_TO_END_FILE} is from an earlier test scoring of this run: tree-search "
                      f"end-to-end {run_folder} gives the current finalists' verdicts end to end")  # fmt: skip


def _print_end_to_end(summary: dict[str, Any], written_in: Path | None = None) -> None:
    for line in end_to_end_lines(summary)[2:]:
        if line and not line.startswith("|---"):
            console.print(line, markup=False)
    if written_in is not None:
        console.print(f"written: {written_in / END_TO_END_FILE} and its section of {written_in / 'report.md'}")


@main.command("end-to-end")
@click.argument("run_folder", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--seeds", default=EndToEndConfig.seeds, show_default=True, help="Trainings per tree (seeds 0..N-1).")
@click.option("--steps", type=int, default=EndToEndConfig.steps,
              help="Optimiser steps per training (default: the encoder's own).")  # fmt: skip
@click.option("--positions", default=EndToEndConfig.positions, show_default=True,
              help="Test positions scored (a seeded sample, the same for every tree).")  # fmt: skip
@click.option("--trees", default=EndToEndConfig.trees, show_default=True,
              help="0: the verdicts' trees, binary Huffman, the full softmax; N: finalists up to N.")  # fmt: skip
@friendly_errors
def end_to_end(run_folder: Path, seeds: int, steps: int | None, positions: int, trees: int) -> None:
    """Verdicts end to end: train the context encoder from scratch with each finalist's head, score on test.

    For a run scored on test (tree-search compare) on a text dataset. Every search verdict
    trains heads on frozen features; this trains the model with its tree, as users do
    (minutes per tree and seed). Writes end_to_end.json and a section of report.md; an
    interrupted call keeps each finished (tree, seed) and the next call goes on from there.
    """
    _end_to_end(run_folder, EndToEndConfig(seeds=seeds, steps=steps, positions=positions, trees=trees))


def _end_to_end(folder: Path, config: EndToEndConfig) -> None:
    try:
        summary = end_to_end_verdicts(folder, config, progress=lambda line: console.print(line, markup=False))
    except KeyboardInterrupt:
        console.print(f"interrupted: every finished (tree, seed) is kept in {folder / 'end_to_end'}; continue with "
                      f"tree-search end-to-end {folder}")  # fmt: skip
        raise SystemExit(130) from None
    _print_end_to_end(summary, folder)


@main.command()
@click.option("--agent", type=click.Choice(AGENTS), default=SearchConfig.agent, show_default=True,
              help="The searcher: RLlib ppo/appo, Optuna samplers, dp, or policy (a learned policy's proposals, "
                   "best-liked first; split env only, as dp).")  # fmt: skip
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="--agent policy, or --agent dp with --prior: a learned policy's file (default: the one shipped with the "
    "package).",
)
@click.option("--prior/--no-prior", default=SearchConfig.prior, show_default=True,
              help="--agent dp: a learned policy (--policy) orders dp's measurements: its favourite root rules are "
                   "ranked first and each root's completions measured in its order.")  # fmt: skip
@click.option("--env", "env_name", type=click.Choice(["split", "merge", "cutoffs"]), default=SearchConfig.env,
              show_default=True, help="The environment trees are built in.")  # fmt: skip
@click.option(
    "--budget",
    default=SearchConfig.budget,
    show_default=True,
    help="Tree evaluations of the searcher (baselines extra).",
)
@click.option("--seconds", type=float, default=SearchConfig.seconds, help="Optional wall-clock limit of the search.")
@click.option("--dataset", type=DATASET, default=TreeEnvConfig.dataset, show_default=True, help=DATASET_HELP + ".")
@click.option("--text", "texts", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Search on your own text: one file (split by lines) or --text TRAIN --text VALID --text TEST; "
                   "prepared as `data prepare --text` does (or reused from the cache), then searched.")  # fmt: skip
@click.option("--max-size", default=CorpusConfig.max_size, show_default=True,
              help="With --text: vocabulary cap, <unk> included (the classes V).")  # fmt: skip
@click.option("--planted-classes", default=COMMAND_LINE_PLANTED.num_classes, show_default=True,
              help="V of the planted-hierarchy data.")  # fmt: skip
@click.option(
    "--epochs",
    default=NodeRecipe.epochs,
    show_default=True,
    help="Passes over each node's sampled tokens per evaluation.",
)
@click.option("--cost-mode", type=click.Choice(["cap", "tradeoff"]), default=TreeEnvConfig.cost_mode, show_default=True)
@click.option(
    "--cost-cap",
    default=TreeEnvConfig.cost_cap,
    show_default=True,
    help="Cap on cost, in multiples of binary Huffman's.",
)
@click.option(
    "--reward-mode",
    type=click.Choice(REWARD_MODES),
    default=TreeEnvConfig.reward_mode,
    show_default=True,
    help="RLlib agents: the reward at the end only, or each decision paid its node's share of the loss "
    "(the episode's sum is the same).",
)
@click.option(
    "--seed-classics/--no-seed-classics",
    default=SearchConfig.seed_classics,
    show_default=True,
    help="Optuna: start from the homogeneous (classic) trees the environment can express.",
)
@click.option(
    "--cost-caps",
    help="Front search: one search per cap, e.g. 1,1.5,2,4 (multiples of binary Huffman's cost), each with "
    "--budget evaluations, sharing the node bank; the report compares each cap with the classic trees.",
)
@click.option(
    "--share-caps/--separate-caps",
    default=SearchConfig.share_caps,
    show_default=True,
    help="Front search: a tree evaluated under one cap is free for the others; --separate-caps makes each cap's "
    "search pay for every tree it asks for (searchers compared at equal budgets).",
)
@click.option(
    "--cost-weight", default=TreeEnvConfig.cost_weight, show_default=True, help="lambda of the tradeoff mode."
)
@click.option("--max-steps", default=TreeEnvConfig.max_steps, show_default=True, help="Decisions per episode.")
@click.option(
    "--baselines",
    default=SearchConfig.baselines,
    show_default=True,
    help="Classic trees to compare with: a set (core, all, front), comma-separated names (see 'baseline "
    "--trees') and tree files of one's own (.json or .npz with labels: matched to the data by token), or none.",
)
@click.option("--taxonomy", "taxonomy_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="A taxonomy of the classes (child<TAB>parent lines in a .tsv, or {child: parent} in "
              "a .json), matched to the data by token: its tree joins the baselines as 'taxonomy'.")  # fmt: skip
@click.option("--taxonomy-level", type=click.IntRange(min=1), default=TreeEnvConfig.taxonomy_level, show_default=True,
              help="Given with --taxonomy: the split environment's episodes start from the taxonomy's groups at this "
              "depth, the levels above kept (agents that act in the environment; not dp or jtm).")  # fmt: skip
@click.option("--unknown", "taxonomy_unknown", type=click.Choice(UNKNOWN_MODES),
              default=TreeEnvConfig.taxonomy_unknown, show_default=True,
              help="With --taxonomy, classes it does not list: one catch-all node under the root, or placed by "
              "frequency (Huffman-merged with the taxonomy's top categories), or an error.")  # fmt: skip
@click.option("--seed", default=SearchConfig.seed, show_default=True, help="Seed of the sampler or policy.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run folder (default: runs/AGENT-ENV-TIME).")  # fmt: skip
@click.option("--resume", "resume", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Continue the run in this folder with its stored configuration.")  # fmt: skip
@click.option("--compare/--no-compare", default=True, show_default=True, help="Score finalists on test at the end.")
@click.option(
    "--final-seeds", default=SearchConfig.final_seeds, show_default=True, help="Seeds of the final test scoring."
)
@click.option(
    "--final-epochs",
    type=float,
    default=SearchConfig.final_epochs,
    help="Epochs of the final scoring (default: 2x --epochs).",
)
@click.option("--final-workers", default=SearchConfig.final_workers, show_default=True,
              help="Processes that train the finalists of the final scoring at once (0: one per torch thread, at "
              f"most {AUTO_WORKERS_MAX}; 1: in this process). The scores are the same with any number.")  # fmt: skip
@click.option("--eval-workers", default=SearchConfig.eval_workers, show_default=True,
              help="Ray actors that train heads (0: in this process).")  # fmt: skip
@click.option(
    "--ray-address",
    default=SearchConfig.ray_address,
    help="Ray cluster: 'auto', 'ray://host:10001' (default: a local Ray).",
)
@click.option(
    "--cpus-per-eval", default=SearchConfig.cpus_per_eval, show_default=True, help="CPUs each evaluation actor holds."
)
@click.option(
    "--gpus-per-eval",
    default=SearchConfig.gpus_per_eval,
    show_default=True,
    help="GPU share of each actor (0.25: four per GPU).",
)
@click.option(
    "--parallel", type=int, default=SearchConfig.parallel, help="Optuna trials at once (default: --eval-workers)."
)
@click.option("--env-runners", default=SearchConfig.env_runners, show_default=True,
              help="PPO/APPO: Ray actors sampling episodes at once on the cluster (0: in this process).")  # fmt: skip
@click.option("--node-bank/--no-node-bank", default=SearchConfig.node_bank, show_default=True,
              help="Reuse trained nodes across trees and runs (same results, less time).")  # fmt: skip
@click.option("--eval-batch", default=SearchConfig.eval_batch, show_default=True,
              help="Most evaluations (without pruning) sent to a Ray actor in one call.")  # fmt: skip
@click.option("--storage", default=SearchConfig.storage,
              help="Optuna storage URL (default: the journal file RUN/optuna.journal).")  # fmt: skip
@click.option(
    "--study", default=SearchConfig.study, help="Optuna study name; processes sharing storage and name cooperate."
)
@click.option("--cost", "cost_model", default=TreeEnvConfig.cost, show_default=True,
              help="What costs and caps are in: " + COST_HELP)  # fmt: skip
@click.option("--decode-cap", type=float, default=TreeEnvConfig.decode_cap, show_default=True,
              help="With --cost measured: also cap the predicted decoding time (exact top-5), in multiples of binary "
                   "Huffman's, from the same profile; 0: no decoding cap (dp and the environment agents).")  # fmt: skip
@click.option("--split-classic-shapes/--no-split-classic-shapes", default=TreeEnvConfig.split_classic_shapes,
              show_default=True, help="Split environment: also the adaptive softmax's root splits and projected flat "
              "nodes, so environment agents can build PyTorch's and Grave et al.'s trees (dp always can).")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Also show other libraries' log lines on screen (Ray, RLlib, "
              "Optuna: hidden by default, always written to libraries.log in the run folder).")  # fmt: skip
@click.option("--end-to-end", "end_to_end_too", is_flag=True,
              help="After the test scoring, also the verdicts end to end (tree-search end-to-end RUN with its "
                   "defaults: the encoder trained from scratch with each verdict's tree; text datasets).")  # fmt: skip
@friendly_errors
def search(
    agent: str,
    policy_path: Path | None,
    prior: bool,
    env_name: str,
    budget: int,
    seconds: float | None,
    dataset: str,
    texts: tuple[Path, ...],
    max_size: int,
    planted_classes: int,
    epochs: float,
    cost_mode: str,
    cost_cap: float,
    reward_mode: str,
    seed_classics: bool,
    cost_caps: str | None,
    share_caps: bool,
    cost_weight: float,
    max_steps: int,
    baselines: str,
    taxonomy_file: Path | None,
    taxonomy_level: int,
    taxonomy_unknown: str,
    seed: int,
    out: Path | None,
    resume: Path | None,
    compare: bool,
    final_seeds: int,
    final_epochs: float | None,
    final_workers: int,
    eval_workers: int,
    ray_address: str | None,
    cpus_per_eval: float,
    gpus_per_eval: float,
    parallel: int | None,
    env_runners: int,
    eval_batch: int,
    node_bank: bool,
    storage: str | None,
    study: str | None,
    cost_model: str,
    decode_cap: float,
    split_classic_shapes: bool,
    verbose: bool,
    end_to_end_too: bool,
) -> None:
    """Search for a better tree; results are written to the run folder as they arrive.

    Ctrl-C or SIGTERM stops cleanly; `--resume RUN` continues with no lost and no repeated
    evaluations (execution flags such as --eval-workers apply to the resumed session).
    """
    import dataclasses
    import signal

    import torch

    from tree_search.agents.baselines import resolved_baselines
    from tree_search.heads.timing import check_cost_spec, release_free_memory
    from tree_search.search.config import EXECUTION_FIELDS
    from tree_search.search.report import compare_runs
    from tree_search.search.run import run_search

    if end_to_end_too and not compare:
        raise click.ClickException("--end-to-end needs the test scoring: leave out --no-compare")
    if texts and (resume is not None or dataset != TreeEnvConfig.dataset):
        raise click.ClickException("--text prepares a new run's data: give it without --dataset and --resume")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_cost_spec(cost_model, device_type)  # before the search, not after it
    if resume is None:  # before any data is prepared: tree files checked, and kept as absolute paths
        baselines = resolved_baselines(baselines)
    # the taxonomy start is asked for by giving --taxonomy-level (its default is only the level's)
    taxonomy_start = click.get_current_context().get_parameter_source("taxonomy_level") is not (
        click.core.ParameterSource.DEFAULT)  # fmt: skip
    if taxonomy_start and taxonomy_file is None:
        raise click.ClickException("--taxonomy-level starts episodes from a taxonomy: give it with --taxonomy")
    taxonomy = str(taxonomy_file.resolve()) if taxonomy_file is not None else ""
    if decode_cap and cost_model.startswith("measured"):  # the decoding side of the same profile
        check_cost_spec("decode" + cost_model.removeprefix("measured"), device_type)
    # how the search runs (this session's flags, also on resume): the fields `EXECUTION_FIELDS` declares
    context = click.get_current_context()
    execution = {name: context.params[name] for name in EXECUTION_FIELDS}
    if resume is not None:
        session = (*EXECUTION_FIELDS, *_RESUMED_SESSION_OPTIONS)
        given = [option.opts[0] for option in context.command.params if option.name not in session
                 and context.get_parameter_source(option.name) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
        if given:
            allowed = ", ".join(f"--{name.replace('_', '-')}" for name in EXECUTION_FIELDS)
            raise click.ClickException(f"{', '.join(given)}: a resumed run keeps the settings in its config.json; "
                                       f"only how it runs may change ({allowed})")  # fmt: skip
        folder = resume
        config = dataclasses.replace(SearchConfig.from_json(Run(folder).config, resume=True), **execution)
    else:
        if texts:
            with progress_bars() as progress:
                prepared = prepare_dataset(text=texts, corpus_config=CorpusConfig(max_size=max_size),
                                           log=console.print, progress=progress)  # fmt: skip
            dataset = prepared.info.get("cache") or dataset
            name = name_dataset(Path(dataset), sources=texts)
            console.print(f"dataset {name!r}: {len(texts)} text file(s), V = {prepared.num_classes:,}, features in "
                          f"{dataset} (later: --dataset {name})")  # fmt: skip
        planted = dataclasses.replace(COMMAND_LINE_PLANTED, num_classes=planted_classes)
        env_config = TreeEnvConfig(
            dataset=dataset,
            planted=planted,
            train=NodeRecipe(epochs=epochs),
            cost_mode=cost_mode,
            cost_cap=cost_cap,
            cost=cost_model,
            decode_cap=decode_cap,
            split_classic_shapes=split_classic_shapes,
            taxonomy=taxonomy if taxonomy_start else "",
            taxonomy_level=taxonomy_level,
            taxonomy_unknown=taxonomy_unknown,
            cost_weight=cost_weight,
            max_steps=max_steps,
            reward_mode=reward_mode,
        )
        config = SearchConfig(
            agent=agent,
            policy_file=str(policy_path.resolve()) if policy_path is not None else "",
            prior=prior,
            env=env_name,
            budget=budget,
            cost_caps=float_list(cost_caps, "--cost-caps"),
            share_caps=share_caps,
            seed_classics=seed_classics,
            seconds=seconds,
            env_config=env_config,
            baselines=baselines,
            taxonomy=taxonomy,
            seed=seed,
            final_seeds=final_seeds,
            final_epochs=final_epochs,
            storage=storage,
            study=study,
            **execution,
        )
        folder = out or Path("runs") / f"{agent}-{env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if config.env_config.dataset == "builtin":
        with progress_bars() as progress:
            prepare_dataset(log=console.print, progress=progress)  # cached after the first run
    console.print(f"run folder: {folder}")

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a parent's "ignore Ctrl-C" is respected
        signal.signal(signal.SIGINT, _stop_search)
    signal.signal(signal.SIGTERM, _stop_search)  # a scheduler's SIGTERM stops as cleanly as Ctrl-C
    if config.agent in (*RLLIB_AGENTS, "policy") or config.prior:  # the policy is an RLlib module
        import ray.rllib  # noqa: F401 - it installs its log handler at import: `library_logs` quiets it
    with library_logs(folder / Run.LIBRARY_LOG, verbose):
        try:
            with progress_bars() as progress:
                run_search(config, folder, resume=resume is not None, log=console.print, progress=progress)
        except KeyboardInterrupt:
            console.print(f"interrupted: every finished evaluation is in {folder}; continue with "
                          f"tree-search search --resume {folder}")  # fmt: skip
            raise SystemExit(130) from None
        if compare:
            release_free_memory()  # the search's free heap does not add to the final scoring's peak
            with progress_bars() as progress:
                comparison = compare_runs([folder], log=console.print, progress=progress)
            _print_comparison(comparison, folder)
    if end_to_end_too:
        _end_to_end(folder, EndToEndConfig())


# besides EXECUTION_FIELDS, what --resume takes
_RESUMED_SESSION_OPTIONS = ("resume", "compare", "end_to_end_too", "verbose")
STOP_GRACE_SECONDS = 30.0
_stopping = threading.Event()


def _stop_search(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM: stop the search cleanly, but surely.

    Every finished evaluation is already on disk (each is flushed and fsynced as it
    arrives), so the clean-up only tidies up. Should it hang anyway (a lock held by the
    interrupted code, a stuck worker), the process leaves after ``STOP_GRACE_SECONDS``;
    a second signal leaves at once.
    """
    if _stopping.is_set():
        os._exit(130)
    _stopping.set()

    def leave_after_grace() -> None:
        time.sleep(STOP_GRACE_SECONDS)
        print(f"clean-up did not finish in {STOP_GRACE_SECONDS:g} s: leaving (finished evaluations are on disk)",
              file=sys.stderr, flush=True)  # fmt: skip
        os._exit(130)

    threading.Thread(target=leave_after_grace, name="stop-grace", daemon=True).start()
    raise KeyboardInterrupt


@main.command(name="compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--seeds", type=int, default=None, help="Training seeds per finalist (default: the run's).")
@click.option("--epochs", type=float, default=None, help="Training epochs of the final scoring.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the report goes (default: the first run's folder).")  # fmt: skip
@click.option("--cost", "cost_model", default=None, help="Default: the run's own. " + COST_HELP)
@click.option("--workers", type=int, default=None,
              help="Processes that train finalists at once (0: one per torch thread, at most "
              f"{AUTO_WORKERS_MAX}; 1: in this process; default: the run's --final-workers).")  # fmt: skip
@friendly_errors
def compare_command(runs: tuple[Path, ...], seeds: int | None, epochs: float | None, out: Path | None,
                    cost_model: str | None, workers: int | None) -> None:  # fmt: skip
    """Score the best trees of RUNS and every baseline on the test split; print the table, write the report."""
    from tree_search.search.report import compare_runs

    with progress_bars() as progress:
        comparison = compare_runs(list(runs), seeds=seeds, epochs=epochs, out=out, cost=cost_model, workers=workers,
                                  log=console.print, progress=progress)  # fmt: skip
    _print_comparison(comparison, out or runs[0])
