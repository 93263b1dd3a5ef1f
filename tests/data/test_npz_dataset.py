import numpy as np
import pytest

from tree_search.data import DataError, load_npz_dataset


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_with_and_without_optional_arrays(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 6)).astype(np.float32)
    labels = rng.integers(0, 5, size=400)
    plain = load_npz_dataset(write(tmp_path / "a.npz", features=features, labels=labels))
    assert plain.num_classes == 5 and plain.dim == 6
    assert sum(len(v) for v in plain.labels.values()) == 400
    assert np.array_equal(plain.counts, np.bincount(plain.labels["train"], minlength=5))
    train = plain.labels["train"]
    assert np.allclose(plain.class_embeddings[2], plain.features["train"][train == 2].mean(axis=0), atol=1e-5)
    split = np.repeat([0, 1, 2], [300, 50, 50])
    full = load_npz_dataset(
        write(tmp_path / "b.npz", features=features, labels=labels, split=split,
              class_names=np.array(["a", "b", "c", "d", "e", "f"]), class_counts=np.arange(6, 0, -1),
              class_embeddings=rng.normal(size=(6, 3)))
    )  # fmt: skip
    assert full.num_classes == 6 and full.vocab.tokens[0] == "a" and full.counts.tolist() == [6, 5, 4, 3, 2, 1]
    assert [len(full.labels[s]) for s in ("train", "valid", "test")] == [300, 50, 50]
    assert full.class_embeddings.shape == (6, 3)
    # without names, the counts say how many classes there are: classes no row holds keep their place
    counted = load_npz_dataset(write(tmp_path / "d.npz", features=features, labels=labels, split=split,
                                     class_counts=np.array([9, 8, 7, 6, 5, 0, 0])))  # fmt: skip
    assert counted.num_classes == 7 and counted.counts.tolist() == [9, 8, 7, 6, 5, 0, 0]
    # without documents, blocks of contiguous rows stand in; with them, each row's document (numbered in id order)
    from tree_search.data.features import row_documents

    assert full.documents is None and row_documents(full, "test")[1].startswith("blocks")
    document = np.repeat([7, 3, 9, 5], 100)  # test rows 350-399 come from document 5
    document[380:] = 11
    known = load_npz_dataset(write(tmp_path / "c.npz", features=features, labels=labels, split=split,
                                   document=document))  # fmt: skip
    ids, about = row_documents(known, "test")
    assert about == "documents" and ids.tolist() == [0] * 30 + [1] * 20


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.zeros(10, int)}, "'features': missing"),
        ({"features": np.zeros((10, 2)), "labels": np.zeros(9, int)}, "'labels': expected 10 integers"),
        ({"features": np.zeros((10, 2)), "labels": np.arange(10), "class_names": np.array(["a", "b"])},
         "'labels': label 9 is outside 0..1"),
        ({"features": np.full((10, 2), np.nan), "labels": np.arange(10)}, "'features': row 0 holds NaN"),
        ({"features": np.zeros((10, 2)), "labels": np.arange(10), "class_counts": np.ones(8)},
         "'labels': label 9 is outside 0..7"),
        ({"features": np.zeros((10, 2)), "labels": np.arange(10), "split": np.zeros(10, int)},
         "'split': the valid split has no rows"),
        ({"features": np.zeros((10, 2)), "labels": np.arange(10), "class_counts": -np.ones(10),
          "split": np.array([0] * 6 + [1, 1, 2, 2])},
         "'class_counts'"),
        ({"features": np.zeros((10, 2)), "labels": np.arange(10), "document": np.zeros(9, int),
          "split": np.array([0] * 6 + [1, 1, 2, 2])},
         "'document': expected 10 integer document ids"),
    ],
)  # fmt: skip
def test_bad_npz_names_the_array(tmp_path, arrays, message):
    path = write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz_dataset(path)
    assert "bad.npz" in str(info.value)


def test_npz_refuses_pickles_and_garbage(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, features=np.array([object()] * 4), labels=np.arange(4))
    with pytest.raises(DataError, match="evil.npz"):
        load_npz_dataset(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_npz_dataset(tmp_path / "junk.npz")
