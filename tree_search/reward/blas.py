"""numpy's BLAS held to one thread in processes where torch trains.

After each numpy product, OpenBLAS's idle threads spin for a while on the cores torch's threads
train on. A search interleaves numpy work (k-means and PCA orderings, costs) with node training,
and at V = 10k its node training took 8% longer for it, with the same results (docs/benchmarks.md,
"numpy's BLAS threads"). The numpy work of a search is mostly small products that a second
thread does not speed up.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread"]


def one_blas_thread() -> threadpool_limits:
    """Hold numpy's BLAS to one thread: as a context manager until its exit, else for the process."""
    return threadpool_limits(limits=1, user_api="blas")
