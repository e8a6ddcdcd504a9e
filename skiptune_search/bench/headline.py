"""The headline benchmark (BENCHMARKS.md table 5, and table 8): does tuning help, by how much, per family?

For each NFE: the untuned model and the exported best schedule of a real search (the default
task: 16 trials, rungs, pruning) of each family, for several search seeds, all scored by FID on
many held-out samples (table 8 runs the same driver over FreeU's methods). Searches live in a SQLite study file in the work folder, and every
finished number is written to a JSON file at once: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..core import freeu
from ..core.errors import StudyError
from ..core.schedule import RhoSchedule
from ..models.loaders import weights_fingerprint
from ..scoring.evaluator import Evaluator
from ..scoring.task import Task
from ..search.objective import run_search
from ..search.optimizers import pruning_text
from ..search.space import Space
from ..search.storage import make_storage
from ..search.study import export_best, load_own_study, open_study
from ..search.tune import make_space
from .search import (HELD_OUT_SEED, check_same_settings, load_results, same_settings, save_results,
                     with_legacy_factor)
from .tables import Table, register_table


# what tables 5 and 8 compare: searched methods (a family, or FreeU at every σ) and fixed schedules
RHO_METHODS = ("linear", "per_level", "per_layer", "per_noise")  # table 5's searches
FIXED = ("untuned", "freeu_preset")
FREEU_METHODS = ("freeu_allsteps", "freeu", "linear_freeu")  # table 8's searches


def method_space(evaluator: Evaluator, method: str) -> Space:
    """A searched method's space: a family at input placement, ρ in [0.5, 1.5], per_noise on 3 σ
    knots; ``freeu_allsteps`` is the freeu family acting at every σ (no window)."""
    if method == "freeu_allsteps":
        return make_space(evaluator, "freeu", freeu_window=False)
    return make_space(evaluator, method)


def fixed_schedule(evaluator: Evaluator, name: str) -> RhoSchedule:
    """The untuned model, or FreeU's published preset for the model (SD1.5's when none is known)."""
    ctl = evaluator.controller
    if name == "untuned":
        return ctl.identity()
    preset = freeu.preset_for(freeu.recognize(ctl.unet))[1]
    return RhoSchedule.from_family("freeu", ctl.arch, ctl.skips, {f: getattr(preset, f) for f in freeu.FACTORS})


def run_headline(model: str, nfes: tuple[int, ...], path: Path, command: str, machine: str, *, seeds: int,
                 trials: int, n: int, rungs: tuple[int, ...], reduction_factor: int, truth_n: int, batch: int,
                 methods: tuple[str, ...] = RHO_METHODS, fixed: tuple[str, ...] = ("untuned",),
                 known: Path | None = None, progress: bool = True) -> dict:
    """Search each method at each NFE ``seeds`` times and score the ``fixed`` schedules and each
    search's best on ``truth_n`` held-out samples: the fixed schedules at every NFE first, then the
    searches seed by seed (every NFE and method at search seed 0, then at seed 1, ...). A fixed
    schedule already scored in ``known`` (another table's results file of the same settings) is
    taken from there. ``reduction_factor``: the searches' successive halving (a study resumed keeps
    its own: ``open_study``)."""
    results = load_results(path)

    def evaluator_for(nfe: int) -> Evaluator:
        return Evaluator(Task(model=model, nfe=nfe, n=n, rungs=rungs), batch_size=min(batch, n))

    evaluator = evaluator_for(nfes[0])
    settings = {"model": model, "trials": trials, "n": n, "rungs": list(rungs), "reduction_factor": reduction_factor,
                "truth_n": truth_n,
                "held_out_seed": HELD_OUT_SEED,  # and the weights: a model retrained in place is another model
                "weights": weights_fingerprint(evaluator.controller.unet)}
    check_same_settings(path, "held-out results", with_legacy_factor(results.get("settings")), settings)
    results.update(settings=settings, command=command, machine=machine, date=time.strftime("%Y-%m-%d"),
                   plan={"nfes": list(nfes), "families": list(methods), "seeds": seeds, "fixed": list(fixed)})
    if "freeu_preset" in fixed:  # which preset, and why that one (the model's own, or SD1.5's)
        name, values, why = freeu.preset_for(freeu.recognize(evaluator.controller.unet))
        results["freeu_preset"] = {"name": name, "values": [getattr(values, f) for f in freeu.FACTORS], "why": why}
    other = load_results(known) if known else {}
    other_rows = other.get("nfe", {}) if same_settings(with_legacy_factor(other.get("settings")), settings) else {}
    storage_url = f"sqlite:///{Path(path).with_suffix('.db')}"
    storage = make_storage(storage_url, heartbeat=None)
    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + truth_n))
    def row_at(nfe: int) -> dict:
        return results.setdefault("nfe", {}).setdefault(str(nfe), {})

    def evaluator_at(nfe: int) -> Evaluator:
        """The NFE's evaluator (its σ grid); the previous one is dropped."""
        nonlocal evaluator
        if evaluator.task.nfe != nfe:
            evaluator = evaluator_for(nfe)
        return evaluator

    def save(row: dict) -> None:  # each finished number at once, with the machine that measured it
        if machine not in row.setdefault("machines", []):
            row["machines"].append(machine)
        save_results(path, results)

    def held_out_fid(evaluator: Evaluator, schedule, label: str) -> tuple[float, float]:
        """FID on the held-out samples, and the seconds it took."""
        start = time.perf_counter()
        rung = next(evaluator.score(schedule, rungs=(len(held_out),), seeds=held_out,
                                    progress=progress and f"NFE {evaluator.task.nfe} {label} held-out", kid=False))
        return rung.fid, time.perf_counter() - start

    for nfe in nfes:  # the fixed schedules first, then the searches
        row = row_at(nfe)
        for name in fixed:
            if name in row:
                continue
            if name in other_rows.get(str(nfe), {}):  # the same held-out seeds and settings, scored there
                row[name] = other_rows[str(nfe)][name]
                row.setdefault("taken_from", {})[name] = str(known)
                save_results(path, results)
                continue
            evaluator = evaluator_at(nfe)
            row[name], row[f"{name}_seconds"] = held_out_fid(evaluator, fixed_schedule(evaluator, name), name)
            save(row)
        for method in methods:  # runs recorded before search times were: their trials' times are in the study
            for run in row.get(method, []):
                if "search_seconds" not in run:
                    try:
                        old = load_own_study(storage, study_name(nfe, method, run["seed"], "window" in run),
                                             storage_url)
                    except StudyError:
                        continue
                    run["search_seconds"] = search_seconds(old)
                    save(row)
    # search seed by search seed, across NFEs and methods: a run stopped early leaves every
    # NFE and method measured at the same number of seeds rather than some not at all
    for seed in range(seeds):
        for nfe in nfes:
            for method in methods:
                row = row_at(nfe)
                runs = row.setdefault(method, [])
                if len(runs) > seed:
                    continue
                evaluator = evaluator_at(nfe)
                space = method_space(evaluator, method)
                # a trial a killed run left running is failed and queued again by open_study
                study = open_study(storage, study_name(nfe, method, seed, space.searches_calls), evaluator.task,
                                   space, evaluator.controller, seed, warm_start=False,  # each search on its own
                                   reduction_factor=reduction_factor)
                run_search(evaluator, study, space, trials, progress=progress)
                best = export_best(study, storage_url)
                fid, seconds = held_out_fid(evaluator, best, f"{method} seed {seed}")
                runs.append({"seed": seed, "search_value": best.metric["value"],
                             "search_baseline": best.metric["baseline"], "held_out": fid, "params": best.params,
                             "search_seconds": search_seconds(study), "held_out_seconds": seconds,
                             **({"window": "calls"} if space.searches_calls else {})})
                save(row)
    return results


