"""The trial objective: the one function from an Optuna trial to a score.

Everything that runs a trial goes through ``Objective``: ``search`` and its workers (scored by
sampling the model), benchmark table 2's Optuna timing (made-up scores) and table 4's replays
(scores looked up in the exhaustive grid). So a change to the rungs, the pruning rule or the
trial's attributes changes the benchmarks too. A scorer is anything with
``score(schedule, progress) -> iterator of Rung``, one per rung, in growing sample counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import optuna

from ..core.errors import NonFiniteSamplesError
from ..core.schedule import RhoSchedule, SkipInfo
from ..scoring.evaluator import Rung
from ..scoring.metrics import fid_inf
from ..scoring.objectives import objective as objective_of
from . import interrupts
from .space import Space, first_marks, first_note
from .storage import storage_fault, storage_faults
from .study import finished_trials, is_finished, recover_dead_trials, worker_id


class Scorer(Protocol):
    """Scores a schedule rung by rung: ``Evaluator`` samples the model; the benchmarks look
    scores up or make them up."""

    def score(self, schedule: RhoSchedule, progress: bool | str = False) -> Iterator[Rung]: ...


class SurplusTrial(Exception):
    """A trial beyond the study's target count, started by one of several processes at once: it
    stops before it suggests or samples anything, and is not counted."""


class Objective:
    """Suggest a schedule from ``space``, score it rung by rung, report each rung to Optuna and
    prune (never the ρ = 1 baseline: it is the reference of every change), and record what the
    dashboard and ``export`` read: ρ, FID (and KID) at each rung, FID∞, wall time, seeds.

    With ``limit``, a new trial first takes its place in the study: when the trials ahead of it
    (by Optuna's trial number, which the storage hands out atomically) that have finished, run or
    wait already make ``limit``, it is surplus and stops at once; so several processes sharing a
    study end with exactly ``limit`` finished trials.

    A proposal that scales every skip exactly as a finished trial did at each of the sampler's
    model calls (``call_sigmas``; a σ-independent schedule at any σ) would sample the same images:
    it is not sampled again but recorded with that trial's scores and state, marked ``same_as``."""

    def __init__(self, scorer: Scorer, space: Space, arch: str, skips: Sequence[SkipInfo], rungs: Sequence[int],
                 objective: str = "fid", seeds: str | None = None, artifacts: Path | None = None,
                 label: Callable[[], str] | None = None, limit: int | None = None,
                 call_sigmas: Sequence[float] = (), hidden: Sequence[int | None] | None = None) -> None:
        self.call_sigmas, self.hidden = tuple(call_sigmas), hidden
        self.scorer, self.space, self.arch, self.skips = scorer, space, arch, list(skips)
        self.rungs, self.objective, self.seeds, self.limit = tuple(rungs), objective_of(objective), seeds, limit
        self.store = None
        if artifacts is not None:
            from optuna.artifacts import FileSystemArtifactStore

            artifacts.mkdir(parents=True, exist_ok=True)
            self.store = FileSystemArtifactStore(str(artifacts))
        self.label = label

    def __call__(self, trial: optuna.Trial) -> float:
        interrupts.check()  # a signal that came while Optuna set this trial up: it ends failed, not RUNNING
        trial.set_user_attr("worker", worker_id())  # first: a later run on this host can tell if its process died
        if self.limit is not None and (why := self._surplus(trial)):
            trial.set_user_attr("surplus", True)
            if why == "count":  # the study is full: this process is done
                trial.study.stop()
            raise SurplusTrial(f"trial {trial.number}: {why}")
        params, placement = self.space.suggest(trial, self.skips)
        schedule = self.space.schedule(self.arch, self.skips, {**params, "placement": placement})
        start = time.perf_counter()
        trial.set_user_attr("rho", schedule.rho)
        if schedule.freeu is not None:
            trial.set_user_attr("freeu", schedule.freeu.as_json())
        if (key := calls_key(schedule, self.call_sigmas, self.hidden)) is not None:
            trial.set_user_attr("calls_key", key)
            if not trial.user_attrs.get("baseline") and (same := self._same_as(trial, key)) is not None:
                return self._copy(trial, same)
        label = self.label() if self.label else False
        fids: dict[int, float] = {}
        kids: dict[int, float] = {}
        seen: list[Rung] = []  # every rung so far, without its features and images: what the objective's value reads
        grid = None
        scores = self.scorer.score(schedule, progress=label)
        try:
            for k in range(len(self.rungs)):
                with interrupts.immediate():  # sampling: the long part, where Ctrl-C acts at once
                    rung = next(scores)
                fids[rung.n] = rung.fid
                trial.set_user_attr("fid_at", {str(n): v for n, v in fids.items()})
                if rung.kid is not None:
                    kids[rung.n] = rung.kid
                    trial.set_user_attr("kid_at", {str(n): v for n, v in kids.items()})
                seen.append(dataclasses.replace(rung, features=None, images=None))
                for name in rung.values:  # an objective's own metric at each rung
                    trial.set_user_attr(f"{name}_at", {str(r.n): r.values[name] for r in seen})
                grid = rung.images if grid is None else grid
                trial.set_user_attr("wall_seconds", round(time.perf_counter() - start, 2))
                # what each rung reports: the objective's rung value (FID for fid_inf, which needs every rung)
                value = self.objective.rung(rung)
                trial.report(value, step=rung.n)
                if k < len(self.rungs) - 1 and trial.should_prune() and not trial.user_attrs.get("baseline"):
                    raise optuna.TrialPruned(f"{self.objective.rung_name} {value:.4g} at N={rung.n}")
        except NonFiniteSamplesError as exc:
            trial.set_user_attr("fail_reason", str(exc))  # a failure of its own: counts as finished
            raise
        n = self.rungs[-1]
        trial.set_user_attr("fid", fids[n])
        trial.set_user_attr("n", n)
        if self.seeds:
            trial.set_user_attr("seeds", self.seeds)
        if kids:
            trial.set_user_attr("kid", kids[n])
        if len(fids) > 1:
            trial.set_user_attr("fid_inf", fid_inf(list(fids), list(fids.values())))
        if self.store is not None and grid is not None:
            self._upload_grid(trial, grid)
        return self.objective.final(seen)

    def _surplus(self, trial: optuna.Trial) -> str | None:
        """Why this trial must not run, or None: 'count' when the trials ahead of it already
        make the target, 'duplicate' for a second baseline, preset or ramp (two processes opening a new
        study at once both queue them). Retries of dead trials always run."""
        if "retry_of" in trial.user_attrs:
            return None
        live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        ahead, marks, marks_of_first = 0, set(), first_marks()
        for t in trial.study.get_trials(deepcopy=False):
            if t.number >= trial.number or not (is_finished(t) or t.state in live):
                continue
            mark = next((m for m in marks_of_first if t.user_attrs.get(m)), None)
            if mark in marks:
                continue  # a duplicate: it will not run either
            marks.add(mark) if mark else None
            ahead += 1
        mine = next((m for m in marks_of_first if trial.user_attrs.get(m)), None)
        if mine is not None:
            return "duplicate" if mine in marks else None
        return "count" if ahead >= self.limit else None

    @staticmethod
    def _same_as(trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        """The first completed or pruned trial whose skips were scaled exactly as ``key`` says."""
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return next((t for t in trial.study.get_trials(deepcopy=False, states=done)
                     if t.user_attrs.get("calls_key") == key and "same_as" not in t.user_attrs), None)

    def _copy(self, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> float:
        """Record ``same``'s scores as this trial's, without sampling: its rungs reported again,
        pruned where it was pruned."""
        trial.set_user_attr("same_as", same.number)
        for attr in ("fid_at", "kid_at", "fid", "kid", "fid_inf", "n", "seeds", f"{self.objective.name}_at"):
            if attr in same.user_attrs:
                trial.set_user_attr(attr, same.user_attrs[attr])
        trial.set_user_attr("wall_seconds", 0.0)
        for step, value in sorted(same.intermediate_values.items()):
            trial.report(value, step=step)
        if same.state == optuna.trial.TrialState.PRUNED:
            raise optuna.TrialPruned(f"same as trial {same.number}")
        return same.value

    def _upload_grid(self, trial: optuna.Trial, images) -> None:
        upload_grid(self.store, trial, images[:64], nrow=8)


def upload_grid(store, trial: optuna.Trial, images, nrow: int | None = None) -> str:
    """``images`` (uint8 [N, C, H, W]) as one PNG grid, uploaded as ``trial``'s artifact named by
    its trial number (the number optuna-dashboard shows); returns the artifact's id."""
    from optuna.artifacts import upload_artifact

    from ..sampling.images import save_grid

    with tempfile.TemporaryDirectory() as tmp:
        path = save_grid(images, Path(tmp) / f"trial-{trial.number}-samples.png", nrow=nrow)
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="image/png")


def calls_key(schedule: RhoSchedule, call_sigmas: Sequence[float],
              hidden: Sequence[int | None] | None = None) -> str | None:
    """A short digest of what ``schedule`` does at each of the model calls at ``call_sigmas``
    (``RhoSchedule.factors_at``: every skip's ρ and FreeU factors there; ``hidden``: the blocks'
    backbone channels, for FreeU keyed by them) and of its placement; equal digests sample equal
    images. None for a schedule that depends on σ when the calls are not known."""
    if schedule.depends_on_sigma and not call_sigmas:
        return None
    calls = [[(f.rho, f.b, f.s) if f.freeu else (f.rho, 1.0, 1.0) for f in schedule.factors_at(sigma, hidden)]
             for sigma in (call_sigmas or [None])]
    return hashlib.sha256(json.dumps([schedule.placement, calls]).encode()).hexdigest()[:16]


@storage_faults
def run_search(evaluator, study: optuna.Study, space: Space, trials: int, timeout: float | None = None,
               on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
               artifacts: Path | None = None, share: int | None = None, progress: bool | str = True) -> optuna.Study:
    """Run trials of ``evaluator``'s task until the study holds ``trials`` finished (complete,
    pruned or failed) trials, or, for one of several workers, exactly ``share`` trials. Trials
    queued again after a dead process (the baseline among them) run even when the count is met.

    With ``artifacts`` (a folder), each completed trial uploads a grid of its first 64 samples as
    an Optuna artifact, which optuna-dashboard shows on the trial's page. ``progress``: a bar per
    trial, its label led by ``progress`` when that is text (a benchmark's 'search 4/168')."""
    task = evaluator.task
    # the bar counts finished trials, not trial numbers: a retried trial of a dead worker has a number too
    lead = f"{progress}, " if isinstance(progress, str) else ""
    label = (lambda: f"{lead}trial {finished_trials(study) + 1}/{trials}") if progress else None
    objective = Objective(evaluator, space, evaluator.controller.arch, evaluator.controller.skips, task.rungs,
                          task.objective, task.seed_label, artifacts, label, limit=trials,
                          call_sigmas=evaluator.call_sigmas, hidden=evaluator.controller.hidden_channels())

    def stop_at_total(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # other processes (workers, machines) add trials too: --trials is the study's total
        if interrupts.state.seen or finished_trials(study) >= trials and not _queued(study):
            study.stop()

    recover_dead_trials(study)
    remaining = max(trials - finished_trials(study), len(_queued(study))) if share is None else share
    if remaining > 0:
        callbacks = [*([on_trial] if on_trial else []), stop_at_total]
        verbosity = optuna.logging.get_verbosity()
        # the caller reports each trial's end itself: Optuna's own warnings would repeat a NaN
        # trial's failure, or print an interrupted trial's traceback before the one clear line
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            with interrupts.deferred():  # Ctrl-C acts inside a trial's sampling, or between trials
                study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=callbacks,
                               catch=(NonFiniteSamplesError, SurplusTrial), gc_after_trial=False)
        except Exception as exc:
            if (error := storage_fault(exc)) is None:
                raise
            try:  # the write that ended a trial failed: leave none of this process's trials RUNNING
                recover_dead_trials(study, own=True)
            except Exception as again:  # the storage still refuses (the disk still full, the lock still held)
                if storage_fault(again) is None:
                    raise
                raise type(error)(f"{error}; a trial of this run stays running until the next search on this "
                                  f"storage runs it again", option=error.option) from None
            raise error from None
        finally:
            optuna.logging.set_verbosity(verbosity)
        interrupts.check()
    return study


def trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, objective: str = "fid") -> str | None:
    """The line a search prints when a trial ends (None for a surplus trial, which another process's
    trial made unnecessary): pruned, failed, or its value, parameters and the study's best."""
    attrs = trial.user_attrs
    if attrs.get("surplus"):
        return None
    same = f" (same as trial {attrs['same_as']}: not sampled again)" if "same_as" in attrs else ""
    if trial.state.name == "PRUNED":
        step = trial.last_step
        rung_label = objective_of(objective).rung_name  # what each rung reports
        return f"trial {trial.number}: pruned at N={step} ({rung_label} {trial.intermediate_values[step]:.4g}){same}"
    if trial.value is None:
        return f"trial {trial.number}: failed ({trial.user_attrs.get('fail_reason', 'see log')})"
    params = " ".join(f"{k}={v:.4g}" if k.startswith("sigma") else f"{k}={v:.3f}" if isinstance(v, float)
                      else f"{k}={v}" for k, v in trial.params.items())
    warm = attrs.get("warm_start")
    tag = (" (baseline)" if attrs.get("baseline")
           else f" (FreeU preset: {attrs['freeu_preset_note']})" if attrs.get("freeu_preset")
           else f" ({note})" if (note := first_note(attrs))
           else f" (warm start: the best of NFE {warm['nfe']}, trial {warm['trial']} of {warm['study']})" if warm
           else same)
    label = objective_of(objective).label
    return (f"trial {trial.number}: {label} {trial.value:.4g}  {params}{tag}  "
            f"[{trial.user_attrs['wall_seconds']:.0f}s, best {study.best_value:.4g}]")


def _queued(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Waiting trials that must run even past the trial count: the ρ = 1 baseline (every export
    compares with it) and retries of trials whose process died."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if t.user_attrs.get("baseline") or "retry_of" in t.user_attrs]
