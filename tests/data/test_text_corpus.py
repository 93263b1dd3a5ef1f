import numpy as np
import pytest

from tree_search.data import CorpusConfig, DataError, load_text_corpus
from tree_search.data.text_corpus import EOS

WIKITEXT = """ = Valkyria Chronicles III = 

 Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a tactical role @-@ playing game .
 The game began development in 2010 , carrying over a large portion of the work .
"""  # noqa: W291


def test_three_files_wikitext_conventions_kept(tmp_path):
    for name in ("train", "valid", "test"):
        (tmp_path / f"wiki.{name}.tokens").write_text(WIKITEXT, encoding="utf-8")
    corpus = load_text_corpus(*(tmp_path / f"wiki.{n}.tokens" for n in ("train", "valid", "test")))
    tokens = corpus.vocab.tokens
    assert "@-@" in tokens and "<unk>" in tokens and "戦場のヴァルキュリア3" in tokens and EOS in tokens
    assert corpus.vocab.counts[corpus.vocab.index[EOS]] == 3  # three non-blank lines
    assert corpus.info["lines"] == {"train": 3, "valid": 3, "test": 3}
    first_line = [corpus.vocab.tokens[i] for i in corpus.splits["train"][:5]]
    assert first_line == ["=", "Valkyria", "Chronicles", "III", "="]


def test_one_file_is_split_by_seeded_blocks_and_counts_come_from_train(tmp_path):
    path = tmp_path / "ptb.train.txt"
    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(50)]
    path.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(5000)) + "\n")
    config = CorpusConfig(max_size=30, valid_fraction=0.1, test_fraction=0.1, seed=1)
    corpus = load_text_corpus(path, config=config)
    lines = corpus.info["lines"]
    assert sum(lines.values()) == 5000 and lines["valid"] % 100 == 0 and lines["valid"] > 0
    assert np.array_equal(np.bincount(corpus.splits["train"], minlength=30), corpus.vocab.counts)
    assert len(corpus.vocab) == 30
    # documents are the blocks of 100 lines (9 tokens each: 8 words and <eos>)
    for name in ("train", "valid", "test"):
        assert corpus.documents[name].tolist() == list(range(0, lines[name] * 9, 900))
    again = load_text_corpus(path, config=config)
    assert again.info["cache"] == corpus.info["cache"]
    other_seed = load_text_corpus(path, config=CorpusConfig(valid_fraction=0.1, test_fraction=0.1, seed=2))
    assert other_seed.info["lines"] != lines


def test_form_feed_lines_mark_documents_which_are_split_and_resampled_whole(tmp_path):
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 260, size=60)  # documents of 1 to 259 lines: not multiples of the 100-line blocks
    # document i's lines read "a{i // 8} b{i % 8} x": words every split's vocabulary has (train's counts)
    text = "\f\n".join("".join(f"a{i // 8} b{i % 8} x\n" for _ in range(n)) for i, n in enumerate(lengths))
    path = tmp_path / "docs.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_text_corpus(path, config=CorpusConfig(max_size=100, valid_fraction=0.2, test_fraction=0.2, seed=3))
    tokens = corpus.vocab.tokens
    assert corpus.info["document_units"] == "form feed lines"
    seen = []
    for name in ("train", "valid", "test"):
        ids, starts = corpus.splits[name], corpus.documents[name]
        for lo, hi in zip(starts, [*starts[1:], ids.size], strict=True):
            words = sorted({tokens[k] for k in ids[lo:hi]} - {"x", EOS})
            assert len(words) == 2, (name, words)  # a document of the split is one source document ...
            i = 8 * int(words[0][1:]) + int(words[1][1:])
            assert hi - lo == 4 * lengths[i]  # ... whole: every line of it (3 words and <eos> per line)
            seen.append(i)
    assert sorted(seen) == list(range(lengths.size))  # each source document in exactly one split, once
    # the same lines without marks keep the 100-line blocks (and their own cache key)
    plain = tmp_path / "plain.txt"
    plain.write_text(text.replace("\f\n", ""), encoding="utf-8")
    blocks = load_text_corpus(plain, config=CorpusConfig(max_size=100, valid_fraction=0.2, test_fraction=0.2, seed=3))
    assert blocks.info["document_units"] == "blocks of 100 lines" and blocks.info["key"] != corpus.info["key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"fine line\nbad \xff byte\n", r"not UTF-8 text: line 2, byte offset 14"),
        (b"just one short line\n", "split has no tokens"),
    ],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_text_corpus(path)
    assert "corpus.txt" in str(info.value)


def test_valid_without_test_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("a b\n")
    with pytest.raises(DataError, match="both --valid and --test"):
        load_text_corpus(tmp_path / "a.txt", tmp_path / "a.txt")