def _pruning(settings: dict) -> str:
    """The searches' pruning as the protocol says it (results from before it was recorded: the factor then)."""
    return pruning_text(settings["rungs"], with_legacy_factor(settings)["reduction_factor"])


def study_name(nfe: int, family: str, seed: int, calls: bool = False) -> str:
    """The name of one headline search's study in the work folder's study file; ``calls``: FreeU's
    window searched over the sampler's model calls (the studies of the window searched in σ keep
    their names)."""
    return f"headline-nfe{nfe}-{family}-seed{seed}" + ("-calls" if calls else "")


def search_seconds(study) -> float:
    """The summed wall seconds of a study's trials (sampling and scoring, as each trial records
    them; a trial cut short by an interrupted run counts up to its last rung)."""
    return sum(t.user_attrs.get("wall_seconds", 0.0) for t in study.get_trials(deepcopy=False))


def render(results: dict) -> list[str]:
    """Rows per NFE: untuned held-out FID, each family's mean ± std over search seeds, its change;
    then, per NFE, the best family and where tuning did not help; then what of the run's plan is
    not measured yet."""
    s, plan = results["settings"], results["plan"]
    families = tuple(plan["families"])
    rows = {int(k): v for k, v in results.get("nfe", {}).items()}
    machines = sorted({m for row in rows.values() for m in row["machines"]})
    where = (f"Machine: {machines[0]}." if len(machines) == 1 else
             "Machines: " + "; ".join(f"NFE {nfe}: {', '.join(row['machines'])}" for nfe, row in sorted(rows.items())) + ".")
    lines = [f"Written by `{results['command']}` on {results['date']}. {where}", "",
             f"Model {s['model']}, Heun, Karras σ. Each family: a search of {s['trials']} trials "
             f"(N = {s['n']}, rungs {','.join(map(str, s['rungs']))}, {_pruning(s)}, input placement, "
             f"ρ in [0.5, 1.5]) per search seed; its exported best and the untuned model are scored by FID on {s['truth_n']:,} held-out "
             f"samples (seeds from {s['held_out_seed']:,}). Mean ± std over search seeds; change vs untuned.", "",
             "| NFE | untuned | " + " | ".join(families) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in families) + " |"]
    verdicts, missing = [], []
    for nfe, row in sorted(rows.items()):
        cells, changes = [], {}
        for family in families:
            fids = [r["held_out"] for r in row.get(family, [])]
            if len(fids) < plan["seeds"]:
                missing.append(f"NFE {nfe} {family} ({len(fids)} of {plan['seeds']} search seeds)")
            text, change = _cell(fids, row.get("untuned"))
            cells.append(text)
            if change is not None:
                changes[family] = change
        lines.append(f"| {nfe} | {row.get('untuned', float('nan')):.4g} | " + " | ".join(cells) + " |")
        if changes:
            best = min(changes, key=changes.get)
            no_help = [f for f, c in changes.items() if c >= 0]
            verdicts.append(f"NFE {nfe}: best family {best} ({changes[best]:+.1f}% held-out FID)"
                            + (f"; no gain from {', '.join(no_help)}" if no_help else "; every family measured helped"))
    missing += [f"NFE {nfe}" for nfe in plan["nfes"] if nfe not in rows]
    if verdicts:
        lines += ["", *(f"{v}." for v in verdicts)]
    no_baseline = [f"NFE {nfe} {family} seed {r['seed']}" for nfe, row in sorted(rows.items())
                   for family in families for r in row.get(family, []) if "search_baseline" in r and r["search_baseline"] is None]
    if no_baseline:
        lines += ["", f"Searches with no completed ρ = 1 trial: {', '.join(no_baseline)} (an interrupted run left "
                      f"that trial running and the resumed search did not queue it again, or queued it behind the "
                      f"ramp, where it was pruned; both fixed since). Their other trials ran as in every search."]
    return lines + _footer(rows, families, s["truth_n"], missing, "headline.db")


