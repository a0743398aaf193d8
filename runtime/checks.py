"""Checks and retry timing shared by every part: finite numbers in specs, exponential back-off."""
from __future__ import annotations

import math


def check_number(name: str, value) -> None:
    """Raise unless `value` is a finite real number: a string (YAML 1.1 reads `1e-3` as one), a bool,
    NaN or inf is refused here, with its name, rather than failing a comparison or a fit later."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}")


def backoff(failures: int, cap: float, base: float = 0.5) -> float:
    """Seconds to wait after `failures` failures in a row: `base` doubling each time, at most `cap`.
    Callers that many clients share (a reconnect) multiply it by a random jitter."""
    return min(cap, base * 2 ** min(failures, 16))
