"""The Optuna side, and the only package that imports Optuna.

``space`` (trial parameters -> a schedule; the first trials every study queues), ``optimizers``
(Optuna samplers and the successive-halving pruner), ``objective`` (the one trial objective, and
``run_search``), ``study`` (create or resume a study of this tool, check its settings, export its
best), ``storage`` (SQLAlchemy URLs, heartbeats, artifacts, a study borrowed from another
storage), ``workers`` (parallel processes on one machine), ``report`` (the plotly HTML report).
The names below are plain data for the CLI.
"""

DEFAULT_STORAGE = "sqlite:///studies/skiptune.db"
OPTIMIZERS = ("tpe", "cmaes", "gp", "random", "grid")

# The optimizer of a search that names none (--optimizer), per searched method: a family, or
# FAMILY_allsteps for a FreeU family acting at every σ (--no-window). Each is the optimizer that
# BENCHMARKS.md table 4 found reaching the method's target at the most search seeds with its own
# pruning (``optimizers.REDUCTION_FACTORS``), meeting more of issue 27's targets (trials to target,
# fewer samples than before), then in the fewest trials. TPE is the others' (per_level, FreeU at
# every σ: TPE), and so is a searched placement's: a categorical parameter, which Optuna's CMA-ES
# and GP leave to random sampling. linear: CMA-ES, first on the NFE 9 grid (20 seeds); at NFE 5 it
# reached the target at all 3 seeds spending fewer samples than the search before issue 27 (once a
# pruned trial counts toward its generation, ``CmaEs``), where TPE keeping a third took fewer trials
# but more samples than before. per_layer: GP (without pruning), the only one to reach its target
# at every seed (16 trials). per_noise: GP (without pruning), with TPE without pruning the only ones
# to reach it at every seed (12 trials, 6,000 samples, where TPE keeping a third reached it at 2 of
# 3 seeds). freeu (its σ window searched) and linear_freeu: GP (without pruning), the only optimizer
# with its own pruning to reach their targets at any seed (1 and 2 of 3; its own searches set both
# targets), and the one whose searches' best FIDs had the lowest median.
DEFAULT_OPTIMIZERS: dict[str, str] = {"linear": "cmaes", "per_layer": "gp", "per_noise": "gp", "freeu": "gp",
                                      "linear_freeu": "gp"}
FALLBACK_OPTIMIZER = "tpe"


def default_optimizer(family: str, freeu_window: bool = True, placement: str = "input") -> str:
    """The optimizer a search of ``family`` (with or without FreeU's σ window) uses unless told."""
    if placement == "search":
        return FALLBACK_OPTIMIZER
    return DEFAULT_OPTIMIZERS.get(family if freeu_window else f"{family}_allsteps", FALLBACK_OPTIMIZER)
