"""The bounds of every number a user gives, in one place: the command line's options
(``cli/common.py``) and the Python API (``Task``, ``tune``) check the same ones.

``check_int`` and ``check_float`` check a value's type and range for the library: a bool is no
number, NaN and infinity are no numbers either; the error names the argument.
"""

from __future__ import annotations

import math
import numbers
import os

from .errors import InputError

MAX_NFE = 1000  # more model calls per sample than any few-step sampler needs: surely a typo
MAX_SEED = 2**63 - 1  # seeds: 0 .. MAX_SEED (a torch generator's seed)
MAX_SEARCH_SEED = 2**32 - 1  # the optimizer's seed (numpy's range)
MAX_TRIALS = 100_000
MAX_N = 10_000_000  # samples per trial or per held-out variant
MAX_BATCH = 4096  # sampling and feature batch: past this a batch only costs memory
MIN_KNOTS, MAX_KNOTS = 2, 32
RHO_MAX = 4  # a schedule's ρ lies in (0, RHO_MAX]
GUIDANCE_RANGE = (1, 100)  # classifier-free guidance scale (1: no guidance)
SIZE_RANGE = (8, 16384)  # a text-to-image pipeline's image height and width, in pixels


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one): the most
    threads or worker processes that do not just wait for each other."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_int(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} = {value!r} is not a whole number; give an integer in [{low}, {high}]", option=name)
    if not low <= value <= high:
        raise InputError(f"{name} = {value} is out of range; give an integer in [{low}, {high}]", option=name)
    return int(value)


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """'(0, 4]', '[1, 100]', '> 0', ... as a range is written."""
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "any finite number"


def check_float(value, name: str, low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a finite float in the range, or an InputError naming ``name`` (NaN and
    infinity are refused: no setting of this tool means anything at either)."""
    where = describe_range(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} = {value!r} is not a number; give a number in {where}", option=name)
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} = {value} is not a finite number; give a number in {where}", option=name)
    if ((low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))):
        raise InputError(f"{name} = {value:g} is out of range; give a number in {where}", option=name)
    return value


def check_rho_range(rho_range, name: str = "rho_range") -> tuple[float, float]:
    """A (low, high) pair of ρ bounds in (0, RHO_MAX], low < high."""
    if isinstance(rho_range, (str, bytes)) or not hasattr(rho_range, "__len__") or len(rho_range) != 2:
        raise InputError(f"{name} = {rho_range!r} is not a pair (low, high) of ρ bounds, e.g. (0.5, 1.5)",
                         option=name)
    low, high = (check_float(v, name, 0.0, RHO_MAX, low_open=True) for v in rho_range)
    if not low < high:
        raise InputError(f"{name} = ({low:g}, {high:g}): the lower bound must be below the upper, e.g. (0.5, 1.5)",
                         option=name)
    return low, high
