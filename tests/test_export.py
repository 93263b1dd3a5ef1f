import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tree_search import builders
from tree_search.export import (
    TreeFileError,
    TreeRecord,
    load_codes_npz,
    load_tree,
    load_tree_json,
    save_codes_npz,
    save_tree,
    save_tree_json,
    tree_from_codes,
)
from tree_search.tree import Tree, TreeError


@pytest.fixture
def record() -> TreeRecord:
    counts = np.array([90, 50, 30, 20, 7, 3, 1, 0])
    tree = builders.huffman(counts, arity=3)
    return TreeRecord(
        tree,
        labels=("the", "a", "of", "ünïcode", "x", "<unk>", "tab\there", ""),
        counts=counts,
        built_by={"builder": "huffman", "params": {"arity": 3}},
        metrics={"valid_nll": 4.25, "cost_ratio": 0.5},
    )


def valid_document(record: TreeRecord) -> dict:
    return {
        "format": "tree_search.tree",
        "version": 1,
        "num_classes": record.tree.num_classes,
        "children": record.tree.children_lists(),
    }


# ---------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_round_trip_is_exact(tmp_path, record, suffix):
    path = save_tree(tmp_path / f"tree{suffix}", record)
    back = load_tree(path)
    assert back.tree == record.tree
    assert back.labels == record.labels
    assert np.array_equal(back.counts, record.counts)
    if suffix == ".json":
        assert back == record  # built_by and metrics too


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(V=st.integers(2, 80), arity=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_round_trip_of_random_trees(tmp_path, V, arity, seed):
    tree = builders.random_tree(V, seed=seed, max_arity=arity)
    assert load_tree_json(save_tree_json(tmp_path / "t.json", tree)).tree == tree
    assert load_codes_npz(save_codes_npz(tmp_path / "t.npz", tree)).tree == tree


def test_codes_are_word2vec_style(tmp_path):
    tree = builders.huffman([5, 1, 2, 8, 3])
    save_codes_npz(tmp_path / "c.npz", tree)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        points, codes, lengths = data["points"], data["codes"], data["lengths"]
    for y in range(5):
        path = tree.path(y)
        assert points[y, : lengths[y]].tolist() == [n for n, _ in path]
        assert codes[y, : lengths[y]].tolist() == [c for _, c in path]
        assert set(codes[y, : lengths[y]].tolist()) <= {0, 1}
        assert np.all(points[y, lengths[y] :] == -1)
    assert tree_from_codes(points, codes, lengths) == tree


def test_file_is_plain_versioned_json(tmp_path, record):
    document = json.loads(save_tree_json(tmp_path / "t.json", record).read_text())
    assert document["format"] == "tree_search.tree" and document["version"] == 1
    assert document["hash"] == record.tree.canonical_hash
    assert document["children"] == record.tree.children_lists()


def test_minimal_document_loads(tmp_path, record):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(valid_document(record)))
    loaded = load_tree_json(path)
    assert loaded.tree == record.tree and loaded.labels is None and loaded.counts is None


# ---------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"format": "something.else"}, "format", "expected 'tree_search.tree'"),
        ({"version": 2}, "version", "unsupported version 2"),
        ({"version": True}, "version", "unsupported version"),
        ({"extra": 1}, "extra", "unknown field"),
        ({"num_classes": "8"}, "num_classes", "expected an integer"),
        ({"num_classes": 1}, "num_classes", "expected an integer >= 2"),
        ({"num_classes": 9}, "children", "class 8 is not a leaf"),
        ({"children": []}, "children", "non-empty list"),
        ({"children": [[0, 1, 2, 3, 4, 5, 6, 7], 3]}, "children[1]", "expected a list"),
        ({"children": [[0, 1, 2, 3, 4, 5, 6, "7"]]}, "children[0][7]", "expected a node id"),
        ({"children": [[0, 1, 2, 3, 4, 5, 6, 7, 7]]}, "children", "class 7 appears 2 times"),
        ({"children": [[0, 1, 2, 3, 4, 5, 6, 9], [7]]}, "children", "internal node 1 has 1 child"),
        ({"hash": "0" * 64}, "hash", "does not match"),
        ({"labels": ["a"]}, "labels", "list of 8 strings"),
        ({"labels": ["a"] * 7 + [3]}, "labels[7]", "expected a string"),
        ({"counts": [1] * 7 + [-1]}, "counts[7]", "non-negative"),
        ({"counts": [1] * 7 + [10**400]}, "counts[7]", "finite"),
        ({"counts": "many"}, "counts", "list of 8"),
        ({"built_by": [1]}, "built_by", "JSON object"),
        ({"metrics": {"nll": "low"}}, "metrics.nll", "expected a number"),
    ],
)
def test_malformed_fields_are_named(tmp_path, record, change, field, message):
    document = valid_document(record) | change
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TreeFileError, match=message) as info:
        load_tree_json(path)
    assert info.value.field == field
    assert str(path) in str(info.value)


