import json
from pathlib import Path

import pytest

from tree_search.data import DataError, dataset_names, name_dataset, remove_dataset, resolve_dataset
from tree_search.data.cache import cache_root
from tree_search.data.names import default_dataset_name


def _prepared(key: str) -> Path:
    folder = cache_root() / "features" / key
    folder.mkdir(parents=True)
    (folder / "info.json").write_text("{}")
    return folder


def _derived(parent: str, name: str, file: str, dataset: str) -> Path:
    folder = cache_root() / parent / name
    folder.mkdir(parents=True)
    (folder / file).write_text(json.dumps({"dataset": dataset}))
    return folder


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (["data/wiki.train.txt", "data/wiki.valid.txt", "data/wiki.test.txt"], "wiki"),
        (["news/train.txt", "news/valid.txt", "news/test.txt"], "news"),  # no common start: the folder
        (["my corpus (v2).txt"], "my-corpus-v2"),
        (["builtin.txt"], "text"),  # a reserved word never becomes a name
    ],
)
def test_default_names_come_from_the_file_names(sources, expected):
    assert default_dataset_name([Path(s) for s in sources]) == expected


def test_a_default_name_is_kept_and_made_unique(tmp_path, monkeypatch):
    first, second = _prepared("aaaa"), _prepared("bbbb")
    assert name_dataset(first, sources=[Path("wiki.txt")]) == "wiki"
    assert name_dataset(first, sources=[Path("other.txt")]) == "wiki"  # the folder keeps its name
    assert name_dataset(second, sources=[Path("wiki.txt")]) == "wiki-2"
    assert name_dataset(second, "renamed") == "renamed"  # an explicit name replaces the folder's old one
    assert dataset_names() == {"renamed": second, "wiki": first}
    assert resolve_dataset("renamed") == str(second) and resolve_dataset("builtin") == "builtin"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "renamed").mkdir()  # a folder of the same name here: the name wins, ./renamed is the folder
    assert resolve_dataset("renamed") == str(second) and resolve_dataset("./renamed") == "./renamed"
    with pytest.raises(DataError, match="'wiki' already names"):
        name_dataset(second, "wiki")
    with pytest.raises(DataError, match="reserved"):
        name_dataset(second, "planted")
    with pytest.raises(DataError, match="not a prepared feature folder"):
        name_dataset(cache_root() / "elsewhere", "x")


def test_removing_a_dataset_removes_what_was_derived_from_it_only():
    mine, theirs = _prepared("aaaa"), _prepared("bbbb")
    name_dataset(mine, "mine")
    name_dataset(theirs, "theirs")
    my_bank = _derived("nodes", "n1", "namespace.json", "aaaa")
    my_reference = _derived("references", "r1", "info.json", "aaaa")
    their_bank = _derived("nodes", "n2", "namespace.json", "bbbb")
    folder, names, derived = remove_dataset("mine")
    assert (folder, names, sorted(derived)) == (mine, ["mine"], sorted([my_bank, my_reference]))
    assert not mine.exists() and not my_bank.exists() and not my_reference.exists()
    assert theirs.exists() and their_bank.exists() and dataset_names() == {"theirs": theirs}
    assert remove_dataset("bbbb")[1] == ["theirs"]  # by folder key too
    with pytest.raises(DataError, match="no prepared dataset"):
        remove_dataset("mine")
    with pytest.raises(DataError, match=r"'mine': not 'builtin'"):
        resolve_dataset("mine")
