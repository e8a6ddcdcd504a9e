"""eye: tune by eye in optuna-dashboard (a preferential study), alone or on a FID study's best."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.freeu import VARIANTS as FREEU_VARIANTS
from ..core.limits import MAX_KNOTS, MAX_SEARCH_SEED, MIN_KNOTS, RHO_MAX
from .common import (
    Number, UserError, batch_option, check_outputs, config_option, family_options, freeu_lines, friendly,
    model_source, refuse_trust_for, storage_option, task_options, torch_setup,
)

RHO = Number(0, RHO_MAX, min_open=True)
# what --from-study takes from the FID study: given too, they are refused (they would be ignored)
FROM_STUDY = ("sampler", "nfe", "seed", "sigma_grid", "prompts", "guidance", "height", "width", "precision", "family",
              "placement", "freeu_window", "freeu_variant", "knots", "rho_min", "rho_max")


@click.command()
@config_option
@task_options
@storage_option
@click.option("--study", default=None,
              help="Name of the eye study: letters, digits, '.', '_', '-', at most 128 [default: the FID study's name "
                   "with --from-study, else search's default name; then -eye].")
@family_options
@click.option("--window/--no-window", "freeu_window", default=True, show_default=True,
              help="FreeU families: search FreeU's σ window, or let it act at every σ (as search).")
@click.option("--freeu-variant", default="v1-stages", show_default=True, type=click.Choice(list(FREEU_VARIANTS)),
              help="FreeU families: the FreeU function (as search).")
@click.option("--knots", default=3, show_default=True, type=click.IntRange(MIN_KNOTS, MAX_KNOTS),
              help="σ knots of per_noise (as search).")
@click.option("--rho-min", default=0.5, show_default=True, type=RHO, help="Lower bound of each ρ, in (0, 4].")
@click.option("--rho-max", default=1.5, show_default=True, type=RHO, help="Upper bound of each ρ, in (0, 4].")
@click.option("--from-study", default=None,
              help="Mixed mode: a FID study (run by search) whose --top best trials become candidates, after the "
                   "untuned model; the model, sampler, NFE, first seed, family and its settings are that study's.")
@click.option("--top", default=3, show_default=True, type=click.IntRange(1, 64),
              help="With --from-study: how many of its best completed trials to compare.")
@click.option("--grid", default=16, show_default=True, type=click.IntRange(2, 256),
              help="Samples in each candidate's grid: seeds SEED.. SEED+GRID-1 (and so the same prompts) for every "
                   "candidate, so only the schedule differs.")
@click.option("--show", default=4, show_default=True, type=click.IntRange(2, 16),
              help="Candidates in each set the dashboard shows; you mark the worst, a new one takes its place.")
@click.option("--choices", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="Stop once the study holds this many choices (a resumed study counts the ones it has); Ctrl-C "
                   "stops at any time, every choice kept.")
@click.option("--dashboard/--no-dashboard", "serve", default=True, show_default=True,
              help="Serve optuna-dashboard on the study from this command, or (--no-dashboard) judge in a dashboard "
                   "served elsewhere on the same storage and artifact folder ('skiptune-search dashboard').")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the dashboard binds: this machine only by default; another (e.g. 0.0.0.0) serves the "
                   "network, an explicit choice.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--search-seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEARCH_SEED),
              help="Seed of the preferential sampler for a new study (a resumed one reseeds).")
@batch_option
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="Where to export the most preferred schedule once --choices are made "
                   "[default: studies/STUDY.best.json].")
@friendly
def eye(model, trust_pickle, checkouts, uvit_config, sigma_grid, prompts, guidance, height, width,
        precision, sampler, nfe, seed, threads, device, storage, study, family, placement, freeu_window, freeu_variant,
        knots, rho_min, rho_max, from_study, top, grid, show, choices, serve, host, port, search_seed, batch,
        out) -> None:
    """Tune by eye: compare candidates' sample grids in optuna-dashboard and mark the worst of each set.

    Each candidate (a schedule of the family, as search proposes them) samples the same GRID seeds
    and prompts, so only the schedule differs; its grid is the trial's artifact. The untuned model
    comes first, then FreeU's published preset (FreeU families) or the paper-style ramp (linear).
    The dashboard (served here on --host:--port) shows --show candidates at a time and asks which
    is the worst; optuna-dashboard's preferential Gaussian-process sampler proposes the next one
    from every choice so far. At --choices choices (or Ctrl-C; rerunning resumes, every choice is
    in the storage) the most preferred candidate is exported as a schedule whose metric says it
    was chosen by eye. With --from-study, a FID study's best trials are candidates too, so your
    time goes to the close calls. Needs the eye extra: pip install 'skiptune-search[eye]'.
    """
    from ..core.errors import StudyError
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task
    from ..search import eye as E
    from ..search.dashboard import check_address, serve_in_background
    from ..search.storage import artifact_dir, check_storage_url, make_storage, shown_url
    from ..search.study import check_study_name, load_own_study, study_settings

    E.preferential_sampler(None)  # the extra, before any work
    if rho_min >= rho_max:
        raise UserError(f"need --rho-min < --rho-max, got {rho_min} and {rho_max}")
    if study is not None:
        check_study_name(study)
    check_storage_url(storage)
    if serve:
        check_address(host, port)  # before the model loads
    out_path = Path(out) if out else None
    source = None
    ctx = click.get_current_context()
    if from_study is None and ctx.get_parameter_source("top") != click.core.ParameterSource.DEFAULT:
        raise UserError("--top: it counts the best trials of --from-study; give --from-study NAME too")
    if from_study is not None:
        given = [p for p in FROM_STUDY if ctx.get_parameter_source(p) not in
                 (click.core.ParameterSource.DEFAULT, None)]
        if given:
            flag = next(max(p.opts, key=len) for p in ctx.command.params if p.name == given[0])
            raise UserError(f"{flag}: the eye study takes it from --from-study {from_study}; leave it out")
        try:
            source = load_own_study(make_storage(storage, heartbeat=None, create=False), from_study, shown_url(storage))
        except StudyError as exc:  # it names the study the FID search ran: here, --from-study
            raise StudyError(str(exc), option="from_study") from None
        task_key = study_settings(source)["task"]
        if ctx.get_parameter_source("model") == click.core.ParameterSource.DEFAULT:
            refuse_trust_for(task_key["model"], f"the study {from_study!r}", trust_pickle)
            model = task_key["model"]
        elif model != task_key["model"]:
            raise UserError(f"--model: study {from_study!r} searched {task_key['model']}, not {model}; leave --model "
                            f"out, or give that model")
        task = E.eye_task(study_settings(source), grid)
    else:
        task = Task(model=model, sampler=sampler, nfe=nfe, n=grid, seed=seed, rungs=(grid,), sigma_grid=sigma_grid,
                    prompts=prompts, guidance=guidance, height=height, width=width, precision=precision)
    model_at = model_source(model, trust_pickle, checkouts, uvit_config)
    read = [*model_at.inputs(), ("the prompt file", task.prompts)]
    check_outputs(out_path, inputs=read, storage=storage)
    torch_setup(threads)
    evaluator = Evaluator(task, batch, source=model_at, device=device)
    space, pstudy = E.prepare_eye(evaluator, storage, study=study, source=source, top=top, show=show,
                                  search_seed=search_seed, family=family, placement=placement,
                                  rho_range=(rho_min, rho_max), knots=knots, freeu_window=freeu_window,
                                  freeu_variant=freeu_variant)
    name = pstudy.study_name
    if out_path is None:
        out_path = Path("studies") / f"{name}.best.json"
        check_outputs(out_path, inputs=read, storage=storage)
    shown = shown_url(storage)
    click.echo(f"eye study {name!r} in {shown}: {E.choices(pstudy)} of {choices} choices so far; {task.sampler} NFE "
               f"{task.nfe}, a grid of seeds {task.seed_label} per candidate, {show} candidates per set"
               + (f"; candidates from the best {top} of {from_study!r}" if source is not None else ""))
    if serve:
        url = serve_in_background(storage, host, port)
        click.echo(f"optuna-dashboard: {url}{E.study_page(pstudy)}  (mark the worst grid of each set; Ctrl-C here "
                   f"stops, every choice kept)")
    else:
        click.echo(f"judge in optuna-dashboard on this storage: skiptune-search dashboard --storage {shown}")

    def candidate(trial) -> None:
        params = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        click.echo(f"candidate trial {trial.number}: {params}")

    made = E.run_eye(evaluator, pstudy, space, choices, artifact_dir(storage), on_candidate=candidate,
                     on_choice=lambda n: click.echo(f"choice {n}/{choices} recorded"))
    schedule = E.preferred_schedule(pstudy, storage)
    schedule.save(out_path)
    rhos = ", ".join("/".join(f"{v:.3f}" for v in row) for row in schedule.rho)
    click.echo("")
    click.echo(f"most preferred:       trial {schedule.source['trial']} after {made} choices")
    click.echo(f"its ρ (outer→inner):  {rhos}  [{schedule.placement} placement]")
    for line in freeu_lines(schedule, prefix="its "):
        click.echo(line)
    click.echo(f"study storage:        {shown}  (study {name!r})")
    click.echo(f"schedule:             {out_path}")


COMMANDS = [eye]
