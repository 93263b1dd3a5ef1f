"""Commands on data and devices: ``data prepare``, ``data show``, ``cost calibrate``, ``reference``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.table import Table

from tree_search.cli.app import DATASET, DATASET_HELP, console, friendly_errors, main, progress_bars
from tree_search.data import CorpusConfig, EncoderConfig, cached_datasets, name_dataset, prepare_dataset, remove_dataset
from tree_search.data.cache import cache_root
from tree_search.data.names import check_dataset_name
from tree_search.reward.converged import ReferenceRecipe


@main.group()
def cost() -> None:
    """Measure what tree heads cost in time on this device (the profile ``--cost measured`` reads)."""


@cost.command(name="calibrate")
@click.option("--dim", default=256, show_default=True, help="Input dimension of the heads (the data's).")
@click.option("--batch", default=4096, show_default=True, help="Tokens per training step.")
@click.option("--classes", "num_classes", default=10_000, show_default=True, help="V of the timed trees.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--repeats", default=7, show_default=True, help="Timed steps per tree (the median counts).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Profile file (default: this device's profile in the cache, which --cost measured reads).",
)
@friendly_errors
def cost_calibrate(dim: int, batch: int, num_classes: int, precision: str, device: str | None, repeats: int,
                   out: Path | None) -> None:  # fmt: skip
    """Time the training step and the decoding of tree heads on this device and fit its cost profile.

    Forward + backward (the gradient flows into the input, as when an encoder trains with the
    head), and exact top-5 decoding of heads holding centroid weights, of about 80 trees: a
    fitting set and a held-out set (the classic front and trees of the split grammar) the fit
    never sees. Prints each tree's measured and predicted times. `--cost measured` reads its
    training side, `--cost decode` its decoding side.
    """
    import torch

    from tree_search.heads.timing import calibrate, default_profile_path

    if min(dim, batch, num_classes - 1, repeats) < 1:
        raise click.ClickException("--dim, --batch and --repeats must be >= 1 and --classes >= 2")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with progress_bars() as start:
        advance: list[Callable[[int], None]] = []

        def progress(name: str, done: int, total: int) -> None:
            if not advance:
                advance.append(start(f"timing heads on {device}", total))
            advance[0](1 if done else 0)

        profile, timed = calibrate(num_classes=num_classes, dim=dim, batch=batch, precision=precision, device=device,
                                   repeats=repeats, progress=progress)  # fmt: skip
    target = out or default_profile_path(device.type, dim, batch, precision)
    target.parent.mkdir(parents=True, exist_ok=True)
    profile.save(target)
    sides = (
        (f"training step, batch {batch}, {precision}", "µs/token", "", profile.fit),
        (f"exact top-{profile.decode_k} decoding, {profile.decode_batch} queries at once, fp32", "µs/query",
         "decode: ", profile.decode_fit),
    )  # fmt: skip
    for title, unit, prefix, fit in sides:
        table = Table(title=f"{profile.device}: {title}, V = {num_classes:,}, d = {dim}")
        for column in ("tree", "set", f"measured {unit}", "predicted", "error"):
            table.add_column(column, justify="left" if column in ("tree", "set") else "right")
        for t in timed:
            if t.name.startswith("decode: ") == bool(prefix):
                name, error = t.name.removeprefix(prefix), f"{t.relative_error:+.1%}"
                table.add_row(name, t.role, f"{t.measured * 1e6:.3f}", f"{t.predicted * 1e6:.3f}", error)
        console.print(table)
        for role, key in (("fitting", "fit"), ("held-out", "held_out")):
            e = fit[key]
            median, largest = e["median_abs_relative_error"], e["max_abs_relative_error"]
            console.print(f"{title.split(',')[0]}: {role} trees: {e['trees']}, median |error| {median:.1%}, "
                          f"largest {largest:.1%}")  # fmt: skip
    console.print(f"profile written to {target}")


@main.group()
def data() -> None:
    """Prepare and list the datasets that reward evaluations train heads on."""


@data.command()
@click.option(
    "--corpus",
    type=click.Choice(["stdlib"]),
    default="stdlib",
    show_default=True,
    help="The built-in corpus (used when no --text/--npz is given).",
)
@click.option(
    "--text",
    "text",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Plain-text corpus: one file (split by lines), or three: --text TRAIN --text VALID --text TEST.",
)
@click.option("--npz", type=click.Path(path_type=Path, dir_okay=False), help="Pre-computed features and labels.")
@click.option("--max-size", default=CorpusConfig.max_size, show_default=True, help="Vocabulary cap, <unk> included.")
@click.option("--min-count", default=1, show_default=True, help="Rarer tokens fold into <unk>.")
@click.option("--dim", default=EncoderConfig.dim, show_default=True, help="Feature dimension.")
@click.option("--context", default=EncoderConfig.context, show_default=True, help="Previous tokens the encoder reads.")
@click.option("--steps", default=EncoderConfig.steps, show_default=True, help="Encoder training steps.")
@click.option(
    "--max-train-tokens",
    default=EncoderConfig.max_train_tokens,
    show_default=True,
    help="Train positions with stored features.",
)
@click.option(
    "--max-eval-tokens",
    default=EncoderConfig.max_eval_tokens,
    show_default=True,
    help="Valid and test positions with stored features, each.",
)
@click.option("--seed", default=0, show_default=True, help="Splits, encoder and kept positions.")
@click.option("--device", default=None, help="torch device for the encoder (default: cuda if available).")
@click.option("--name", default=None, help="Name of the prepared text dataset, for --dataset NAME (default: from the "
              "file names, or the name it has).")  # fmt: skip
@friendly_errors
def prepare(corpus: str, text: tuple[Path, ...], npz: Path | None, max_size: int, min_count: int, dim: int,
            context: int, steps: int, max_train_tokens: int, max_eval_tokens: int, seed: int,
            device: str | None, name: str | None) -> None:  # fmt: skip
    """Tokenize a corpus, train the context encoder and cache its frozen features."""
    if name is not None and not text:
        raise click.UsageError("--name names a dataset prepared from --text files ('builtin' and .npz files "
                               "already have theirs)")  # fmt: skip
    if name is not None:
        check_dataset_name(name)  # before minutes of preparation
    del corpus  # one built-in corpus so far; the option documents the default
    corpus_config = CorpusConfig(max_size=max_size, min_count=min_count, seed=seed)
    encoder_config = EncoderConfig(dim=dim, context=context, steps=steps, max_train_tokens=max_train_tokens,
                                   max_eval_tokens=max_eval_tokens, seed=seed)  # fmt: skip
    started = time.perf_counter()
    with progress_bars() as progress:
        dataset = prepare_dataset(text=text, npz=npz, corpus_config=corpus_config, encoder_config=encoder_config,
                                  device=device, log=console.print, progress=progress)  # fmt: skip
    info = dataset.info
    corpus_info = info.get("corpus", {})
    source = corpus_info.get("corpus", "npz")
    if source == "python-stdlib":
        source = f"Python {corpus_info['python']} standard library ({corpus_info['root']})"
    console.print(f"[bold]dataset[/] {source}")
    console.print(f"  classes {dataset.num_classes:,} (vocabulary from the train split), feature dim {dataset.dim}")
    if "tokens" in corpus_info:
        tokens, unk = corpus_info["tokens"], corpus_info["unk_rate"]
        for split in ("train", "valid", "test"):
            console.print(f"  {split:<5} {tokens[split]:>11,} tokens, <unk> {100 * unk[split]:5.2f}%, "
                          f"{info['positions'][split]:>9,} positions with features")  # fmt: skip
        console.print(f"  context encoder: valid NLL {info['encoder_nll']['valid']:.3f} nats/token "
                      f"(trained {info['encoder_train_seconds']:.0f} s on {info['device']}"
                      f"{', ' + info['encoder_loss'] if 'encoder_loss' in info else ''})")  # fmt: skip
    else:
        console.print("  rows " + ", ".join(f"{k} {v:,}" for k, v in info["positions"].items()))
    console.print(f"  cache: {info.get('cache', 'not cached (npz is read in place)')}")
    if text and "cache" in info:
        name = name_dataset(Path(info["cache"]), name, sources=text)
        console.print(f"  name: {name} (search it with: tree-search search --dataset {name})")
    console.print(f"  done in {time.perf_counter() - started:.1f} s")


@data.command(name="show")
@friendly_errors
def data_show() -> None:
    """List the prepared datasets: name, source, classes, tokens, size on disk, when prepared, folder."""
    rows = cached_datasets()
    if not rows:
        console.print("no prepared datasets yet: run 'tree-search data prepare --text FILE' (or the main job, which "
                      "prepares the built-in corpus)")  # fmt: skip
        return
    table = Table(title=f"prepared datasets ({cache_root() / 'features'}; tokens per split)")
    for column in ("name", "source", "classes", "dim", "train", "valid", "test", "MiB", "prepared", "folder"):
        left = column in ("name", "source", "prepared", "folder")
        # name and source fold onto more lines rather than vanish when the screen is narrow
        folds = column in ("name", "source")
        table.add_column(column, justify="left" if left else "right", no_wrap=not folds,
                         overflow="fold" if folds else "ellipsis",
                         min_width=12 if folds else 16 if column == "folder" else None)  # fmt: skip
    for row in rows:
        tokens = row["tokens"] or row["positions"]  # .npz-like datasets count rows
        sizes = [f"{tokens.get(split, 0):,}" for split in ("train", "valid", "test")]
        files = row["files"]
        source = row["corpus"] if not files else ", ".join(Path(f).name for f in dict.fromkeys(files.values()))
        prepared = time.strftime("%m-%d %H:%M", time.localtime(row["prepared"]))
        name = row["name"] or ("builtin" if row["corpus"].startswith("python-stdlib") else "")
        table.add_row(name, source, f"{row['classes']:,}", str(row["dim"]), *sizes, str(row["megabytes"]), prepared,
                      Path(row["folder"]).name)  # fmt: skip
    console.print(table)
    console.print("search one with: tree-search search --dataset NAME; delete one: tree-search data remove NAME")


@data.command(name="remove")
@click.argument("dataset_name", metavar="NAME")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def data_remove(dataset_name: str, yes: bool) -> None:
    """Delete a prepared dataset (NAME, or its folder from `data show`) and the node banks trained on it.

    Runs that searched it keep their results; to resume or re-score them, prepare the same
    data again (it gets the same folder).
    """
    if not yes:
        click.confirm(f"delete the prepared dataset {dataset_name!r} and what the cache derived from it?", abort=True)
    folder, names, derived = remove_dataset(dataset_name)
    named = f" (name{'s' if len(names) > 1 else ''} {', '.join(names)})" if names else ""
    console.print(f"removed {folder}{named} and {len(derived)} folder(s) derived from it (node banks, references)")


@main.command()
@click.option("--dataset", type=DATASET, default="builtin", show_default=True, help=DATASET_HELP + ".")
@click.option(
    "--epochs",
    type=float,
    default=ReferenceRecipe.epochs,
    show_default=True,
    help="Passes over the train split: the length of the cosine schedule (the best validation measurement is kept).",
)
@friendly_errors
def reference(dataset: str, epochs: float) -> None:
    """Train the converged full softmax of a dataset once and cache it: reports measure gaps against it."""
    import dataclasses

    from tree_search.envs import TreeEnvConfig, load_env_dataset
    from tree_search.heads.timing import tune_allocator
    from tree_search.reward.converged import train_reference

    tune_allocator()
    data = load_env_dataset(TreeEnvConfig(dataset=dataset))
    found = train_reference(data, dataclasses.replace(ReferenceRecipe(), epochs=epochs), log=console.print)
    console.print(f"converged full softmax of {dataset} (V = {data.num_classes:,}): valid NLL {found.valid_nll:.4f}, "
                  f"test NLL {found.test_nll:.4f}, best at epoch {found.epochs:.2f}, {found.seconds:.0f} s; "
                  "reports of runs on this dataset now measure gaps against it")  # fmt: skip
