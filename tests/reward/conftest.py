import pytest
from quick_settings import NODE_PLANTED

from tree_search.data import make_planted


@pytest.fixture(scope="module")
def planted():
    """A small planted task (64 classes in groups of 4) that the node-training tests share."""
    return make_planted(NODE_PLANTED)
