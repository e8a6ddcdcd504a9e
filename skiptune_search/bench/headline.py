"""The headline benchmark (BENCHMARKS.md table 5): does tuning help, by how much, per family?

For each NFE: the untuned model and the exported best schedule of a real search (the default
task: 16 trials, rungs, pruning) of each family, for several search seeds, all scored by FID on
many held-out samples. Searches live in a SQLite study file in the work folder, and every
finished number is written to a JSON file at once: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..core.errors import StudyError
from ..core.schedule import RHO_FAMILIES
from ..models.loaders import weights_fingerprint
from ..scoring.evaluator import Evaluator
from ..scoring.task import Task
from ..search.objective import run_search
from ..search.space import Space, log_spaced_knots
from ..search.storage import make_storage
from ..search.study import export_best, load_own_study, open_study
from .search import HELD_OUT_SEED, check_same_settings, load_results, save_results


def run_headline(model: str, nfes: tuple[int, ...], path: Path, command: str, machine: str, *, seeds: int,
                 trials: int, n: int, rungs: tuple[int, ...], truth_n: int, batch: int,
                 families: tuple[str, ...] = RHO_FAMILIES, progress: bool = True) -> dict:
    """Search each family at each NFE ``seeds`` times and score the untuned model and each best
    schedule on ``truth_n`` held-out samples."""
    results = load_results(path)

    def evaluator_for(nfe: int) -> Evaluator:
        return Evaluator(Task(model=model, nfe=nfe, n=n, rungs=rungs), batch_size=min(batch, n))

    evaluator = evaluator_for(nfes[0])
    settings = {"model": model, "trials": trials, "n": n, "rungs": list(rungs), "truth_n": truth_n,
                "held_out_seed": HELD_OUT_SEED,  # and the weights: a model retrained in place is another model
                "weights": weights_fingerprint(evaluator.controller.unet)}
    check_same_settings(path, "headline results", results.get("settings"), settings)
    results.update(settings=settings, command=command, machine=machine, date=time.strftime("%Y-%m-%d"),
                   plan={"nfes": list(nfes), "families": list(families), "seeds": seeds})
    storage_url = f"sqlite:///{Path(path).with_suffix('.db')}"
    storage = make_storage(storage_url, heartbeat=None)
    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + truth_n))
    for nfe in nfes:
        row = results.setdefault("nfe", {}).setdefault(str(nfe), {})
        if evaluator.task.nfe != nfe:  # each NFE its own evaluator (its σ grid); the previous one is dropped
            evaluator = evaluator_for(nfe)

        def save() -> None:  # each finished number at once, with the machine that measured it
            if machine not in row.setdefault("machines", []):
                row["machines"].append(machine)
            save_results(path, results)

        def held_out_fid(schedule, label: str) -> tuple[float, float]:
            """FID on the held-out samples, and the seconds it took."""
            start = time.perf_counter()
            rung = next(evaluator.score(schedule, rungs=(len(held_out),), seeds=held_out,
                                        progress=progress and f"NFE {nfe} {label} held-out", kid=False))
            return rung.fid, time.perf_counter() - start

        if "untuned" not in row:
            row["untuned"], row["untuned_seconds"] = held_out_fid(evaluator.controller.identity(), "untuned")
            save()
        knots = log_spaced_knots(*evaluator.sigma_range, 3)
        for family in families:
            space = Space(family, "input", (0.5, 1.5), knots if family == "per_noise" else ())
            runs = row.setdefault(family, [])
            for run in runs:  # runs recorded before search times were: their trials' times are in the study
                if "search_seconds" not in run:
                    try:
                        old = load_own_study(storage, study_name(nfe, family, run["seed"]), storage_url)
                    except StudyError:
                        continue
                    run["search_seconds"] = search_seconds(old)
                    save()
            for seed in range(len(runs), seeds):
                # a trial a killed run left running is failed and queued again by open_study
                study = open_study(storage, study_name(nfe, family, seed), evaluator.task, space,
                                   evaluator.controller, seed)
                run_search(evaluator, study, space, trials, progress=progress)
                best = export_best(study, storage_url)
                fid, seconds = held_out_fid(best, f"{family} seed {seed}")
                runs.append({"seed": seed, "search_value": best.metric["value"],
                             "search_baseline": best.metric["baseline"], "held_out": fid, "params": best.params,
                             "search_seconds": search_seconds(study), "held_out_seconds": seconds})
                save()
    return results


def study_name(nfe: int, family: str, seed: int) -> str:
    """The name of one headline search's study in the work folder's study file."""
    return f"headline-nfe{nfe}-{family}-seed{seed}"


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
             f"(N = {s['n']}, rungs {','.join(map(str, s['rungs']))}, input placement, ρ in [0.5, 1.5]) per search "
             f"seed; its exported best and the untuned model are scored by FID on {s['truth_n']:,} held-out "
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
            if not fids or "untuned" not in row:
                cells.append("–")
                continue
            std = f" ± {statistics.stdev(fids):.3g}" if len(fids) > 1 else ""
            changes[family] = 100 * (statistics.fmean(fids) - row["untuned"]) / row["untuned"]
            some_no_better = max(fids) >= row["untuned"]
            cells.append(f"{statistics.fmean(fids):.4g}{std} ({changes[family]:+.1f}%, {len(fids)} seed{'s' * (len(fids) > 1)}"
                         + (", one or more no better than untuned" if some_no_better else "") + ")")
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
    costs = [cost for nfe, row in sorted(rows.items()) if (cost := _cost(nfe, row, families, s["truth_n"]))]
    if costs:
        lines += ["", "Time each part took (medians of wall seconds on the row's machine, slower where other work "
                      "shared it): " + "; ".join(costs) + "."]
    if missing:
        lines += ["", f"Not measured yet: {'; '.join(missing)}. Rerun the command to resume (each search is a "
                      f"study in `headline.db` beside the results)."]
    return lines


def _cost(nfe: int, row: dict, families: tuple[str, ...], truth_n: int) -> str:
    """'NFE n: a search X min (k searches), N held-out samples scored Y min (m times)' from what the row recorded."""
    runs = [r for f in families for r in row.get(f, [])]
    search = [r["search_seconds"] for r in runs if "search_seconds" in r]
    held = [r["held_out_seconds"] for r in runs if "held_out_seconds" in r]
    held += [row["untuned_seconds"]] if "untuned_seconds" in row else []
    parts = ([f"a search {statistics.median(search) / 60:.1f} min ({_times(len(search), 'search')})"] if search else []) + \
            ([f"{truth_n:,} held-out samples scored {statistics.median(held) / 60:.1f} min ({_times(len(held), 'time')})"]
             if held else [])
    return f"NFE {nfe}: " + ", ".join(parts) if parts else ""


def _times(k: int, noun: str) -> str:
    return f"{k} {noun}{'es' if noun.endswith('h') else 's'}" if k != 1 else f"1 {noun}"
