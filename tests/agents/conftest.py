import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (starting Ray takes seconds)."""
    import ray

    from tree_search.agents.rllib_search import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()