def _cell(fids: list[float], untuned: float | None, searched: bool = True) -> tuple[str, float | None]:
    """'mean ± std (change vs untuned, k seeds)' of a method's held-out FIDs (of its searches, or
    of one fixed schedule: no seed count), and the change in %."""
    if not fids or untuned is None:
        return "–", None
    std = f" ± {statistics.stdev(fids):.3g}" if len(fids) > 1 else ""
    change = 100 * (statistics.fmean(fids) - untuned) / untuned
    seeds = f", {len(fids)} seed{'s' * (len(fids) > 1)}" if searched else ""
    no_better = ", one or more no better than untuned" if searched and max(fids) >= untuned else ""
    return f"{statistics.fmean(fids):.4g}{std} ({change:+.1f}%{seeds}{no_better})", change


SIGMA_WINDOW = "@sigma_window"  # a row's key suffix for the runs of a windowed method searched in σ, kept when re-measured
FREEU_LABELS = {"freeu_allsteps": "tuned FreeU (every σ)", "freeu": "tuned FreeU + σ window",
                "linear_freeu": "tuned linear ρ + FreeU"}


def render_freeu(results: dict, headline: dict) -> list[str]:
    """Table 8: per NFE the untuned model, FreeU's preset, each FreeU search (mean over search
    seeds) and table 5's best ρ family on the same held-out seeds; which won, and where the
    preset hurt."""
    s, plan = results["settings"], results["plan"]
    methods = tuple(plan["families"])
    rows = {int(k): v for k, v in results.get("nfe", {}).items()}
    rho_rows = (headline.get("nfe", {}) if same_settings(with_legacy_factor(headline.get("settings")),
                                                         with_legacy_factor(s)) else {})
    rho_families = tuple(headline.get("plan", {}).get("families", ())) if rho_rows else ()
    machines = sorted({m for row in rows.values() for m in row.get("machines", [])})
    preset = results.get("freeu_preset", {})
    lines = [f"Written by `{results['command']}` on {results['date']}. Machine{'s' * (len(machines) > 1)}: "
             f"{'; '.join(machines) or 'see table 5 (every number here was taken from there)'}.", "",
             f"Model {s['model']}, Heun, Karras σ, the protocol of table 5: each method a search of {s['trials']} "
             f"trials (N = {s['n']}, rungs {','.join(map(str, s['rungs']))}, {_pruning(s)}) per search seed, its "
             f"exported best scored by FID on {s['truth_n']:,} held-out samples (seeds from {s['held_out_seed']:,}); "
             f"mean ± std over search seeds, change vs untuned. FreeU searches b1, b2 in [{freeu.B_RANGE[0]:g}, {freeu.B_RANGE[1]:g}] "
             f"and s1, s2 in [{freeu.S_RANGE[0]:g}, {freeu.S_RANGE[1]:g}], at every σ or inside a σ window, searched "
             f"as the first and last of the sampler's model calls it acts on (cells marked † searched the window's "
             f"ends in log σ over the σ range instead, the space before issue 27, where a window could hold no "
             f"model call); linear ρ + FreeU is the linear_freeu family (with the window). The preset is "
             f"{preset.get('name', 'SD1.5')}'s (b1, b2, s1, s2 = {', '.join(f'{v:g}' for v in preset.get('values', ()))})"
             f"{' (' + preset['why'] + ')' if preset.get('why') else ''}. {_taken(rows, bool(rho_rows))}", "",
             "| NFE | untuned | FreeU preset | " + " | ".join(FREEU_LABELS.get(m, m) for m in methods)
             + " | best ρ family (table 5) |",
             "| ---: | ---: | ---: | " + " | ".join("---:" for _ in methods) + " | ---: |"]
    verdicts, missing, compared = [], [], []
    for nfe, row in sorted(rows.items()):
        untuned = row.get("untuned")
        cells, changes = [], {}
        fids_of = {"FreeU preset": [row["freeu_preset"]] if "freeu_preset" in row else []}  # each column's held-out FIDs
        text, changes["FreeU preset"] = _cell(fids_of["FreeU preset"], untuned, searched=False)
        cells.append(text)
        for method in methods:
            label = FREEU_LABELS.get(method, method)
            fids = [r["held_out"] for r in row.get(method, [])]
            if len(fids) < plan["seeds"]:
                missing.append(f"NFE {nfe} {label} ({len(fids)} of {plan['seeds']} search seeds)")
            before = [r["held_out"] for r in row.get(f"{method}{SIGMA_WINDOW}", [])]
            if before:
                compared.append(f"NFE {nfe} {label}: {_cell(fids, untuned)[0]} with the window over model calls, "
                                f"{_cell(before, untuned)[0]} with it searched in log σ")
            # the cell: the method's searches, or, while none is re-measured yet, those it replaces (†)
            runs = row.get(method) or row.get(f"{method}{SIGMA_WINDOW}", [])
            fids_of[label] = fids = [r["held_out"] for r in runs]
            text, changes[label] = _cell(fids, untuned)
            in_sigma = method != "freeu_allsteps" and any("window" not in r for r in runs)
            cells.append(text + " †" * in_sigma)
        rho = rho_rows.get(str(nfe), {})
        rho_fids = {f: [r["held_out"] for r in rho.get(f, [])] for f in rho_families}
        rho_changes = {f: c for f in rho_families if (c := _cell(rho_fids[f], untuned))[1] is not None}
        if rho_changes:
            best_rho = min(rho_changes, key=lambda f: rho_changes[f][1])
            cells.append(f"{best_rho}: {rho_changes[best_rho][0]}")
            changes[f"tuned ρ ({best_rho})"] = rho_changes[best_rho][1]
            fids_of[f"tuned ρ ({best_rho})"] = rho_fids[best_rho]
        else:
            cells.append("–")
        lines.append(f"| {nfe} | {_fmt(untuned)} | " + " | ".join(cells) + " |")
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            best = min(changes, key=changes.get)
            verdict = f"NFE {nfe}: best {best} ({changes[best]:+.1f}% held-out FID)"
            if len(changes) > 1:
                verdict += _lead(best, min((k for k in changes if k != best), key=changes.get), changes, fids_of)
            if "FreeU preset" in changes:
                verdict += (f"; FreeU's preset {'hurt' if changes['FreeU preset'] >= 0 else 'helped'} "
                            f"({changes['FreeU preset']:+.1f}%)")
            verdicts.append(verdict)
    missing += [f"NFE {nfe}" for nfe in plan["nfes"] if nfe not in rows]
    if verdicts:
        lines += ["", *(f"{v}." for v in verdicts)]
    if compared:
        lines += ["", "Re-measured with the window over the model calls, beside the searches of the window in log σ "
                      "they replace (same seeds and held-out samples): " + "; ".join(compared) + "."]
    return lines + _footer(rows, methods, s["truth_n"], missing, "freeu.db")


