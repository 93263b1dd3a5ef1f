"""Taxonomy trees of Python token categories beside Huffman, scored by the reward (validation NLL).

The taxonomy is made from the built-in corpus's vocabulary (the Python standard library's
tokens) by rules on each token: layout (<nl>, <indent>, <dedent>), literals (<str>, numbers),
keywords by role (flow, definitions, imports, logic, constants), operators by kind
(brackets, delimiters, arithmetic, comparison, augmented assignment, bitwise), and names by
form (builtins, dunders, private, UPPER_CASE constants, CamelCase classes, snake_case, one
letter). It is written as a ``child<TAB>parent`` file and read back with
`tree_search.data.taxonomy.taxonomy_tree`, so the file path is exercised too.

Trees compared (all with `tree_search.reward.evaluate`, the node recipe, one seed):

- the classic ``huffman-2``, ``huffman-4``, ``huffman-16`` and ``adaptive``;
- ``taxonomy``: the taxonomy as given (every category a flat node over its members);
- ``taxonomy-names-by-freq``: the taxonomy without its names branch; the ~9,000 names are
  "unknown" and placed by frequency (``unknown="frequency"``: Huffman-merged with the
  taxonomy's top categories under the root);
- ``categories-K-G``: `builders.from_categories` on the leaf categories: a K-ary Huffman
  tree inside each category, the categories merged by a G-ary Huffman tree of their masses.

    python benchmarks/bench_taxonomy.py [--out /tmp/helper_taxonomy] [--epochs 1]
"""

from __future__ import annotations

import argparse
import builtins
import json
import keyword
import re
import time
from pathlib import Path

import numpy as np
import torch

from tree_search import builders
from tree_search.data import prepare_dataset
from tree_search.data.taxonomy import taxonomy_tree
from tree_search.export import save_tree
from tree_search.reward import NodeRecipe, evaluate
from tree_search.reward.reward import head_cost

KEYWORD_ROLES = {
    "Flow": "if elif else for while break continue return yield try except finally raise with pass assert del",
    "Definition": "def class lambda async await global nonlocal",
    "Import": "import from as",
    "Logic": "and or not in is",
    "Constant": "True False None",
}
OPERATOR_KINDS = {
    "Bracket": "( ) [ ] { }",
    "Delimiter": ", : . ; -> = ... :=",
    "Arithmetic": "+ - * / // % ** @",
    "Comparison": "== != < > <= >=",
    "Augmented": "+= -= *= /= //= %= **= @= &= |= ^= >>= <<=",
    "Bitwise": "& | ^ ~ << >>",
}
NUMBER = re.compile(
    r"^(0[xXoObB][0-9a-fA-F_]+|[0-9][0-9_]*\.?[0-9_]*([eE][+-]?[0-9]+)?[jJ]?|\.[0-9]+([eE][+-]?\d+)?[jJ]?)$"
)


def token_category(token: str) -> tuple[str, ...]:
    """The taxonomy path of a token, from the top category down (the token's parent last)."""
    if token in ("<nl>", "<indent>", "<dedent>"):
        return ("Layout",)
    if token in ("<unk>", "<comment>"):
        return ("Special",)
    if token == "<str>":
        return ("Literal", "String")
    if NUMBER.match(token):
        return ("Literal", "Number")
    for role, words in KEYWORD_ROLES.items():
        if token in words.split():
            return ("Keyword", role)
    if keyword.iskeyword(token) or keyword.issoftkeyword(token):
        return ("Keyword", "Soft" if keyword.issoftkeyword(token) else "Flow")
    for kind, ops in OPERATOR_KINDS.items():
        if token in ops.split():
            return ("Operator", kind)
    if not token.isidentifier():
        return ("Operator", "Other")
    if token in vars(builtins):
        return ("Name", "Builtin", "Exception" if token[0].isupper() else "Function")
    if token.startswith("__") and token.endswith("__"):
        return ("Name", "Dunder")
    if token.startswith("_"):
        return ("Name", "Private")
    if len(token) == 1:
        return ("Name", "Letter")
    if token.isupper():
        return ("Name", "Constant")
    if token[0].isupper():
        return ("Name", "Class")
    return ("Name", "Snake")


