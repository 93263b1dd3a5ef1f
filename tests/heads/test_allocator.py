"""The process's allocator settings: freed blocks kept for the next training step, and handed back between phases."""

import sys

import numpy as np
import pytest

from tree_search.heads.timing import release_free_memory, tune_allocator


def _resident_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_trim")
def test_freed_memory_stays_until_it_is_released():
    assert tune_allocator()
    blocks = [np.ones(10_000_000) for _ in range(16)]  # 16 x 80 MB, each under the 1 GiB mmap threshold
    held = _resident_gib()
    del blocks
    assert _resident_gib() > held - 0.2  # kept in the heap, ready for the next step
    assert release_free_memory()
    assert _resident_gib() < held - 1.0  # 1.2 GiB handed back
