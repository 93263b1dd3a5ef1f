"""Taxonomy and category trees: builders, the taxonomy file reader, node names in tree files, the split env's start."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tree_search import builders
from tree_search.builders import TaxonomyError, from_categories, from_taxonomy
from tree_search.data.taxonomy import load_taxonomy, taxonomy_tree
from tree_search.data.vocab import DataError
from tree_search.export import TreeFileError, TreeRecord, load_tree, save_tree
from tree_search.tree import Tree

# A small code-token taxonomy: Token -> {Keyword -> {Flow, Def}, Operator, Literal -> Number}
PAIRS = [
    ("if", "Flow"),
    ("for", "Flow"),
    ("while", "Flow"),
    ("def", "Def"),
    ("class", "Def"),
    ("Flow", "Keyword"),
    ("Def", "Keyword"),
    ("+", "Operator"),
    ("-", "Operator"),
    ("*", "Operator"),
    ("1", "Number"),
    ("2", "Number"),
    ("Number", "Literal"),  # Literal's only child: collapsed into one node "Literal/Number"
    ("Keyword", "Token"),
    ("Operator", "Token"),
    ("Literal", "Token"),
    ("x", "Name"),  # Name's only child is a class: x moves up under Token
    ("Name", "Token"),
]
LABELS = ["if", "for", "while", "def", "class", "+", "-", "*", "1", "2", "x"]


def leaves_below(tree: Tree) -> list[set[int]]:
    """Classes below each internal node, by brute force over the children lists."""
    V, rows = tree.num_classes, tree.children_lists()
    out: list[set[int]] = [set() for _ in rows]
    for u in reversed(range(len(rows))):  # children have larger ids
        for c in rows[u]:
            out[u] |= {c} if c < V else out[c - V]
    return out


def classes_of_category(pairs, labels) -> dict[str, set[int]]:
    parent = dict(pairs)
    index = {t: y for y, t in enumerate(labels)}
    out: dict[str, set[int]] = {}
    for child in parent:
        if child in index:
            node = parent[child]
            while node is not None:
                out.setdefault(node, set()).add(index[child])
                node = parent.get(node)
    return out


def node_by_name(names, name) -> int:
    return names.index(name)


# ---------------------------------------------------------------------- from_taxonomy


def test_taxonomy_tree_matches_the_parent_relation():
    tree, names = from_taxonomy(PAIRS, LABELS)
    assert tree.num_classes == len(LABELS) and len(names) == tree.num_internal
    below = leaves_below(tree)
    expected = classes_of_category(PAIRS, LABELS)
    assert names[0] == "Token" and below[0] == set(range(len(LABELS)))
    for name in ("Keyword", "Flow", "Def", "Operator"):
        assert below[node_by_name(names, name)] == expected[name]
    # single-child categories: Literal -> Number collapsed into one node, Name -> x gives x under the root
    assert "Literal/Number" in names and "Literal" not in names and "Number" not in names
    assert below[node_by_name(names, "Literal/Number")] == {8, 9}
    assert "Name" not in names and tree.leaf_parent[LABELS.index("x")] == 0
    # children keep the order of their pairs
    assert tree.children(node_by_name(names, "Flow")).tolist() == [0, 1, 2]
    assert [names[c - tree.num_classes] for c in tree.children(0) if c >= tree.num_classes] == [
        "Keyword",
        "Operator",
        "Literal/Number",
    ]


def test_mapping_and_pairs_give_the_same_tree():
    assert from_taxonomy(dict(PAIRS), LABELS) == from_taxonomy(PAIRS, LABELS)


def test_chain_of_single_children_is_collapsed_under_a_joined_name():
    pairs = [("a", "C"), ("b", "C"), ("C", "B"), ("B", "A"), ("c", "D"), ("d", "D"), ("D", "A"), ("A", "Root")]
    tree, names = from_taxonomy(pairs, ["a", "b", "c", "d"])
    # Root has one child A (collapsed into the root), B has one child C
    assert names == ("Root/A", "B/C", "D")
    assert tree.children_lists() == [[5, 6], [0, 1], [2, 3]]


def test_unknown_catch_all_holds_exactly_the_absent_classes():
    labels = [*LABELS, "zzz", "yyy", "www"]
    counts = np.arange(len(labels), 0, -1)
    tree, names = from_taxonomy(PAIRS, labels, counts, unknown="catch-all", catch_all="<other>")
    other = node_by_name(names, "<other>")
    assert leaves_below(tree)[other] == {11, 12, 13}
    assert tree.node_parent[other] == 0
    # inside the catch-all: the Huffman tree of their counts
    sub = builders.huffman(counts[[11, 12, 13]])
    assert sorted(tree.depth[[11, 12, 13]] - tree.node_depth[other]) == sorted(sub.depth.tolist())


def test_unknown_frequency_puts_a_frequent_unknown_class_near_the_root():
    labels = [*LABELS, "hot", "cold"]
    counts = np.ones(len(labels))
    counts[labels.index("hot")] = 1000.0  # more than the whole taxonomy
    counts[labels.index("cold")] = 0.01
    tree, names = from_taxonomy(PAIRS, labels, counts, unknown="frequency")
    assert tree.depth[labels.index("hot")] == 1
    assert tree.depth[labels.index("cold")] > tree.depth[labels.index("hot")]
    below, expected = leaves_below(tree), classes_of_category(PAIRS, LABELS)
    for name in ("Keyword", "Flow", "Def", "Operator"):  # the categories keep their subtrees
        assert below[node_by_name(names, name)] == expected[name]
    assert names[0] == "Token" and None in names  # the Huffman merge nodes are unnamed


def test_unknown_error_names_the_absent_classes():
    with pytest.raises(TaxonomyError, match=r"1 vocabulary class\(es\) are not in the taxonomy \('zzz'\)"):
        from_taxonomy(PAIRS, [*LABELS, "zzz"], unknown="error")


@pytest.mark.parametrize(
    ("pairs", "labels", "message", "entry"),
    [
        ([("a", "R"), ("b", "R"), ("a", "S"), ("S", "R")], ["a", "b"], r"'a' is given twice", 2),
        ([("a", "A"), ("b", "A"), ("A", "B"), ("B", "A")], ["a", "b"], r"cycle: 'A' -> 'B' -> 'A'", 2),
        ([("a", "A"), ("b", "A"), ("A", "A")], ["a", "b"], r"'A' is its own parent", 2),
        ([("a", "R"), ("b", "R"), ("c", "Typo")], ["a", "b", "c"], r"exactly one root.*found 2: 'R', 'Typo'", 2),
        ([("a", "R"), ("b", "R"), ("c", "R")], ["a", "b"], r"class 'c' is not in the vocabulary", 2),
        (  # every missing class is listed, the first one's line is the entry
            [("a", "R"), ("q", "R"), ("b", "R"), ("r", "R"), ("s", "R")],
            ["a", "b"],
            r"3 of its 5 classes are not in the vocabulary \(2 labels\): 'q', 'r', 's'; remove those lines",
            1,
        ),
        (
            [("a", "R"), ("b", "R"), ("x", "b")],
            ["a", "b", "x"],
            r"'b' is a class of the vocabulary and also a category",
            2,
        ),
        ([("a", "R"), ("b", 3)], ["a", "b"], r"entry 1: expected a \(child, parent\) pair", 1),
    ],
)
def test_taxonomy_errors_name_the_entry(pairs, labels, message, entry):
    with pytest.raises(TaxonomyError, match=message) as caught:
        from_taxonomy(pairs, labels)
    assert caught.value.entry == entry


def test_a_taxonomy_of_no_token_of_the_vocabulary_is_an_error_even_when_extra_classes_are_ignored():
    for extra in ("error", "ignore"):
        with pytest.raises(TaxonomyError, match=r"none of its 2 classes is a token of the vocabulary.*'cat', 'dog'"):
            from_taxonomy([("cat", "Animal"), ("dog", "Animal")], ["a", "b"], extra=extra)


def test_duplicate_label_and_extra_ignore():
    with pytest.raises(TaxonomyError, match="label 'a' is given twice"):
        from_taxonomy([("a", "R"), ("b", "R")], ["a", "b", "a"])
    tree, names = from_taxonomy([("a", "R"), ("b", "R"), ("gone", "G"), ("G", "R")], ["a", "b"], extra="ignore")
    assert tree.children_lists() == [[0, 1]] and names == ("R",)  # G lost its only class: dropped


# ---------------------------------------------------------------------- from_categories


def test_categories_form_subtrees_merged_by_group_mass():
    rng = np.random.default_rng(0)
    V = 40
    counts = rng.integers(1, 1000, V).astype(float)
    cats = [f"c{y % 5}" if y % 7 else None for y in range(V)]
    tree, names = from_categories(cats, counts, fanout=3, group_fanout=2)
    below = leaves_below(tree)
    groups = {c: {y for y in range(V) if cats[y] == c} for c in set(cats) - {None}}
    for c, ys in groups.items():
        node = node_by_name(names, c)
        assert below[node] == ys
        depth_in_group = tree.depth[sorted(ys)] - tree.node_depth[node]  # inside: 3-ary Huffman of the counts
        assert np.array_equal(depth_in_group, builders.huffman(counts[sorted(ys)], 3).depth)
    # above the groups: the binary Huffman tree of the group masses (uncategorised classes are groups of one)
    items = [frozenset(ys) for ys in groups.values()] + [frozenset({y}) for y in range(V) if cats[y] is None]
    mass = np.array([counts[list(s)].sum() for s in items])
    top = builders.huffman(mass, 2)
    for k, s in enumerate(items):
        y = min(s)
        depth_of_group = tree.node_depth[node_by_name(names, cats[y])] if cats[y] else tree.depth[y]
        assert depth_of_group == top.depth[k]
    assert names[0] == "<root>"


def test_categories_from_a_mapping_and_errors():
    labels = ["a", "b", "c", "d"]
    tree, names = from_categories({"a": "X", "b": "X"}, [4, 3, 2, 1], labels=labels)
    assert leaves_below(tree)[node_by_name(names, "X")] == {0, 1}
    with pytest.raises(TaxonomyError, match="'zz', which is not one of the labels"):
        from_categories({"zz": "X"}, [4, 3, 2, 1], labels=labels)
    with pytest.raises(ValueError, match="categories has 3 entries but counts has 4"):
        from_categories(["X", "X", "Y"], [4, 3, 2, 1])


# ---------------------------------------------------------------------- the file reader


def write_tsv(path, pairs, extra_lines=()):
    path.write_text("\n".join([*extra_lines, *(f"{c}\t{p}" for c, p in pairs)]) + "\n", encoding="utf-8")
    return path


def test_tsv_and_json_files_give_the_builder_tree(tmp_path):
    expected = from_taxonomy(PAIRS, LABELS)
    tsv = write_tsv(tmp_path / "t.tsv", PAIRS, extra_lines=["# a comment", ""])
    as_json = tmp_path / "t.json"
    as_json.write_text(json.dumps(dict(PAIRS), indent=1), encoding="utf-8")
    assert taxonomy_tree(tsv, LABELS) == expected
    assert taxonomy_tree(as_json, LABELS) == expected
    loaded = load_taxonomy(tsv)
    assert loaded.pairs == tuple(PAIRS) and loaded.lines[0] == 3  # after the comment and the empty line


def test_tsv_keeps_spaces_and_a_hash_class_and_reads_crlf(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"#\tOp\r\n a b\tOp\r\n")
    assert load_taxonomy(path).pairs == (("#", "Op"), (" a b", "Op"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a\tR\nb\tR\na\tS\nS\tR\n", r"t\.tsv:3: 'a' is given twice"),
        ("a\tA\nb\tA\nA\tB\nB\tA\n", r"t\.tsv:3: the parents form a cycle"),
        ("a\tR\nb\tR\nc\tTypo\n", r"t\.tsv:3: a taxonomy has exactly one root"),
        ("a\tR\nb\tR\nq\tR\n", r"t\.tsv:3: class 'q' is not in the vocabulary"),
        ("a\tR\nb R\n", r"t\.tsv:2: expected 'child<TAB>parent' \(2 tab-separated fields\), got 1"),
        ("a\tR\n\tR\n", r"t\.tsv:2: field 'child' is empty"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        taxonomy_tree(path, ["a", "b"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{\n "a": "R",\n "b": "R",\n "a": "S"\n}', r"t\.json:4: field 'a' is given twice \(first on line 2\)"),
        ('{\n "a": "R",\n "b": 3\n}', r"t\.json:3: field 'b': the parent must be a non-empty string"),
        ('[["a", "R"], ["b", "R"]]', r"t\.json:1: expected one JSON object"),
        ('{"a": "R",\n "b": }', r"t\.json:2: not valid JSON"),
        ('{\n "a": "A",\n "b": "A",\n "A": "B",\n "B": "A"\n}', r"t\.json:4: the parents form a cycle"),
    ],
)
def test_json_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        taxonomy_tree(path, ["a", "b"])


def test_reader_rejects_unknown_suffix_and_bad_utf8(tmp_path):
    with pytest.raises(DataError, match="unknown taxonomy file type '.csv'"):
        load_taxonomy(tmp_path / "t.csv")
    bad = tmp_path / "t.tsv"
    bad.write_bytes(b"a\tR\nb\xff\tR\n")
    with pytest.raises(DataError, match=r"t\.tsv:2: not UTF-8"):
        load_taxonomy(bad)


# ---------------------------------------------------------------------- node names in tree files


def test_node_names_round_trip_through_tree_json(tmp_path):
    tree, names = from_taxonomy(PAIRS, LABELS)
    record = TreeRecord(tree, labels=tuple(LABELS), node_names=names)
    back = load_tree(save_tree(tmp_path / "tax.json", record))
    assert back == record and back.node_names == names


def test_files_without_names_load_and_do_not_write_the_field(tmp_path):
    tree = builders.huffman([5, 3, 2, 1])
    path = save_tree(tmp_path / "plain.json", tree)
    assert "node_names" not in json.loads(path.read_text())  # older readers reject unknown fields
    assert load_tree(path).node_names is None


@pytest.mark.parametrize(
    ("names", "field", "message"),
    [
        (["r", "a"], "node_names", "expected a list of 3 strings or nulls"),
        (["r", None, 7], "node_names[2]", "expected a string or null, got 7"),
        ("rab", "node_names", "expected a list of 3 strings or nulls"),
    ],
)
def test_bad_node_names_in_a_file_name_the_field(tmp_path, names, field, message):
    tree = builders.huffman([5, 3, 2, 1])
    path = save_tree(tmp_path / "t.json", tree)
    document = json.loads(path.read_text())
    document["node_names"] = names
    path.write_text(json.dumps(document))
    with pytest.raises(TreeFileError, match=message) as caught:
        load_tree(path)
    assert caught.value.field == field


def test_record_validates_node_names():
    tree = builders.huffman([5, 3, 2, 1])
    with pytest.raises(ValueError, match="node_names must be 3 strings or None"):
        TreeRecord(tree, node_names=("a",))


# ---------------------------------------------------------------------- the split environment's taxonomy start


@pytest.fixture(scope="module")
def planted_env_setup(tmp_path_factory):
    """A planted task (classes "0".."V-1") and a taxonomy file written from its oracle tree."""
    from tree_search.data.planted import PlantedConfig, make_planted
    from tree_search.envs import TreeEnvConfig
    from tree_search.reward import NodeRecipe

    planted = PlantedConfig(num_classes=300, dim=8, num_train=3_000, num_valid=500, num_test=500)
    oracle = make_planted(planted).tree
    V = oracle.num_classes
    lines = [f"{c if c < V else f'n{c - V}'}\tn{u}" for u in range(oracle.num_internal) for c in oracle.children(u)]
    path = tmp_path_factory.mktemp("taxonomy") / "oracle.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = TreeEnvConfig(
        dataset="planted", planted=planted, train=NodeRecipe(steps=4, measurements=1), taxonomy=str(path)
    )
    return oracle, config


class _FakeReward:
    def __init__(self):
        self.trees = []

    def __call__(self, tree, projections=None):
        from tree_search.reward.reward import Result

        self.trees.append(tree)
        nll = 3.0 + 0.01 * tree.max_depth
        return Result(tree.canonical_hash, nll, 0.0, math.exp(nll), 0.0, 0.0, 1.0, 0.1, 0.0, 1, "cpu", (0,))


def test_split_env_taxonomy_start_passes_the_checker_and_keeps_the_upper_part(planted_env_setup):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    oracle, config = planted_env_setup
    check_env(gym.make("TreeSearch/Split-v1", config=config, reward_fn=_FakeReward()).unwrapped)
    reward = _FakeReward()
    env = gym.make("TreeSearch/Split-v1", config=config, reward_fn=reward).unwrapped
    observation, info = env.reset(seed=0)
    assert observation["observations"][4] == pytest.approx(0.1)  # the first group is at depth 1, not the root
    assert observation["observations"][0] < 1.0  # and smaller than the whole vocabulary
    done, steps, sampler = False, 0, np.random.default_rng(0)
    while not done:
        action = int(sampler.choice(np.flatnonzero(info["action_mask"])))
        observation, _, done, _, info = env.step(action)
        steps += 1
    tree = info["tree"]
    V = oracle.num_classes
    # the root is the taxonomy's root: its children hold exactly the classes of the oracle root's children
    expected = sorted(sorted(s) for s in (leaves_below(oracle)[c - V] for c in oracle.children(0)))
    got = sorted(sorted(leaves_below(tree)[c - V]) for c in tree.children(0))
    assert got == expected and tree.fanout[0] == oracle.fanout[0]
    assert steps >= 1 and reward.trees[-1] is tree


def test_split_env_taxonomy_level_two_and_bad_levels(planted_env_setup):
    oracle, config = planted_env_setup
    from tree_search.envs.split import SplitEnv

    env = SplitEnv(config.with_updates(taxonomy_level=2, split_min_group=8, max_steps=3), reward_fn=_FakeReward())
    _, info = env.reset(seed=0)
    assert len(env._queue) == np.sum(oracle.node_depth == 2)  # every depth-2 group (> 8 classes) is open
    fixed = oracle.node_depth < 2
    mass = oracle.subtree_sums(env.mass)
    assert env._committed == pytest.approx(float(oracle.fanout[fixed] @ mass[fixed]))  # the fixed part's cost
    done = False
    while not done:
        _, _, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[0]))
    tree = info["tree"]
    # the two fixed levels: the same class sets at depths 1 and 2 as the oracle's
    for depth in (1, 2):
        want = sorted(sorted(s) for s, d in zip(leaves_below(oracle), oracle.node_depth, strict=True) if d == depth)
        got = sorted(sorted(s) for s, d in zip(leaves_below(tree), tree.node_depth, strict=True) if d == depth)
        assert got == want
    with pytest.raises(ValueError, match="taxonomy_level=9: the tree of .* has no internal node at that depth"):
        SplitEnv(config.with_updates(taxonomy_level=9), reward_fn=_FakeReward())
    with pytest.raises(ValueError, match="no group of .* has more than split_min_group=64"):
        SplitEnv(config.with_updates(taxonomy_level=3), reward_fn=_FakeReward())
    with pytest.raises(ValueError, match="TreeEnvConfig.taxonomy_unknown must be one of"):
        config.with_updates(taxonomy_unknown="nowhere")
    with pytest.raises(DataError, match="missing.tsv: cannot read"):
        SplitEnv(config.with_updates(taxonomy="missing.tsv"), reward_fn=_FakeReward())


def test_split_env_taxonomy_start_with_classes_above_the_level(planted_env_setup, tmp_path):
    """Three flat categories plus three classes right under the root: the groups are exactly the categories."""
    from tree_search.envs.split import SplitEnv

    oracle, config = planted_env_setup
    V = oracle.num_classes
    category = ["root" if y < 3 else "ABC"[y % 3] for y in range(V)]
    lines = [f"{y}\t{c}" for y, c in enumerate(category)] + [f"{c}\troot" for c in "ABC"]
    path = tmp_path / "flat.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = SplitEnv(config.with_updates(taxonomy=str(path)), reward_fn=_FakeReward())
    _, info = env.reset(seed=0)
    groups = {tuple(sorted(members.tolist())) for members, _ in env._groups.values()}
    assert groups == {tuple(y for y in range(3, V) if category[y] == c) for c in "ABC"}
    assert sorted(c for c in env._children[0] if c < V) == [0, 1, 2]
    done = False
    while not done:
        _, _, done, _, info = env.step(int(np.flatnonzero(info["action_mask"])[-2]))
    assert sorted(info["tree"].children(0).tolist())[:3] == [0, 1, 2]
