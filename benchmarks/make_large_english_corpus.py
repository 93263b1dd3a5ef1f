"""A large English corpus (20M+ words, 100k+ word types) from Debian documentation packages, one document per file.

Benchmark data for issue 26 (searches at 100k classes and more), not a dependency of the
product. It reads the documentation that these Debian packages install, plus the man pages
and Vim help the smaller corpus uses (`make_english_corpus.py`):

    apt-get install --no-install-recommends linux-doc python3-doc perl-doc postgresql-doc-15 \\
        debian-handbook debian-reference-en

| source | package | format |
|---|---|---|
| the Linux kernel's documentation | linux-doc | reStructuredText (gzipped) |
| the Python 3.11 documentation | python3-doc | reStructuredText sources |
| Perl's manuals | perl-doc | POD |
| PostgreSQL 15's manual | postgresql-doc-15 | HTML |
| the Debian Administrator's Handbook (English) | debian-handbook | HTML |
| the Debian Reference (English) | debian-reference-en | HTML |
| man pages, Vim's help | (installed) | roff, text |

Markup is stripped to sentences: lines of at least 4 words, whitespace-tokenised, with
punctuation split from words so that "word," and "word" are one type. Each source file is
one document: documents are separated by a line holding only a form feed, which
`tree-search data prepare --text` reads as document boundaries (whole documents go to one
split, and verdicts resample them). It prints the words, word types and documents per
source and in all.

    python benchmarks/make_large_english_corpus.py runs/english-large.txt
    tree-search data prepare --text runs/english-large.txt --max-size 100000

With ``--by-source`` it writes one corpus per source into a folder instead (``linux-kernel-
documentation.txt``, ``perl-manuals.txt``, ...): corpora of different domains, as the learned
policy's training and held-out instances use (`bench_policy.py`).

    python benchmarks/make_large_english_corpus.py --by-source runs/english-domains
"""

from __future__ import annotations

import collections
import glob
import gzip
import html.parser
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROFF_ESCAPE = re.compile(r"\\f\[?[A-Z0-9]*\]?|\\\(..|\\\[[^\]]*\]|\\[&%|^e0]|\\s[-+]?\d|\\\*\(?..|\\[-]")
RST_MARKUP = re.compile(r":[a-z:]+:`([^`<]*)(?:<[^>]*>)?`|``([^`]*)``|`([^`<]*)(?:<[^>]*>)?`_?|\*\*?([^*]+)\*\*?")
POD_CODES = re.compile(r"[BCEFILSXZ]<+\s*([^<>]*?)\s*>+")
PUNCTUATION = re.compile(r"([.,;:!?()\[\]{}\"'])")
MIN_WORDS = 4


class _Text(html.parser.HTMLParser):
    """The text of an HTML page, block by block, without scripts, styles and navigation."""

    SKIP = {"script", "style", "head", "nav"}
    BLOCKS = {"p", "li", "dd", "dt", "td", "th", "h1", "h2", "h3", "h4", "div", "pre", "br", "tr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._current: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if not self._skipping:
            self._current.append(data)

    def _flush(self):
        text = " ".join("".join(self._current).split())
        if text:
            self.lines.append(text)
        self._current = []


def _html(path: str) -> Iterator[str]:
    parser = _Text()
    parser.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
    parser.close()
    parser._flush()
    yield from parser.lines


def _rst(path: str) -> Iterator[str]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("..", ":", "=", "-", "~", "*", "#", "+", "|", ">>>")):
                continue
            yield RST_MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), line)


def _pod(path: str) -> Iterator[str]:
    verbatim = False
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("="):
            verbatim = False
            continue
        if line.startswith((" ", "\t")):  # code blocks
            verbatim = True
            continue
        if not verbatim:
            yield POD_CODES.sub(r"\1", line.strip())


def _roff(path: str) -> Iterator[str]:
    try:
        text = gzip.open(path, "rt", encoding="utf-8", errors="strict").read()
    except (UnicodeDecodeError, OSError, EOFError):
        return
    for line in text.splitlines():
        if line and line[0] not in ".'":
            yield ROFF_ESCAPE.sub("", line).replace("\\", "")


def _plain(path: str) -> Iterator[str]:
    yield from open(path, encoding="utf-8", errors="replace")


SOURCES: dict[str, tuple[str, Callable[[str], Iterator[str]]]] = {
    "linux kernel documentation": ("/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz", _rst),
    "python documentation": ("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", _rst),
    "perl manuals": ("/usr/share/perl/5.*/pod/*.pod", _pod),
    "postgresql manual": ("/usr/share/doc/postgresql-doc-*/html/*.html", _html),
    "debian handbook": ("/usr/share/doc/debian-handbook/html/en-US/*.html", _html),
    "debian reference": ("/usr/share/debian-reference/*.en.html", _html),
    "man pages": ("/usr/share/man/man[1-8]/*.gz", _roff),
    "vim help": ("/usr/share/vim/vim9*/doc/*.txt", _plain),
}


def main(out: Path, by_source: bool = False) -> None:
    """Write the corpus to ``out``, or with ``by_source`` one corpus per source into the folder ``out``."""
    types: collections.Counter[str] = collections.Counter()
    total_words = total_documents = 0
    seen: set[str] = set()  # packages link the same files under several names
    if by_source:
        out.mkdir(parents=True, exist_ok=True)
    print(f"{'source':<28s} {'files':>6s} {'documents':>9s} {'words':>12s}")
    handle = None if by_source else out.open("w", encoding="utf-8")
    for name, (pattern, read) in SOURCES.items():
        if by_source:
            handle = (out / f"{name.replace(' ', '-')}.txt").open("w", encoding="utf-8")
        paths = sorted(glob.glob(pattern, recursive=True))
        paths = [p for p in paths if (real := os.path.realpath(p)) not in seen and not seen.add(real)]
        words = documents = 0
        for path in paths:
            kept = []
            for line in read(path):
                tokens = PUNCTUATION.sub(r" \1 ", line).split()
                if sum(t[0].isalpha() for t in tokens) >= MIN_WORDS:  # sentences, not code or tables
                    kept.append(" ".join(tokens))
            if not kept:
                continue
            handle.write("\f\n" if (documents if by_source else total_documents) else "")
            handle.write("\n".join(kept) + "\n")
            for line in kept:
                tokens = line.split()
                types.update(tokens)
                words += len(tokens)
            documents += 1
            total_documents += 1
        total_words += words
        if by_source:
            handle.close()
        print(f"{name:<28s} {len(paths):>6,d} {documents:>9,d} {words:>12,d}")
    if not by_source:
        handle.close()
    print(f"{'in all':<28s} {'':>6s} {total_documents:>9,d} {total_words:>12,d}   {len(types):,} word types -> {out}")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    split = "--by-source" in arguments
    arguments = [a for a in arguments if a != "--by-source"]
    if len(arguments) != 1:
        raise SystemExit("usage: python benchmarks/make_large_english_corpus.py [--by-source] OUT.txt|OUT_DIR")
    main(Path(arguments[0]), by_source=split)