def _lead(best: str, second: str, changes: dict, fids_of: dict) -> str:
    """How far the best method is ahead of the runner-up, in FID, and whether that is more than
    the larger std over search seeds of the two (a lead within it is not settled by these seeds)."""
    gap = statistics.fmean(fids_of[second]) - statistics.fmean(fids_of[best])
    stds = [statistics.stdev(fids_of[k]) for k in (best, second) if len(fids_of[k]) > 1]
    spread = (f", {'more' if gap > max(stds) else 'less'} than the larger std over search seeds ({max(stds):.3g})"
              if stds else "")
    return f", {gap:.3g} FID ahead of {second} ({changes[second]:+.1f}%){spread}"


def _footer(rows: dict, methods: tuple[str, ...], truth_n: int, missing: list[str], db: str) -> list[str]:
    """What each part took, and what is not measured yet, under a held-out table."""
    lines = []
    costs = [cost for nfe, row in sorted(rows.items()) if (cost := _cost(nfe, row, methods, truth_n))]
    if costs:
        lines += ["", "Time each part took (medians of wall seconds on the row's machine, slower where other work "
                      "shared it): " + "; ".join(costs) + "."]
    if missing:
        lines += ["", f"Not measured yet: {'; '.join(missing)}. Rerun the command to resume (each search is a "
                      f"study in `{db}` beside the results)."]
    return lines


