"""numpy's BLAS on one thread wherever torch trains (its idle threads slow training), restored after."""

from __future__ import annotations

import torch
from quick_settings import ENV
from threadpoolctl import threadpool_info, threadpool_limits

from tree_search.search import SearchConfig, final_training, run_search


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_a_search_holds_numpy_blas_to_one_thread_and_restores_it(tmp_path):
    seen: list[list[int]] = []
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() and set(blas_threads()) == {2}
        run_search(SearchConfig(agent="random", budget=2, env_config=ENV, baselines="core"), tmp_path / "run",
                   log=lambda line: seen.append(blas_threads()))  # fmt: skip
        assert set(blas_threads()) == {2}
    assert seen and all(threads == [1] * len(threads) for threads in seen)


def test_a_scoring_worker_holds_numpy_blas_to_one_thread():
    torch_threads = torch.get_num_threads()
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            final_training._start_worker(ENV.to_env_config(), 1)
            assert set(blas_threads()) == {1}
    finally:
        torch.set_num_threads(torch_threads)
        final_training._dataset = None