def test_missing_field(tmp_path, record):
    document = valid_document(record)
    del document["children"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(TreeFileError, match="'children': missing"):
        load_tree_json(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"format": NaN}', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(TreeFileError, match=message):
        load_tree_json(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(TreeFileError, match="cannot read"):
        load_tree_json(tmp_path / "nope.json")
    with pytest.raises(TreeFileError, match="unknown file type"):
        load_tree(tmp_path / "tree.txt")


def test_npz_never_loads_pickles(tmp_path, record):
    path = tmp_path / "evil.npz"
    np.savez(
        path,
        format=np.array("tree_search.codes"),
        version=np.array(1),
        points=np.array([object()]),
        codes=np.array([1]),
        lengths=np.array([1]),
    )
    with pytest.raises(TreeFileError, match="evil.npz"):
        load_codes_npz(path)


def test_malformed_npz(tmp_path, record):
    good = save_codes_npz(tmp_path / "good.npz", record)
    with np.load(good) as data:
        arrays = dict(data)
    for name in ("points", "codes", "lengths", "format"):
        broken = {k: v for k, v in arrays.items() if k != name}
        np.savez(tmp_path / "b.npz", **broken)
        with pytest.raises(TreeFileError, match=f"'{name}': missing"):
            load_codes_npz(tmp_path / "b.npz")
    codes = arrays["codes"].copy()
    codes[0, 0] = 7  # a child position that does not exist
    np.savez(tmp_path / "b.npz", **(arrays | {"codes": codes}))
    with pytest.raises(TreeFileError, match="b.npz"):
        load_codes_npz(tmp_path / "b.npz")
    (tmp_path / "t.npz").write_bytes(good.read_bytes()[:100])
    with pytest.raises(TreeFileError, match="t.npz"):
        load_codes_npz(tmp_path / "t.npz")


@pytest.mark.parametrize(
    ("points", "codes", "lengths", "message"),
    [
        ([[0, -1], [0, -1]], [[0, -1], [0, -1]], [1, 1], "two different children at position 0"),
        ([[0, -1], [0, -1]], [[0, -1], [2, -1]], [1, 1], "gap in its child positions"),
        ([[1, -1], [1, -1]], [[0, -1], [1, -1]], [1, 1], "start at the root"),
        ([[0, 1], [0, -1]], [[0, -1], [1, -1]], [1, 1], "-1 beyond it"),
    ],
)
def test_tree_from_codes_rejects_inconsistent_paths(points, codes, lengths, message):
    with pytest.raises(TreeError, match=message):
        tree_from_codes(np.array(points), np.array(codes), np.array(lengths))


# ---------------------------------------------------------------------- fuzzing the loader

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30,
)


def loads_or_names_the_problem(path) -> None:
    try:
        record = load_tree_json(path)
    except TreeFileError as err:
        assert str(path) in str(err)
        return
    record.tree.validate()
    assert sorted(record.tree.child_ids[record.tree.child_ids < record.tree.num_classes].tolist()) == list(
        range(record.tree.num_classes)
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_fuzz_arbitrary_json(tmp_path, value):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(value))
    loads_or_names_the_problem(path)


document_fields = st.fixed_dictionaries(
    {},
    optional={
        "format": st.just("tree_search.tree") | json_values,
        "version": st.just(1) | json_values,
        "num_classes": st.integers(-2, 12) | json_values,
        "children": st.lists(st.lists(st.integers(-1, 20), max_size=5), max_size=6) | json_values,
        "hash": json_values,
        "labels": st.lists(st.text(max_size=3), max_size=10) | json_values,
        "counts": st.lists(st.integers(-1, 5) | st.floats(), max_size=10) | json_values,
        "built_by": json_values,
        "metrics": st.dictionaries(st.text(max_size=4), st.floats() | st.integers()) | json_values,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=document_fields)
def test_fuzz_documents_near_the_schema(tmp_path, fields):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(fields))
    loads_or_names_the_problem(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncated_and_bit_flipped_files(tmp_path, data):
    V = data.draw(st.integers(2, 40))
    tree = builders.random_tree(V, seed=data.draw(st.integers(0, 1000)), max_arity=4)
    counts = data.draw(st.lists(st.integers(0, 100), min_size=V, max_size=V))
    path = save_tree_json(tmp_path / "t.json", tree, labels=[f"w{i}" for i in range(V)], counts=counts)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
    loads_or_names_the_problem(path)


def test_fuzz_npz_corruption(tmp_path, record):
    rng = np.random.default_rng(0)
    good = save_codes_npz(tmp_path / "good.npz", record).read_bytes()
    for trial in range(2000):
        raw = bytearray(good)
        if trial % 2:
            raw = raw[: rng.integers(0, len(raw))]
        else:
            for position in rng.integers(0, len(raw), size=3):
                raw[position] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / "c.npz"
        path.write_bytes(bytes(raw))
        try:
            loaded = load_codes_npz(path)
        except TreeFileError:
            continue
        loaded.tree.validate()


def test_zip_bomb_like_names_are_not_executed(tmp_path):
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("points.npy", b"not an array")
    with pytest.raises(TreeFileError):
        load_codes_npz(path)


def test_record_validates_its_fields():
    tree = Tree(3, [[0, 1, 2]])
    with pytest.raises(ValueError, match="labels must be 3 strings"):
        TreeRecord(tree, labels=("a", "b"))
    with pytest.raises(ValueError, match="counts must be 3"):
        TreeRecord(tree, counts=[1, 2, float("inf")])