def taxonomy_lines(tokens, drop_top: str | None = None) -> list[str]:
    """``child<TAB>parent`` lines of the token taxonomy (categories under "Token"), optionally without a branch."""
    lines, seen = [], set()
    for token in tokens:
        path = token_category(token)
        if path[0] == drop_top:
            continue
        # category names in brackets: never a token of the vocabulary (a class named "Name" exists)
        chain = ["[Token]", *(f"[{' > '.join(path[: i + 1])}]" for i in range(len(path)))]
        for parent, child in zip(chain[:-1], chain[1:], strict=True):
            if child not in seen:
                seen.add(child)
                lines.append(f"{child}\t{parent}")
        lines.append(f"{token}\t{chain[-1]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/helper_taxonomy"))
    parser.add_argument("--epochs", type=float, default=NodeRecipe.epochs)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = prepare_dataset()
    tokens, counts, dim = list(dataset.vocab.tokens), np.asarray(dataset.counts, dtype=np.float64), dataset.dim
    full = args.out / "python_tokens.taxonomy.tsv"
    full.write_text("\n".join(taxonomy_lines(tokens)) + "\n", encoding="utf-8")
    partial = args.out / "python_tokens_no_names.taxonomy.tsv"
    partial.write_text("\n".join(taxonomy_lines(tokens, drop_top="Name")) + "\n", encoding="utf-8")
    leaf_category = [" > ".join(token_category(t)) for t in tokens]
    sizes: dict[str, int] = {}
    for c in leaf_category:
        sizes[c] = sizes.get(c, 0) + 1
    mass = {c: float(counts[[y for y, d in enumerate(leaf_category) if d == c]].sum() / counts.sum()) for c in sizes}
    print(f"{len(tokens):,} classes, {len(sizes)} leaf categories:")
    for c in sorted(sizes, key=lambda c: -mass[c]):
        print(f"  {c:32s} {sizes[c]:6,d} classes {100 * mass[c]:6.2f}% of tokens")

    trees: dict[str, tuple[object, dict[int, int] | None]] = {}
    for name, classic in builders.classic_trees(counts, "huffman-2,huffman-4,huffman-16,adaptive", dim=dim).items():
        trees[name] = (classic.tree, classic.projections or None)
    started = time.perf_counter()
    tree, names = taxonomy_tree(full, tokens, counts)
    trees["taxonomy"] = (tree, None)
    save_tree(args.out / "taxonomy.tree.json", tree, labels=tokens, counts=counts, node_names=names,
              built_by={"builder": "from_taxonomy", "params": {"file": str(full)}})  # fmt: skip
    trees["taxonomy-names-by-freq"] = (taxonomy_tree(partial, tokens, counts, unknown="frequency")[0], None)
    build_seconds = time.perf_counter() - started
    for fanout, group_fanout in ((2, 2), (4, 4), (16, 4)):
        tree, _ = builders.from_categories(leaf_category, counts, fanout=fanout, group_fanout=group_fanout)
        trees[f"categories-{fanout}-{group_fanout}"] = (tree, None)

    rows = []
    recipe = NodeRecipe(epochs=args.epochs)
    for name, (tree, projections) in trees.items():
        result = evaluate(tree, dataset, recipe, projections=projections)
        cost = head_cost(tree, counts, dim, projections)
        row = {
            "tree": name,
            "internal_nodes": tree.num_internal,
            "max_fanout": int(tree.fanout.max()),
            "expected_depth": tree.expected_path_length(counts),
            "cost_ratio": cost / (len(tokens) * dim),
            "valid_nll": result.valid_nll,
            "seconds": result.train_seconds,
            "cached": result.cached,
            "error": result.error,
        }
        rows.append(row)
        print(
            f"{name:24s} nodes {row['internal_nodes']:6,d} fanout<= {row['max_fanout']:5d} "
            f"E[depth] {row['expected_depth']:6.3f} cost {100 * row['cost_ratio']:6.2f}% of full "
            f"valid NLL {row['valid_nll']:.4f} ({row['seconds']:.1f} s{', cached' if row['cached'] else ''})",
            flush=True,
        )
    print(f"taxonomy trees read and built from their files in {build_seconds:.2f} s")
    (args.out / "bench_taxonomy.json").write_text(json.dumps({"rows": rows, "recipe_epochs": args.epochs}, indent=1))


if __name__ == "__main__":
    main()
