"""Does a schedule tuned at one NFE serve another? (BENCHMARKS.md table 9)

Table 5's searches export a best schedule per family, NFE and search seed. Here the best of
search seed 0 at each NFE it was tuned at is scored at every NFE of the plan, by the held-out
protocol of table 5 (the same held-out seeds and N, so a schedule scored at the NFE it was tuned at,
and the untuned model at table 5's NFEs, are taken from table 5's results, not scored again).
A schedule is built in the space it was searched in (its NFE's σ knots and FreeU window, exported
as σ bounds) and applied unchanged at the other NFE, as a user would apply its JSON.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..core.errors import InputError
from ..scoring.evaluator import Evaluator
from ..scoring.task import Task
from .headline import fixed_schedule, method_space
from .search import HELD_OUT_SEED, check_same_settings, load_results, save_results, stamp_run
from .tables import Table, register_table

# full: table 5's NFEs and two between them, the default family at 1 search seed; quick: bench's --nfe and one more
SIZES = {False: dict(families=("linear",), tuned_at=(5, 9, 19), nfes=(5, 7, 9, 13, 19), seed=0, batch=250),
         True: dict(families=("linear",), tuned_at=None, nfes=None, seed=0, batch=64)}


def run_transfer(model: str, headline: dict, path: Path, command: str, machine: str, *, families: tuple[str, ...],
                 tuned_at: tuple[int, ...], nfes: tuple[int, ...], seed: int, batch: int,
                 progress: bool = True) -> dict:
    """Score search seed ``seed``'s best of each family tuned at each of ``tuned_at`` (from table 5's
    ``headline`` results) at each of ``nfes``, and the untuned model at each; each number saved at once."""
    s = headline["settings"]
    results = load_results(path)
    settings = {"model": model, "truth_n": s["truth_n"], "held_out_seed": HELD_OUT_SEED, "seed": seed,
                "weights": s["weights"], "table5": {k: s[k] for k in ("trials", "n", "rungs")}}
    check_same_settings(path, "transfer results", results.get("settings"), settings)
    stamp_run(results, settings, command, machine)
    results["plan"] = {"families": list(families), "tuned_at": list(tuned_at), "nfes": list(nfes)}
    rows = headline.get("nfe", {})
    scores = results.setdefault("scores", {})  # "family,tuned_at,nfe" (family "untuned": tuned_at 0) -> FID
    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + s["truth_n"]))
    evaluators: dict[int, Evaluator] = {}

    def evaluator_at(nfe: int) -> Evaluator:
        if nfe not in evaluators:
            evaluators.clear()  # one model in memory at a time
            evaluators[nfe] = Evaluator(Task(model=model, nfe=nfe, n=s["n"], rungs=tuple(s["rungs"])),
                                        batch_size=min(batch, s["n"]))
        return evaluators[nfe]

    def score(key: str, nfe: int, schedule, known: float | None) -> None:
        if key in scores:
            return
        if known is not None:  # table 5 scored it on the same held-out seeds
            scores[key] = {"fid": known, "from": "table 5"}
        else:
            evaluator = evaluator_at(nfe)
            start = time.perf_counter()
            rung = next(evaluator.score(schedule(), rungs=(len(held_out),), seeds=held_out, kid=False,
                                        progress=progress and f"table 9 {key} held-out"))
            scores[key] = {"fid": rung.fid, "seconds": round(time.perf_counter() - start, 1)}
        save_results(path, results)

    # each tuned schedule built once, in its own NFE's space (its σ knots and FreeU window), and only
    # where one of its cells is missing; then the cells NFE by NFE, each NFE's model loaded once
    tuned_runs = {(family, tuned): runs[0] for family in families for tuned in tuned_at
                  if (runs := [r for r in rows.get(str(tuned), {}).get(family, []) if r["seed"] == seed])}
    schedules = {}
    for (family, tuned), run in tuned_runs.items():
        if any(f"{family},{tuned},{nfe}" not in scores for nfe in nfes if nfe != tuned):
            ctl = evaluator_at(tuned).controller
            schedules[family, tuned] = method_space(evaluator_at(tuned), family).schedule(ctl.arch, ctl.skips,
                                                                                         run["params"])
    for nfe in nfes:
        score(f"untuned,0,{nfe}", nfe, lambda: fixed_schedule(evaluator_at(nfe), "untuned"),
              rows.get(str(nfe), {}).get("untuned"))
        for (family, tuned), run in tuned_runs.items():
            score(f"{family},{tuned},{nfe}", nfe, lambda: schedules[family, tuned],
                  run["held_out"] if nfe == tuned else None)
    return results


def render(results: dict) -> list[str]:
    """A row per family and NFE it was tuned at, a column per NFE it is scored at: held-out FID and its
    change vs the untuned model there; the verdict per tuned schedule; what is not measured yet."""
    s, plan = results["settings"], results["plan"]
    scores = results.get("scores", {})
    nfes = plan["nfes"]
    lines = [f"Written by `{results['command']}` on {results['date']}. Machine: {'; '.join(results['machines'])}.", "",
             f"Model {s['model']}, Heun, Karras σ. Each row: the best schedule of table 5's search (search seed "
             f"{s['seed']}: {s['table5']['trials']} trials, N = {s['table5']['n']}) at the NFE it was tuned at, "
             f"applied unchanged at each NFE and scored by FID on {s['truth_n']:,} held-out samples (seeds from "
             f"{s['held_out_seed']:,}); change vs the untuned model at that NFE. Cells marked * come from table 5.", "",
             "| schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "| --- | " + " | ".join("---:" for _ in nfes) + " |"]
    untuned = {n: scores.get(f"untuned,0,{n}", {}).get("fid") for n in nfes}
    lines.append("| untuned | " + " | ".join(f"{v:.4g}" if v is not None else "–" for v in untuned.values()) + " |")
    missing, verdicts = [], []
    for family in plan["families"]:
        for tuned in plan["tuned_at"]:
            cells, worse = [], []
            for n in nfes:
                cell = scores.get(f"{family},{tuned},{n}")
                if cell is None or untuned[n] is None:
                    cells.append("–")
                    missing.append(f"{family} tuned at {tuned}, scored at {n}")
                    continue
                change = 100 * (cell["fid"] - untuned[n]) / untuned[n]
                cells.append(f"{cell['fid']:.4g} ({change:+.1f}%){'*' if cell.get('from') else ''}")
                if change >= 0:
                    worse.append(n)
            lines.append(f"| {family} tuned at NFE {tuned} | " + " | ".join(cells) + " |")
            if not any(f"{family} tuned at {tuned}," in m for m in missing):
                verdicts.append(f"{family} tuned at NFE {tuned}: " + (
                    f"no better than untuned at NFE {', '.join(map(str, worse))}" if worse
                    else "better than untuned at every NFE measured"))
    if verdicts:
        lines += ["", "; ".join(verdicts) + "."]
    if missing:
        lines += ["", f"Not measured yet (rerun the same command to go on): {'; '.join(missing)}."]
    return lines


def _measure(ctx) -> None:
    headline = ctx.results("headline.json")
    if not headline.get("nfe"):
        raise InputError("table 9 scores table 5's tuned schedules at other NFEs, and table 5 is not measured in "
                         f"{ctx.work}: measure it first (tables 5,9)", option="tables")
    size = SIZES[ctx.quick]
    tuned_at = size["tuned_at"] or (ctx.nfe,)
    run_transfer(ctx.model, headline, ctx.work / "transfer.json", ctx.command, ctx.stamp["machine"],
                 families=size["families"], tuned_at=tuned_at, nfes=size["nfes"] or (ctx.nfe, ctx.nfe + 2),
                 seed=size["seed"], batch=size["batch"], progress=ctx.progress)


register_table(Table(9, "Transfer across NFEs: a schedule tuned at one NFE, applied at others", _measure,
                     lambda ctx: render(r) if (r := ctx.results("transfer.json")).get("scores") else None))
