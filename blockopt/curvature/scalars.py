"""Numbers as users pass them: ``plain(np.int64(5)) == 5``, so numpy scalars pass every check."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["plain"]


def plain(value: Any) -> Any:
    """A numpy (or other ``numbers``) scalar as the Python int or float it stands for, so that
    ``np.int64(5)`` and ``np.float32(0.1)`` pass where 5 and 0.1 do; bools (numpy's too),
    Python numbers and anything else are returned as they are (and refused by the checks that
    follow)."""
    if isinstance(value, (bool, np.bool_)) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value