def _taken(rows: dict, comparable: bool) -> str:
    """Where table 8's untuned FIDs and best ρ family come from."""
    copied = [nfe for nfe, row in sorted(rows.items()) if "untuned" in row.get("taken_from", {})]
    untuned = ("Untuned: table 5's numbers" if copied and len(copied) == len(rows) else
               f"Untuned: table 5's numbers at NFE {', '.join(map(str, copied))}, scored here at the others" if copied
               else "Untuned: scored here")
    rho = ("best ρ family: table 5's" if comparable else
           "best ρ family: not shown (table 5 was run with other settings or not at all)")
    return f"{untuned}; {rho} (same model, settings and held-out seeds)."


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _cost(nfe: int, row: dict, families: tuple[str, ...], truth_n: int) -> str:
    """'NFE n: a search X min (k searches), N held-out samples scored Y min (m times)' from what the row recorded."""
    runs = [r for f in families for r in row.get(f, [])]
    search = [r["search_seconds"] for r in runs if "search_seconds" in r]
    held = [r["held_out_seconds"] for r in runs if "held_out_seconds" in r]
    held += [row[f"{name}_seconds"] for name in FIXED if f"{name}_seconds" in row]
    parts = ([f"a search {statistics.median(search) / 60:.1f} min ({_times(len(search), 'search')})"] if search else []) + \
            ([f"{truth_n:,} held-out samples scored {statistics.median(held) / 60:.1f} min ({_times(len(held), 'time')})"]
             if held else [])
    return f"NFE {nfe}: " + ", ".join(parts) if parts else ""


