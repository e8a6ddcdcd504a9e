"""The tables of BENCHMARKS.md: one ``Table`` object per table, registered with ``register_table``.

A table has a number and a title (its BENCHMARKS.md heading), ``measure(ctx)``, which measures it
and saves its raw results under ``ctx.work`` (``ctx.save``), ``render(ctx)``, its Markdown lines
from what ``ctx.work`` holds (None: not measured yet), and an optional ``check(ctx)``, which
refuses a run in one line before any table of it is measured. ``bench.run.run_bench`` checks, then
measures the tables asked for, in number order, then renders every registered table. The built-in
tables register themselves in the modules that measure them (``BUILTIN``: number -> module and
help line). How to add one:
docs/extending.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import InputError

# the built-in tables: number -> (the module that measures and registers it, its line in `bench --help`,
# which loads no torch and so cannot import the modules to read their titles)
BUILTIN = {
    1: ("run", "controller overhead per placement at ρ = 1 (target ≤ 1.02x)"),
    2: ("run", "where a trial's time goes (sampling, features, FID, KID, Optuna)"),
    3: ("run", "proxy fidelity: Spearman of each objective vs FID on --truth-n held-out samples"),
    4: ("run", "search efficiency: optimizers and pruners replayed on an 11x11 grid of the linear family; "
               "every family's real searches"),
    5: ("headline", "headline: held-out FID of the untuned model and each family's best, NFE 5, 9, 19"),
    6: ("gpu", "GPU scaling: images/s and seconds per proxy trial of a 64 px ADM-sized UNet, fp32 vs bf16"),
    7: ("sizes", "published sizes: SD 1.5, SDXL, EDM ADM-64, EDM2-img64-S, U-ViT-M with random weights: skips, "
                 "parameters, seconds per call, the hooks' time per call, peak memory (EDM, EDM2 and U-ViT from the "
                 "checkouts given)"),
    8: ("headline", "FreeU head to head: FreeU's preset, tuned FreeU (every σ, σ window), linear ρ + FreeU, at "
                    "table 5's NFEs and protocol, beside table 5's untuned model and best ρ family"),
    9: ("transfer", "transfer: table 5's best linear schedules tuned at NFE 5, 9, 19, scored at NFE 5, 7, 9, 13, 19"),
}


@dataclass
class Context:
    """What a table's check, measure and render read: the run's settings (``size``: the sizes of
    ``run.SIZES``, full or quick), where results go, and pieces tables share (``evaluator``)."""

    quick: bool
    size: dict
    work: Path
    model: str = "fashion-mnist-edm"
    nfe: int = 9
    command: str = ""
    stamp: dict = field(default_factory=dict)  # command, date and machine, for a results file
    device: Any = None
    truth_n: int | None = None
    checkouts: dict = field(default_factory=dict)  # table 7's checkouts: {"edm": Path, ...}
    progress: bool = True
    shared: dict = field(default_factory=dict)  # what one table made and another reuses, by name

    def results(self, name: str) -> dict:
        """The results file ``name`` under ``work`` ({} when there is none)."""
        from .search import load_results

        return load_results(self.work / name)

    def save(self, name: str, results: dict) -> None:
        """Write the results file ``name`` under ``work`` atomically."""
        from .search import save_results

        save_results(self.work / name, results)

    def evaluator(self, key: str, make: Callable[[], Any]) -> Any:
        """The evaluator ``key`` (made once per run by ``make``): tables of one task share it."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    measure: Callable[[Context], None]
    render: Callable[[Context], "list[str] | None"]
    check: Callable[[Context], None] | None = None
    todo: str = "Not measured yet: run `skiptune-search bench --tables N`."


_TABLES: dict[int, Table] = {}


def register_table(table: Table, replace: bool = False) -> Table:
    """Make ``table`` one of BENCHMARKS.md's, measured by ``bench --tables NUMBER``."""
    if not replace and table.number in _TABLES:
        raise InputError(f"a table numbered {table.number} is already registered ({_TABLES[table.number].title}); "
                         f"pick another number", option="tables")
    _TABLES[table.number] = table
    return table


def tables() -> list[Table]:
    """Every registered table, the built-in ones included, by number."""
    for module in dict.fromkeys(module for module, _ in BUILTIN.values()):
        importlib.import_module(f".{module}", __package__)
    return [_TABLES[k] for k in sorted(_TABLES)]


def table_numbers() -> tuple[int, ...]:
    return tuple(t.number for t in tables())
