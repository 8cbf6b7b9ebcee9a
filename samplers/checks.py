"""Scalar argument checks: numbers (Python or numpy, never bool) in a range, booleans and named choices.

Every check names the parameter as the user wrote it and states the valid values; wrong types raise
``TypeError``, wrong values (out of range, NaN, infinity) ``ValueError``. ``samplers`` owns them so that it
imports nothing from ``dualguide``; ``dualguide.checks`` builds on them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

INF = math.inf


def describe_range(
    low: float = -INF, high: float = INF, low_open: bool = False, high_open: bool = False, integer: bool = False
) -> str:
    """``"an integer >= 1"``, ``"a finite number in [0, 1]"``, ``"a finite number > 0"``, ..."""
    kind = "an integer" if integer else "a finite number"
    if low == -INF and high == INF:
        return kind
    if high == INF:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if low == -INF:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def is_number(value: Any) -> bool:
    """A Python or numpy real scalar, not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_bool(value: Any) -> bool:
    """``True``/``False`` or a numpy bool."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"))


def check_number(
    value: Any,
    name: str,
    low: float = -INF,
    high: float = INF,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    allow_inf: bool = False,
):
    """``value`` as a Python ``float`` (``int`` with ``integer``) in the given range, else an error naming ``name``.

    NaN and -inf are always rejected; +inf only with ``allow_inf`` (for documented "no bound"
    sentinels such as ``Interval.sigma_high``). ``optional`` lets ``None`` through unchanged.
    Integer parameters take integers only (``numbers.Integral``, e.g. ``np.int64``); a float
    there, even ``20.0``, is a ``ValueError``.
    """
    if value is None and optional:
        return None
    valid = describe_range(low, high, low_open, high_open, integer)
    if allow_inf:
        valid += " (or inf)"
    if optional:
        valid += " or None"
    if not is_number(value):
        raise TypeError(f"{name} must be {valid}, got {value!r} of type {type(value).__name__}")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be {valid}, got {value!r}")
        number = int(value)
    else:
        number = float(value)
        if math.isnan(number) or number == -INF or (number == INF and not allow_inf):
            raise ValueError(f"{name} must be {valid}, got {number!r}")
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        raise ValueError(f"{name} must be {valid}, got {number!r}")
    return number


def check_bool(value: Any, name: str, optional: bool = False) -> Optional[bool]:
    """``value`` as a Python ``bool`` (numpy bools accepted)."""
    if value is None and optional:
        return None
    if not is_bool(value):
        raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(choices)}; got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
