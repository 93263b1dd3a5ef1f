from collections import Counter

import numpy as np
import pytest

from tree_search.data import UNK, DataError, Vocab, load_vocab, read_counts_tsv


def test_ids_by_descending_count_then_token_and_unk_folding():
    counter = Counter({"b": 5, "a": 5, "c": 9, "d": 1, "e": 1})
    vocab = Vocab.from_counter(counter, min_count=2)
    assert vocab.tokens == ("c", "a", "b", UNK)
    assert vocab.counts.tolist() == [9, 5, 5, 2]
    assert vocab.unk_id == 3
    assert vocab.encode(["a", "zzz", "c"]).tolist() == [1, 3, 0]
    capped = Vocab.from_counter(counter, max_size=3)
    assert capped.tokens == ("c", UNK, "a") and capped.counts.tolist() == [9, 7, 5]
    everything = Vocab.from_counter(counter)
    assert everything.unk_id is None and len(everything) == 5
    with pytest.raises(DataError, match="no '<unk>' class"):
        everything.encode(["zzz"])


def test_order_does_not_depend_on_reading_order():
    a = Vocab.from_counter(dict([("x", 3), ("y", 3), ("z", 1)]))
    b = Vocab.from_counter(dict([("z", 1), ("y", 3), ("x", 3)]))
    assert a == b


def test_bad_vocab_arguments():
    with pytest.raises(DataError, match="at least 2 classes"):
        Vocab.from_counter({"only": 3})
    with pytest.raises(DataError, match="twice"):
        Vocab(("a", "a"), np.array([1, 2]))
    with pytest.raises(DataError, match="2 tokens but 3 counts"):
        Vocab(("a", "b"), np.array([1, 2, 3]))


def test_json_round_trip_and_errors(tmp_path):
    vocab = Vocab.from_counter({"ünï": 4, "b": 2, "c": 1}, max_size=2, source={"corpus": "test"})
    path = vocab.save_json(tmp_path / "vocab.json")
    assert load_vocab(path) == vocab
    path.write_text('{"format": "tree_search.vocab", "version": 1, "tokens": ["a", "b"], "counts": [1, -2]}')
    with pytest.raises(DataError, match=r"vocab.json: field 'counts\[1\]'"):
        load_vocab(path)
    path.write_text('{"format": "tree_search.vocab", "version": 1, "tokens": ["a"], "counts": [1], "x": 0}')
    with pytest.raises(DataError, match="field 'x': unknown field"):
        load_vocab(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_vocab(path)


def test_counts_tsv(tmp_path):
    path = tmp_path / "counts.tsv"
    path.write_text("the\t10\nof\t7\n\nrare\t0\n<unk>\t3\n")
    vocab = read_counts_tsv(path)
    assert vocab.tokens == ("the", "of", UNK, "rare")
    assert vocab.counts.tolist() == [10, 7, 3, 0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("the\t10\nof 7\n", "line 2: expected 'token<TAB>count'"),
        ("the\t10\nof\tseven\n", "line 2: count 'seven' is not an integer"),
        ("the\t10\nof\t-1\n", "line 2: count -1 is negative"),
        ("the\t10\nthe\t1\n", "line 2: token 'the' already on line 1"),
        ("", "needs at least 2"),
        ("a\tb\tc\n", "line 1"),
    ],
)
def test_counts_tsv_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "counts.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_counts_tsv(path)
    assert "counts.tsv" in str(info.value)


def test_counts_tsv_not_utf8(tmp_path):
    path = tmp_path / "counts.tsv"
    path.write_bytes(b"a\t1\n\xff\t2\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_counts_tsv(path)
