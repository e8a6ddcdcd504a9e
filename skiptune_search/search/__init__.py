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
