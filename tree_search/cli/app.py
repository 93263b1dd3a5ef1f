"""The ``tree-search`` command group and what every command shares: the console, error handling, progress, parsing.

Errors in the user's input (files, flags, trees) print one line naming the problem
and exit with status 1; set ``TREE_SEARCH_DEBUG=1`` to see the traceback as well.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

try:
    import click
    from rich.console import Console
except ImportError as missing:  # a light install (torch and numpy only): say what to install, not a traceback
    raise SystemExit(
        f"tree-search's command line needs the search extra ({missing.name} is missing): "
        'pip install "tree_search[search]"'
    ) from None
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tree_search.data import (
    CorpusConfig,
    DataError,
    Vocab,
    load_stdlib_corpus,
    load_vocab,
    read_counts_tsv,
    resolve_dataset,
)
from tree_search.export import TreeFileError
from tree_search.tree import TreeError

__all__ = [
    "COST_HELP",
    "DATASET",
    "DATASET_HELP",
    "class_id",
    "console",
    "float_list",
    "friendly_errors",
    "int_list",
    "is_number",
    "library_logs",
    "main",
    "progress_bars",
    "read_vocab",
]

console = Console(highlight=False)
if not console.is_terminal:  # pipes and CI logs: don't squeeze tables into 80 columns
    console.width = max(console.width, 120)
F = TypeVar("F", bound=Callable[..., Any])
COST_HELP = ("'macs' (multiply-adds), 'measured[:PROFILE.json]': training time per token predicted by this "
             "device's cost profile (`tree-search cost calibrate`), or 'decode[:PROFILE.json]': exact top-5 "
             "decoding time per query predicted by it; with a profile the report adds verdicts in time and the "
             "comparison at the adaptive softmax's time")  # fmt: skip


class _DatasetParam(click.ParamType):
    """A ``--dataset`` value; a dataset's name becomes its feature folder (`tree_search.data.resolve_dataset`)."""

    name = "DATASET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None:
            return None
        try:
            return resolve_dataset(str(value))
        except DataError as err:
            self.fail(str(err), param, ctx)


DATASET = _DatasetParam()
DATASET_HELP = "'builtin' (code corpus), 'planted', an .npz file, a prepared feature folder, or a dataset's name"


def friendly_errors(command: F) -> F:
    """Turn the project's input errors into one-line CLI errors (exit status 1)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (TreeError, TreeFileError, DataError, ValueError, OSError) as err:
            if os.environ.get("TREE_SEARCH_DEBUG"):
                raise
            message = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
            raise click.ClickException(message) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress bar factory: one bar at a time (a new one hides the last), with time spent and time left.

    Shown only on a terminal and only while work runs (pipes and CI logs get the lines alone).
    """
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:

        def start(description: str, total: int) -> Callable[[int], None]:
            for earlier in progress.task_ids:
                progress.update(earlier, visible=False)
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        yield start


LIBRARY_LOGGERS = ("ray", "ray.rllib", "optuna")  # loggers of other libraries that do not propagate to the root


class _FolderFileHandler(logging.FileHandler):
    """A file handler that makes its file's folder at the first record (not before: see `library_logs`)."""

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def library_logs(path: Path, verbose: bool) -> Iterator[None]:
    """Other libraries' log lines at INFO and above, appended to ``path``; on screen only errors, unless ``verbose``.

    Ray, RLlib and Optuna log through their own handlers (`LIBRARY_LOGGERS`): this adds the
    file to each and raises their screen handlers to ERROR for the block. Import RLlib before
    (it installs its handler at import). Python warnings stay on the screen: the package's own
    (a node bank's skipped segment, a cost profile of another V) are meant for the user. The
    file appears with its first line, so a search that fails at start leaves nothing behind.
    """
    import optuna

    handler = _FolderFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, [(h, h.level) for h in logger.handlers]))
        if not verbose:
            for screen, level in saved[-1][2]:
                screen.setLevel(max(level, logging.ERROR))
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, level, handlers in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            for screen, screen_level in handlers:
                screen.setLevel(screen_level)
        optuna.logging.set_verbosity(optuna_level)
        handler.close()


def read_vocab(counts_file: Path | None, max_size: int | None) -> tuple[Vocab, str]:
    """The vocabulary from a counts file (TSV or Vocab JSON), or the built-in corpus."""
    if counts_file is not None:
        vocab = load_vocab(counts_file) if counts_file.suffix.lower() == ".json" else read_counts_tsv(counts_file)
        return vocab, str(counts_file)
    with progress_bars() as progress:
        corpus = load_stdlib_corpus(CorpusConfig(max_size=max_size), progress=progress)
    info = corpus.info
    return (
        corpus.vocab,
        f"built-in corpus: Python {info['python']} standard library, {info['tokens']['train']:,} train tokens",
    )


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_list(text: str | None) -> list[int] | None:
    """Comma-separated integers (None stays None); a click error names a bad one."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str | None, option: str) -> tuple[float, ...]:
    """Comma-separated numbers of ``option`` (empty: none); a click error names a bad one."""
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tree_search")
def main() -> None:
    """Search for the best output tree of a hierarchical softmax head."""
    from tree_search.heads.timing import tune_allocator

    tune_allocator()  # heads train up to 2x faster without page-faulting their tensors in every step


def class_id(labels: Sequence[str] | None, num_classes: int, query: str, unknown: str) -> int:
    """The class a user names: a token of ``labels`` (tried first: a token may be ``#7``), else ``#ID`` or ``ID``.

    Raises:
        ValueError: ``unknown`` when it is neither; an id outside ``0..num_classes-1``.
    """
    if labels is not None and query in labels:
        return list(labels).index(query)
    if not ((query.startswith("#") and query[1:].isdigit()) or query.isdigit()):
        raise ValueError(unknown)
    label = int(query.lstrip("#"))
    if not 0 <= label < num_classes:
        raise ValueError(f"class id {label} is outside 0..{num_classes - 1}")
    return label
