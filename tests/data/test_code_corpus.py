import numpy as np
import pytest

from tree_search.data import CorpusConfig, DataError, load_stdlib_corpus
from tree_search.data.code_corpus import code_tokens, file_split


def test_code_tokens_collapse_strings_and_comments():
    source = b"def f(x):\n    # hi\n    return x + 'a' + \"b\"\n"
    assert code_tokens(source) == [
        "def", "f", "(", "x", ")", ":", "<nl>", "<comment>", "<indent>",
        "return", "x", "+", "<str>", "+", "<str>", "<nl>", "<dedent>",
    ]  # fmt: skip


def test_file_split_is_seeded_and_stable():
    names = [f"pkg/mod{k}.py" for k in range(2000)]
    splits = [file_split(n, 0, 0.1, 0.1) for n in names]
    assert splits == [file_split(n, 0, 0.1, 0.1) for n in names]
    assert splits != [file_split(n, 1, 0.1, 0.1) for n in names]
    share = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert share["valid"] == pytest.approx(0.1, abs=0.03) and share["test"] == pytest.approx(0.1, abs=0.03)


def test_corpus_from_a_folder_is_cached(code_folder):
    config = CorpusConfig(max_size=12, valid_fraction=0.2, test_fraction=0.2, seed=3)
    corpus = load_stdlib_corpus(config, root=code_folder, processes=1)
    assert len(corpus.vocab) == 12 and corpus.vocab.unk_id is not None
    assert corpus.info["files_skipped"] == ["broken.py"]
    assert sum(corpus.info["files"].values()) == 40  # site-packages ignored, broken skipped
    train_counts = np.bincount(corpus.splits["train"], minlength=12)
    assert np.array_equal(train_counts, corpus.vocab.counts)  # counts come from train only
    for name in ("valid", "test"):
        assert corpus.splits[name].size > 0 and corpus.splits[name].max() < 12
    # one document per file: each split's starts are the running sums of its files' token counts
    from tree_search.data.code_corpus import code_tokens, file_split, stdlib_files

    base, files = stdlib_files(code_folder)
    for name in ("train", "valid", "test"):
        mine = [f for f in files if f.name != "broken.py"
                and file_split(str(f.relative_to(base)), 3, 0.2, 0.2) == name]  # fmt: skip
        lengths = [len(code_tokens(f.read_bytes())) for f in mine]
        assert corpus.documents[name].tolist() == np.cumsum([0, *lengths])[:-1].tolist()
        assert corpus.info["documents"][name] == len(mine)
    again = load_stdlib_corpus(config, root=code_folder, processes=2)
    assert again.info["cache"] == corpus.info["cache"]
    assert all(np.array_equal(again.documents[k], corpus.documents[k]) for k in corpus.splits)
    assert all(np.array_equal(again.splits[k], corpus.splits[k]) for k in corpus.splits)
    # a changed file changes the key
    (code_folder / "mod0.py").write_text("x = 1\n")
    changed = load_stdlib_corpus(config, root=code_folder, processes=1)
    assert changed.info["cache"] != corpus.info["cache"]


def test_parallel_and_serial_tokenizing_agree(code_folder):
    config = CorpusConfig(max_size=None, valid_fraction=0.2, test_fraction=0.2)
    one = load_stdlib_corpus(config, root=code_folder, processes=1, use_cache=False)
    two = load_stdlib_corpus(config, root=code_folder, processes=2, use_cache=False)
    assert one.vocab == two.vocab
    assert all(np.array_equal(one.splits[k], two.splits[k]) for k in one.splits)


def test_an_interrupted_write_leaves_no_cache_entry(code_folder, monkeypatch):
    from tree_search.data import corpus as corpus_module
    from tree_search.data.cache import cache_root

    folder = cache_root() / "corpora"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "save_npy_atomic", explode)
    with pytest.raises(KeyboardInterrupt):
        load_stdlib_corpus(CorpusConfig(valid_fraction=0.2, test_fraction=0.2), root=code_folder, processes=1)
    assert not list(folder.iterdir())  # neither a half-written entry nor a staging folder


def test_too_few_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="at least 3"):
        load_stdlib_corpus(root=tmp_path)


def test_bad_split_fractions():
    with pytest.raises(DataError, match="leave files for training"):
        CorpusConfig(valid_fraction=0.5, test_fraction=0.5)
