"""The learning-rate factor by fanout that the head (`TreeSoftmaxHead`) and node training share."""

from __future__ import annotations

import numpy as np

__all__ = ["step_scale"]


def step_scale(fanout: np.ndarray | int) -> np.ndarray:
    """Learning-rate factor by fanout: 0.3 up to fanout 16, rising log-linearly to 1 at 256 and beyond."""
    return np.clip(0.3 * (np.asarray(fanout, dtype=float) / 16.0) ** 0.434, 0.3, 1.0)
