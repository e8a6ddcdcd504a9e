"""skiptune-search: automatic Skip-Tuning (Ma et al., ICML 2024) of diffusion UNets.

``from skiptune_search import apply`` needs torch alone, a schedule file included (diffusers
only for diffusers models): it loads ``skiptune_search.core`` alone, on first use, so
importing the package (the CLI does, for ``--help``) loads no torch.

Packages, one concern each: ``core`` (schedule, adapters, controller: what ``apply`` needs),
``models`` (loaders, denoisers), ``sampling`` (σ grids, samplers, seeds), ``scoring`` (the task,
the evaluator, FID/KID), ``search`` (the Optuna side: space, objective, study, storage), ``cli``,
``bench`` (BENCHMARKS.md) and ``bundled`` (the bundled model's data, training and card).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "apply": "core.controller", "SkipController": "core.controller",
    "RhoSchedule": "core.schedule", "SkipInfo": "core.schedule", "load_schedule": "core.schedule",
    "SkiptuneError": "core.errors", "ScheduleError": "core.errors", "NoSkipsError": "core.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