def _times(k: int, noun: str) -> str:
    return f"{k} {noun}{'es' if noun.endswith('h') else 's'}" if k != 1 else f"1 {noun}"


# --- tables 5 and 8 in BENCHMARKS.md ----------------------------------------------------------
def _measure(ctx, file: str, methods: tuple[str, ...], fixed: tuple[str, ...], known: Path | None) -> None:
    size, quick = ctx.size, ctx.quick
    run_headline(ctx.model, size["headline_nfes"] or (ctx.nfe,), ctx.work / file, ctx.command, ctx.stamp["machine"],
                 seeds=size["headline_seeds"], trials=size["headline_trials"], n=size["search_n"],
                 rungs=(size["search_n"],) if quick else size["rungs"], reduction_factor=size["reduction_factor"],
                 truth_n=size["truth_n"],
                 batch=size["batch"], methods=methods, fixed=fixed, known=known, progress=ctx.progress)


register_table(Table(
    5, "Headline: held-out FID of each family's best schedule",
    lambda ctx: _measure(ctx, "headline.json", ctx.size["headline_families"], ("untuned",), None),
    lambda ctx: render(r) if (r := ctx.results("headline.json")).get("nfe") else None))
# table 8: table 5's protocol, settings and held-out seeds; its untuned FIDs taken from there
register_table(Table(
    8, "FreeU head to head: held-out FID of FreeU's preset, tuned FreeU and tuned ρ",
    lambda ctx: _measure(ctx, "freeu.json", FREEU_METHODS, ("untuned", "freeu_preset"), ctx.work / "headline.json"),
    lambda ctx: (render_freeu(r, ctx.results("headline.json")) if (r := ctx.results("freeu.json")).get("nfe")
                 else None)))
