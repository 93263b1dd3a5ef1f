import pytest

from tree_search.data import make_planted


@pytest.fixture(scope="module")
def planted():
    """A small planted task (64 classes in groups of 4) that the node-training tests share."""
    return make_planted(num_classes=64, dim=16, fanout=4, signal=3.0, num_train=6000, num_valid=1500,
                        num_test=1500, seed=0)  # fmt: skip
