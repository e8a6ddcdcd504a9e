"""search: run (or resume) one study, then export its best schedule."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.limits import MAX_KNOTS, MAX_N, MAX_SEARCH_SEED, MAX_TRIALS, MIN_KNOTS, RHO_MAX
from ..scoring.objectives import objective as objective_of
from ..scoring.objectives import objective_names, objectives_help
from ..core.freeu import VARIANTS as FREEU_VARIANTS
from ..search import OPTIMIZERS
from .common import (
    Number, UserError, batch_option, check_outputs, config_option, family_options, features_option, freeu_lines,
    friendly, model_inputs, parse_rungs, reference_inputs, storage_option, task_options, torch_setup,
)

RHO = Number(0, RHO_MAX, min_open=True)  # a schedule's ρ lies in (0, 4]


@click.command()
@config_option
@task_options
@storage_option
@click.option("--study", default=None,
              help="Study name: letters, digits, '.', '_', '-', at most 128 [default: "
                   "MODEL-SAMPLER-nfeNFE-FAMILY-PLACEMENT, FAMILY-allsteps with --no-window].")
@family_options
@click.option("--window/--no-window", "freeu_window", default=True, show_default=True,
              help="FreeU families: search the σ window FreeU acts in, or (--no-window) let it act at every σ, "
                   "as diffusers' enable_freeu does (for a Stable Diffusion or SDXL UNet, export then prints the "
                   "enable_freeu line).")
@click.option("--freeu-variant", default="v1-stages", show_default=True, type=click.Choice(list(FREEU_VARIANTS)),
              help="FreeU families: the FreeU function searched. v1-stages: diffusers' enable_freeu (b1/s1 on the "
                   "lowest-resolution decoder stage, b2/s2 on the next). v1-channels: keyed by the backbone's channel "
                   "count (b1/s1 where it is 4x the base channels, b2/s2 at 2x), as sd-webui-freeu's Version 1 "
                   "computes it. v2-channels: that, with FreeU v2's b scaled by the backbone's normalized channel "
                   "mean, as Forge's built-in FreeU and sd-webui-freeu's Version 2 compute it. Only a search in a "
                   "UI's variant exports a preset for that UI (export --format).")
@click.option("--knots", default=3, show_default=True, type=click.IntRange(MIN_KNOTS, MAX_KNOTS),
              help="σ knots of per_noise, log-spaced over the sampler's σ range.")
@click.option("--trials", default=16, show_default=True, type=click.IntRange(1, MAX_TRIALS),
              help="Finished trials the study should hold; a resumed study runs only the rest.")
@click.option("--n", "n", default=1000, show_default=True, type=click.IntRange(2, MAX_N),
              help="Samples per trial (proxy FID's N).")
@click.option("--rungs", default=None,
              help="Sample counts at which a trial reports FID, ending at N, e.g. 250,1000 [default: N/4,N]. "
                   "Successive halving keeps the best third at the first rung and at first rung x 3^k; "
                   "a single number turns pruning off.")
@click.option("--objective", default="fid", show_default=True, type=click.Choice(objective_names()),
              help=objectives_help())
@click.option("--rho-min", default=0.5, show_default=True, type=RHO, help="Lower bound of each ρ, in (0, 4].")
@click.option("--rho-max", default=1.5, show_default=True, type=RHO, help="Upper bound of each ρ, in (0, 4].")
@batch_option
@features_option
@click.option("--reference", default="bundled", show_default=True,
              help="Reference: 'bundled' (Fashion-MNIST test set, EfficientNet-Lite0 statistics and KID "
                   "features; only for a model whose record says it was trained on Fashion-MNIST: any other "
                   "model needs a reference of its own), an .npz with mu and sigma (EDM's reference files "
                   "work), 'fashion-mnist:test', or a folder of images (features cached under studies/cache by content hash).")
@click.option("--timeout", default=None, type=Number(0, min_open=True),
              help="Stop starting new trials after this many seconds.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="Where to export the best schedule [default: studies/STUDY.best.json].")
@click.option("--optimizer", default="tpe", show_default=True, type=click.Choice(OPTIMIZERS),
              help="Optuna sampler proposing the trials (grid: 11 values per ρ).")
@click.option("--search-seed", default=0, show_default=True, type=click.IntRange(0, MAX_SEARCH_SEED),
              help="Seed of the optimizer for a new study (a resumed or shared one reseeds, so as not to "
                   "repeat its points).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes sharing the study on this machine (one per GPU when there are GPUs; at most "
                   "one per GPU, or per CPU core without GPUs). "
                   "On other machines, run the same command with the same --storage.")
@click.option("--warm-start/--no-warm-start", default=True, show_default=True,
              help="A new study first tries, after the untuned model, the best trial of each study of the same "
                   "model, sampler, family and settings at another NFE in the storage (its FreeU window moved to "
                   "this sampler's calls); marked warm_start in the trial's attributes.")
@click.option("--heartbeat", default=60, show_default=True, type=click.IntRange(0, 86_400),
              help="Seconds between a running trial's heartbeats; a trial whose worker died is retried "
                   "after two missed beats (0: off; on this machine a dead worker's trial is retried at once).")
@friendly
def search(model, trust_pickle, edm_path, uvit_path, uvit_config, sigma_grid, prompts, guidance, height, width, precision,
           sampler, nfe, seed, threads, device, storage, study, family, placement, freeu_window, freeu_variant, knots, trials, n, rungs, objective,
           rho_min, rho_max, batch, features,
           inception_weights, reference, timeout, out, optimizer, search_seed, workers, warm_start, heartbeat) -> None:
    """Run (or resume) the Optuna study for one model, sampler, NFE, family and placement.

    The first trial is the untuned model (ρ = 1 everywhere); for the FreeU families the next is
    FreeU's published preset for the model; for the linear families then a paper-style ramp.
    Each trial samples N images from the same seeds (seed SEED+i for sample i), scores them
    against the reference at each rung (FID, KID, and FID∞ over the rungs), and may be pruned
    at a lower rung by successive halving. Every trial lands in the storage when it ends, with
    its sample grid as an artifact; rerunning the same command resumes the study until it holds
    --trials finished trials. At the end the best completed trial is exported as a schedule JSON
    (apply it with skiptune_search.apply).

    Trial numbers are Optuna's (from 0), as optuna-dashboard shows them.
    """
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task
    from ..search import workers as W
    from ..search.objective import run_search, trial_line
    from ..search.optimizers import unpruned_rungs
    from ..search.storage import artifact_dir, check_storage_url, shown_url
    from ..search.study import (
        baseline_trial, check_study_name, export_best, finished_trials, params_at_edge, queued_warm_starts,
    )
    from ..search.tune import check_window_family, prepare

    check_window_family(family, freeu_window, freeu_variant)  # before the model loads
    if rho_min >= rho_max:
        raise UserError(f"need --rho-min < --rho-max, got {rho_min} and {rho_max}")
    if study is not None:
        check_study_name(study)
    check_storage_url(storage)  # an in-memory storage: before the model loads
    out_path = Path(out) if out else None
    read = [*model_inputs(model, edm_path, uvit_path), ("the prompt file", prompts), *reference_inputs(reference),
            ("the Inception weights", inception_weights)]
    check_outputs(out_path, inputs=read, storage=storage)
    torch_setup(threads)
    if workers > 1:
        W.own_setup(workers)
    task = Task(model=model, sampler=sampler, nfe=nfe, n=n, seed=seed, features=features, reference=reference,
                rungs=parse_rungs(rungs, n), objective=objective, sigma_grid=sigma_grid, prompts=prompts,
                guidance=guidance, height=height, width=width, precision=precision)
    model_kwargs = dict(batch_size=batch, trust_pickle=trust_pickle, edm_path=edm_path, feature_weights=inception_weights,
                        device=device, uvit_path=uvit_path, uvit_config=uvit_config)
    evaluator = Evaluator(task, **model_kwargs)
    evaluator.check_reference()  # before any trial: statistics and the extractor's weights are there and fit
    search_kwargs = dict(family=family, placement=placement, rho_range=(rho_min, rho_max), knots=knots,
                         freeu_window=freeu_window, freeu_variant=freeu_variant, study=study, heartbeat=heartbeat,
                         search_seed=search_seed, optimizer=optimizer, warm_start=warm_start)
    space, st = prepare(evaluator, storage, **search_kwargs, parallel=workers > 1)
    name = st.study_name
    shown = shown_url(storage)
    label = objective_of(objective).label
    if out_path is None:  # the default beside the study, checked as soon as the study's name is known
        out_path = Path("studies") / f"{name}.best.json"
        check_outputs(out_path, inputs=read, storage=storage)
    click.echo(f"study {name!r} in {shown}: {finished_trials(st)} finished trials so far; "
               f"{task.sampler} NFE {task.nfe} ({task.sigma_grid} σ grid), N = {task.n} samples "
               f"(rungs {','.join(map(str, task.rungs))}), seeds {task.seed_label}, "
               f"objective {task.objective}, {task.precision}")
    if warm := queued_warm_starts(st):
        click.echo("warm start: after the baseline, the best of " + ", ".join(
            f"NFE {w['nfe']} ({label} {w['value']:.4g}, trial {w['trial']} of {w['study']})" for w in warm))
    if unchecked := unpruned_rungs(task.rungs):
        click.echo(f"note: successive halving checks only N = {task.rungs[0]} x 3^k, so rung(s) "
                   f"{','.join(map(str, unchecked))} report FID but never prune")

    def report(study, trial) -> None:
        if line := trial_line(study, trial, objective):
            click.echo(line)

    share, children = None, []
    if workers > 1:
        shares = W.split(max(0, trials - finished_trials(st)), workers)
        click.echo(f"{workers} workers: {', '.join(map(str, shares))} trials")
        children = W.spawn(shares, W.job(task, model_kwargs, storage, {**search_kwargs, "study": name}, trials,
                                         timeout, threads))
        share = shares[0]
    with W.stopped_with(children):  # interrupted: the workers are stopped and waited for first
        run_search(evaluator, st, space, trials, timeout, on_trial=report, artifacts=artifact_dir(storage),
                   share=share, progress=workers == 1)
        failed = W.wait(children)
    if failed:
        raise UserError(f"{failed} worker(s) failed; rerun the same command to finish the study")
    base = baseline_trial(st)
    schedule = export_best(st, storage)
    schedule.save(out_path)
    rhos = ", ".join("/".join(f"{v:.3f}" for v in row) for row in schedule.rho)
    click.echo("")
    click.echo(f"baseline {label} (ρ = 1): {base.value:.4g}" if base else f"baseline {label}: not finished")
    click.echo(f"{f'best {label}:':<22}{schedule.metric['value']:.4g} (trial {schedule.source['trial']})")
    if base:
        change = 100 * (schedule.metric["value"] - base.value) / base.value
        click.echo(f"{f'{label} change:':<22}{change:+.1f}% vs baseline")
    knots_text = f" at σ knots {', '.join(f'{k:.3g}' for k in schedule.sigma_knots)}" if schedule.sigma_knots else ""
    click.echo(f"best ρ (outer→inner): {rhos}{knots_text}  [{schedule.placement} placement]")
    for line in freeu_lines(schedule, prefix="best "):
        click.echo(line)
    if edge := params_at_edge(schedule.params, space.rho_range):
        click.echo(f"note: {', '.join(edge)} at the edge of the range [{rho_min:g}, {rho_max:g}]: the optimum may "
                   f"lie outside it; try a wider --rho-min/--rho-max in a new study (--study NEW_NAME)")
    click.echo(f"study storage:        {shown}  (study {name!r})")
    click.echo(f"best schedule:        {out_path}")


COMMANDS = [search]
