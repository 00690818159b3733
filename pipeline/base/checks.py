"""The values a distillation can be given (temperature T, weight α, the cache's memory
budget), checked in one place.

The command line (its option callbacks), the library's configurations (``CacheConfig``,
``TrainConfig``, ``QatConfig``), the cache's readers and manifest parser, and the Python
API (``distillation_loss``, ``Cache.soft_targets``, ``DistillationDataset``) all ask
here, so each refuses the same values with the same message. Pure: no I/O, no torch.
"""

from __future__ import annotations

import math
from numbers import Real

from kdpipe.base.errors import UsageError

# the temperatures a cache holds: below 0.01, float16 turns every class but the top one
# into -inf; far above, every stored distribution becomes uniform (the teacher pass also
# measures, chunk by chunk, whether the stored dtype still holds the teacher's ranking)
TEMPERATURE_RANGE = (0.01, 1000.0)


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def temperature_problem(value: object, option: str = "--temperature") -> str | None:
    """Why ``value`` cannot be a distillation temperature, or None when it can."""
    low, high = TEMPERATURE_RANGE
    if not (_number(value) and low <= value <= high):  # type: ignore[operator]
        return f"{option} must be a number from {low:g} to {high:g}, not {value}"
    return None


def alpha_problem(value: object, option: str = "--alpha") -> str | None:
    """Why ``value`` cannot weigh the hard-label term (α·CE + (1−α)·T²·KL), or None: a
    weight outside [0, 1] makes one of the two terms count negatively."""
    if not (_number(value) and 0.0 <= value <= 1.0):  # type: ignore[operator]
        return f"{option} must be in [0, 1], not {value}"
    return None


def memory_problem(value: int | None, option: str = "--cache-memory") -> str | None:
    """Why ``value`` cannot be a cache's memory budget in bytes (None: no budget), or None."""
    if value is not None and value <= 0:
        return f"{option} must be > 0, not {value}"
    return None


def check_temperature(value: object, option: str = "--temperature") -> None:
    """Raise :class:`~kdpipe.base.errors.UsageError` for a temperature that cannot be one."""
    problem = temperature_problem(value, option)
    if problem:
        raise UsageError(problem)


def check_alpha(value: object, option: str = "--alpha") -> None:
    """Raise :class:`~kdpipe.base.errors.UsageError` for an α outside [0, 1]."""
    problem = alpha_problem(value, option)
    if problem:
        raise UsageError(problem)
