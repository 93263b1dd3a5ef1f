"""English text from what a Debian machine installs: man pages (roff stripped) and Vim's help files.

The second corpus of the front-search benchmark (README, "Front search against the classic
front"), so that results do not rest on code tokens alone:

    python benchmarks/make_english_corpus.py runs/english.txt
    tree-search data prepare --text runs/english.txt
    tree-search search --agent dp --budget 25 --cost-caps 1,1.5,2,4 --baselines front --dataset <feature folder>
"""

from __future__ import annotations

import glob
import gzip
import re
import sys
from pathlib import Path

ROFF_ESCAPE = re.compile(r"\\f\[?[A-Z0-9]*\]?|\\\(..|\\\[[^\]]*\]|\\[&%|^e0]|\\s[-+]?\d|\\\*\(?..|\\[-]")


def main(out: Path, man_words: int = 4_500_000) -> None:
    words = 0
    with out.open("w", encoding="utf-8") as handle:
        for path in sorted(glob.glob("/usr/share/man/man[1-8]/*.gz")):
            try:
                text = gzip.open(path, "rt", encoding="utf-8", errors="strict").read()
            except (UnicodeDecodeError, OSError, EOFError):
                continue
            for line in text.splitlines():
                if not line or line[0] in ".'":  # roff requests and comments
                    continue
                line = ROFF_ESCAPE.sub("", line).replace("\\", "").strip()
                if len(line.split()) >= 4:  # sentences; option lists and fragments dropped
                    handle.write(line + "\n")
                    words += len(line.split())
            if words > man_words:
                break
        for path in sorted(glob.glob("/usr/share/vim/vim9*/doc/*.txt")):
            for line in open(path, encoding="utf-8", errors="replace"):
                line = line.strip()
                if len(line.split()) >= 4:
                    handle.write(line + "\n")
                    words += len(line.split())
    print(f"{words:,} words written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/make_english_corpus.py OUT.txt")
    main(Path(sys.argv[1]))
