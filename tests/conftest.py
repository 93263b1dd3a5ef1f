import os

import pytest

# One OpenMP thread per process (this one, its subprocesses, Ray's): the suite runs as two pytest-xdist workers
# on two cores, and OpenMP threads that spin-wait on an oversubscribed machine made some tests 4-7x slower. Set
# before any test module imports torch; Ray actors still set their own thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its derived-data cache under its own temporary folder."""
    monkeypatch.setenv("TREE_SEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def code_folder(tmp_path):
    """A small folder of Python files standing in for the standard library."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "ignored.py").write_text("import nothing_here\n")
    for k in range(40):
        body = "\n".join(
            f"def f{k}_{j}(x, y={j}):\n    # note {j}\n    return x + y * {k} if x else 'text{j}'\n" for j in range(5)
        )
        (root / ("pkg" if k % 2 else ".") / f"mod{k}.py").write_text(body)
    (root / "broken.py").write_bytes(b"def f(:\n  \xff\xfe")
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (starting Ray takes seconds)."""
    import ray

    from tree_search.distributed.ray_evaluator import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()
