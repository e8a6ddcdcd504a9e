"""skiptune-search: tune the long-skip coefficients ρ of a diffusion UNet for few-step sampling.

Every command's help text is its manual: `skiptune-search COMMAND --help`.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from .metrics import FEATURE_LAYERS
from .sampling import SAMPLERS, SIGMA_GRIDS
from .schedule import FAMILIES, PLACEMENTS
from .search import DEFAULT_STORAGE, OBJECTIVES, OPTIMIZERS, PRECISIONS


class UserError(click.ClickException):
    """A one-line error for bad input; exit code 2."""

    exit_code = 2


# what an interrupted command kept, by command
_RESUME_HINTS = {"search": ": every finished trial is saved; rerun the same command to resume",
                 "bench": ": every finished point is saved under --work; rerun the same command to resume",
                 "train_default": ": rerun the same command to resume from the last saved state (--state)"}


def _friendly(fn):
    """Turn the errors a user can cause into one line naming the problem and the fix."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        from .data import DataNotFoundError
        from .metrics import FeatureWeightsError, ReferenceStatsError
        from .schedule import ScheduleError
        from .search import StorageError, StudyMismatchError
        from .skips import NoSkipsError
        from .zoo import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except (DataNotFoundError, FeatureWeightsError, ReferenceStatsError, ScheduleError, StorageError,
                StudyMismatchError, NoSkipsError, ModelLoadError, ValueError) as exc:
            raise UserError(str(exc)) from None
        except torch.cuda.OutOfMemoryError:
            raise UserError("out of GPU memory: pass a smaller --batch (a text-to-image model doubles it for "
                            "guidance)") from None
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted{_RESUME_HINTS.get(fn.__name__, '')}", err=True)
            sys.exit(130)

    return wrapper


class _CtrlC:
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also remembered: a library that
    swallows the exception in a clean-up path (SQLAlchemy's connection pool can) cannot make a
    search go on as if nothing happened. The search exits 130; the trial under way is marked
    failed and does not count toward --trials."""

    seen = False

    @classmethod
    def install(cls) -> None:
        import signal

        def handler(signum, frame):
            cls.seen = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)


def _task_options(fn):
    """--model, --sampler, --nfe, --seed: the same on every command that samples."""
    fn = click.option("--seed", default=0, show_default=True, type=int,
                      help="First seed; sample i uses seed SEED+i (same noise in every trial).")(fn)
    fn = click.option("--nfe", default=9, show_default=True, type=int,
                      help="Denoiser evaluations per sample (Heun: 2*steps-1, so odd).")(fn)
    fn = click.option("--sampler", default="heun", show_default=True, type=click.Choice(list(SAMPLERS)),
                      help="ODE sampler in σ space on --sigma-grid: EDM's Heun (NFE = 2*steps-1), Euler or "
                           "DPM-Solver++(2M) (NFE = steps); or, for diffusers pipelines, diffusers' own DDIM, "
                           "DPM-Solver multistep or UniPC on the model's timesteps (NFE = steps).")(fn)
    fn = _precision_option(_text_options(_grid_option(fn)))
    fn = _model_options(fn)
    fn = click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch's default).")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="'auto' (a CUDA GPU when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.")(fn)
    return fn


def _precision_option(fn, default: str | None = "fp32"):
    return click.option("--precision", default=default, show_default=default is not None,
                        type=click.Choice(list(PRECISIONS)),
                        help="Precision of the model's forward: fp32, or bf16 autocast (convolutions and matmuls "
                             "in bf16; the sampler's steps and the FID stay fp32). bf16 is about 1.8x faster on an "
                             "H200 (BENCHMARKS.md table 6) but slower on most CPUs; a schedule is tuned for one "
                             "precision." + ("" if default else " [default: the schedule's]"))(fn)


def _grid_option(fn, default_help: str = "karras; model for ddim, dpmsolver, unipc"):
    return click.option("--sigma-grid", default=None, type=click.Choice(SIGMA_GRIDS),
                        help="σ steps of heun/euler/dpmpp_2m: karras (Karras et al. ρ = 7, σ_max to σ_min) or "
                             "model (the model's own training timesteps, evenly spaced, rounded; diffusers "
                             f"DDPM-family and text models only). [default: {default_help}]")(fn)


def _text_options(fn, default: str = "none; required for text-to-image models",
                  guidance_default: str = "7.5 with --prompts"):
    fn = click.option("--guidance", default=None, type=float,
                      help="Classifier-free guidance scale of a text-to-image model: uncond + G*(cond - uncond) "
                           f"in one batched UNet call; 1 = no guidance (one call). [default: {guidance_default}]")(fn)
    fn = click.option("--prompts", default=None, type=click.Path(dir_okay=False),
                      help="Prompt file of a text-to-image model (Stable Diffusion style): one prompt per line, "
                           f"blank lines ignored; the sample of seed s uses prompt s mod P. [default: {default}]")(fn)
    return fn


def _model_options(fn):
    """--model, --trust-pickle, --edm-path: which model, and consent to run a pickle's code."""
    fn = click.option("--edm-path", default=None, type=click.Path(file_okay=False),
                      help="Checkout of NVlabs/edm, needed to unpickle EDM networks.")(fn)
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow loading an EDM .pkl (unpickling runs code from the file).")(fn)
    fn = click.option("--model", default="fashion-mnist-edm", show_default=True,
                      help="'fashion-mnist-edm' (bundled), a model folder written by train-default, a "
                           "diffusers DDPM-family or Stable-Diffusion-style pipeline (folder, or repo id in the "
                           "local cache), or an EDM network pickle (.pkl, with --trust-pickle).")(fn)
    return fn


def _tuned_for_defaults(schedule, **given) -> tuple:
    """model, sampler, nfe, sigma_grid, prompts, guidance, precision: each one that the command
    line (or --config) leaves unset is what ``schedule`` was tuned for; its σ grid only with its
    sampler; fp32 for a schedule that names no precision."""
    tuned, source = schedule.tuned_for, click.get_current_context().get_parameter_source
    v = {name: tuned[name] if name in tuned and source(name) == click.core.ParameterSource.DEFAULT else value
         for name, value in given.items()}
    same_sampler = v["sampler"] == tuned.get("sampler")  # another sampler keeps its own default grid
    grid = given["sigma_grid"] or (tuned.get("sigma_grid") if same_sampler else None)
    return v["model"], v["sampler"], v["nfe"], grid, v["prompts"], v["guidance"], v["precision"] or "fp32"


def _set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: the file's values become this command's defaults (the command line wins)."""
    if value is None:
        return None
    from .config import ConfigError, check_value, read_config

    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    try:
        values = {k: check_value(value, k, v, params[k], ctx) for k, v in read_config(value, params).items()}
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _config_option(fn):
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config,
                        help="TOML file of option values (keys as the long options, e.g. nfe = 19).")(fn)


def _parse_rungs(text: str | None, n: int) -> tuple[int, ...]:
    """'250,1000' -> (250, 1000); none given -> (N/4, N), or just (N) when N/4 < 2."""
    if not text:
        return (n // 4, n) if n // 4 >= 2 else (n,)
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise UserError(f"--rungs {text!r} is not a comma-separated list of sample counts, e.g. 250,1000") from None


def _storage_option(fn):
    return click.option("--storage", default=DEFAULT_STORAGE, show_default=True,
                        help="Optuna storage: any SQLAlchemy URL (sqlite:///..., postgresql://...).")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="skiptune-search")
def main() -> None:
    """Automatic Skip-Tuning (Ma et al., ICML 2024): search the ρ that multiplies each long
    skip of a diffusion UNet, scored by proxy FID, persisted in an Optuna study, exported as JSON.

    \b
    Typical day:
      skiptune-search search                      # tune the bundled model (resumable)
      skiptune-search export --study NAME -o best.json
      skiptune-search sample --schedule best.json -n 64 -o grid.png
    """
    import torch

    # denormal floats (a UNet's activations at large σ make many) are ~30x slower on x86 CPUs;
    # flushing them to zero left every uint8 sample of the bundled model unchanged and makes
    # the high-σ steps as fast as the others
    torch.set_flush_denormal(True)


@main.command()
@_config_option
@_task_options
@_storage_option
@click.option("--study", default=None, help="Study name [default: MODEL-SAMPLER-nfeNFE-FAMILY-PLACEMENT].")
@click.option("--family", default="linear", show_default=True, type=click.Choice(FAMILIES),
              help="ρ parameterization: linear (ρ_inner at the deepest skip to ρ_outer at the outermost), "
                   "per_level (one ρ per resolution), per_layer (one per skip), per_noise (a linear pair "
                   "at each of --knots σ knots, interpolated in log σ).")
@click.option("--placement", default="input", show_default=True, type=click.Choice([*PLACEMENTS, "search"]),
              help="Where ρ acts: input (the skip before its block, as in the paper), normalized (the skip "
                   "channels after the block's GroupNorm, which cannot cancel it), both, or search.")
@click.option("--knots", default=3, show_default=True, type=int,
              help="σ knots of per_noise, log-spaced over the sampler's σ range.")
@click.option("--trials", default=16, show_default=True, type=int,
              help="Finished trials the study should hold; a resumed study runs only the rest.")
@click.option("--n", "n", default=1000, show_default=True, type=int, help="Samples per trial (proxy FID's N).")
@click.option("--rungs", default=None,
              help="Sample counts at which a trial reports FID, ending at N, e.g. 250,1000 [default: N/4,N]. "
                   "Successive halving keeps the best third at the first rung and at first rung x 3^k; "
                   "a single number turns pruning off.")
@click.option("--objective", default="fid", show_default=True, type=click.Choice(OBJECTIVES),
              help="What the study minimizes: FID at N, FID extrapolated to N -> inf over the rungs "
                   "(removes most of FID's small-N bias), or KID (unbiased; needs reference features).")
@click.option("--rho-min", default=0.5, show_default=True, type=float, help="Lower bound of each ρ.")
@click.option("--rho-max", default=1.5, show_default=True, type=float, help="Upper bound of each ρ.")
@click.option("--batch", default=250, show_default=True, type=int, help="Sampling and feature batch size.")
@click.option("--features", default="efficientnet-lite0", show_default=True,
              type=click.Choice(list(FEATURE_LAYERS)),
              help="FID feature extractor: EfficientNet-Lite0 (offline) or the standard Inception-v3.")
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False),
              help="Local Inception-v3 weights (torch-fidelity's .pth), for machines without internet.")
@click.option("--reference", default="bundled", show_default=True,
              help="Reference: 'bundled' (Fashion-MNIST test set, EfficientNet-Lite0 statistics and KID "
                   "features), an .npz with mu and sigma (EDM's reference files work), 'fashion-mnist:test', "
                   "or a folder of images (features cached under studies/cache by content hash).")
@click.option("--timeout", default=None, type=float, help="Stop starting new trials after this many seconds.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="Where to export the best schedule [default: studies/STUDY.best.json].")
@click.option("--optimizer", default="tpe", show_default=True, type=click.Choice(OPTIMIZERS),
              help="Optuna sampler proposing the trials (grid: 11 values per ρ).")
@click.option("--search-seed", default=0, show_default=True, type=int,
              help="Seed of the optimizer for a new study (a resumed or shared one reseeds, so as not to "
                   "repeat its points).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Worker processes sharing the study on this machine (one per GPU when there are GPUs). "
                   "On other machines, run the same command with the same --storage.")
@click.option("--heartbeat", default=60, show_default=True, type=int,
              help="Seconds between a running trial's heartbeats; a trial whose worker died is retried "
                   "after two missed beats (0: off).")
@_friendly
def search(model, trust_pickle, edm_path, sigma_grid, prompts, guidance, precision, sampler, nfe, seed, threads, device,
           storage, study, family, placement, knots, trials, n, rungs, objective, rho_min, rho_max, batch, features,
           inception_weights, reference, timeout, out, optimizer, search_seed, workers, heartbeat) -> None:
    """Run (or resume) the Optuna study for one model, sampler, NFE, family and placement.

    The first trial is the untuned model (ρ = 1 everywhere); for the linear family the second
    is a paper-style ramp. Each trial samples N images from the same seeds (seed SEED+i for
    sample i), scores them against the reference at each rung (FID, KID, and FID∞ over the
    rungs), and may be pruned at a lower rung by successive halving. Every trial lands in the
    storage when it ends, with its sample grid as an artifact; rerunning the same command
    resumes the study until it holds --trials finished trials. At the end the best completed
    trial is exported as a schedule JSON (apply it with skiptune_search.apply).
    """
    import optuna
    import torch

    from . import search as S
    from . import workers as W

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _CtrlC.install()
    if workers > 1 and W.worker_share() is None:
        W.own_setup(workers)
    _set_threads(threads)
    if not 0 < rho_min < rho_max:
        raise UserError(f"need 0 < --rho-min < --rho-max, got {rho_min} and {rho_max}")
    if n < 2:
        raise UserError("--n must be at least 2 (FID needs a covariance)")
    if family == "per_noise" and knots < 2:
        raise UserError("--knots must be at least 2 for per_noise")
    task = S.Task(model=model, sampler=sampler, nfe=nfe, n=n, seed=seed, features=features, reference=reference,
                  rungs=_parse_rungs(rungs, n), objective=objective, sigma_grid=sigma_grid, prompts=prompts,
                  guidance=guidance, precision=precision)
    evaluator = S.Evaluator(task, batch_size=batch, trust_pickle=trust_pickle, edm_path=edm_path,
                            feature_weights=inception_weights, device=device)
    # fail before any trial when the statistics or the extractor's weights are missing
    probe = torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=evaluator.device)
    if evaluator.reference.mu.shape[0] != evaluator.extractor(probe)[0].shape[1]:
        raise UserError(f"--reference {reference} does not hold {features} statistics (feature sizes differ)")
    sigma_knots = ()
    if family == "per_noise":
        sigma_knots = S.log_spaced_knots(float(evaluator.sigmas[-2]), float(evaluator.sigmas[0]), knots)
    space = S.Space(family, placement, (rho_min, rho_max), sigma_knots)
    name = study or S.default_study_name(task, space)
    storage_obj = S.make_storage(storage, heartbeat)
    st = S.open_study(storage_obj, name, task, space, evaluator.controller, search_seed, optimizer,
                      parallel=workers > 1 or W.worker_share() is not None)
    click.echo(f"study {name!r} in {storage}: {S.finished_trials(st)} finished trials so far; "
               f"{task.sampler} NFE {task.nfe} ({task.sigma_grid} σ grid), N = {task.n} samples "
               f"(rungs {','.join(map(str, task.rungs))}), seeds {task.seed}-{task.seed + task.n - 1}, "
               f"objective {task.objective}, {task.precision}")

    if unchecked := S.unpruned_rungs(task.rungs):
        click.echo(f"note: successive halving checks only N = {task.rungs[0]} x 3^k, so rung(s) "
                   f"{','.join(map(str, unchecked))} report FID but never prune")
    label = {"fid": "FID", "fid_inf": "FID∞", "kid": "KID"}[objective]

    def report(study, trial) -> None:
        if _CtrlC.seen:
            study.stop()
        if trial.state == optuna.trial.TrialState.PRUNED:
            step = trial.last_step
            rung_label = "KID" if objective == "kid" else "FID"  # what each rung reports
            click.echo(f"trial {trial.number + 1}: pruned at N={step} ({rung_label} {trial.intermediate_values[step]:.4g})")
            return
        if trial.value is None:
            click.echo(f"trial {trial.number + 1}: failed ({trial.user_attrs.get('fail_reason', 'see log')})")
            return
        params = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        tag = (" (baseline)" if trial.user_attrs.get("baseline")
               else " (paper-style ramp)" if trial.user_attrs.get("paper_ramp") else "")
        click.echo(f"trial {trial.number + 1}: {label} {trial.value:.4g}  {params}{tag}  "
                   f"[{trial.user_attrs['wall_seconds']:.0f}s, best {study.best_value:.4g}]")

    share = W.worker_share()
    if share is not None:  # a worker started by another search command: its trials only
        S.run_search(evaluator, st, space, trials, timeout, on_trial=report, artifacts=S.artifact_dir(storage),
                     share=share, progress=False)
        if _CtrlC.seen:
            raise KeyboardInterrupt
        return
    children = []
    if workers > 1:
        shares = W.split(max(0, trials - S.finished_trials(st)), workers)
        click.echo(f"{workers} workers: {', '.join(map(str, shares))} trials")
        children = W.spawn(shares)
        share = shares[0]
    S.run_search(evaluator, st, space, trials, timeout, on_trial=report, artifacts=S.artifact_dir(storage),
                 share=share, progress=workers == 1)
    if _CtrlC.seen:
        raise KeyboardInterrupt
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        raise UserError(f"{len(failed)} worker(s) failed; rerun the same command to finish the study")
    base = S.baseline_trial(st)
    schedule = S.export_best(st, storage)
    out_path = Path(out) if out else Path("studies") / f"{name}.best.json"
    schedule.save(out_path)
    rhos = ", ".join("/".join(f"{v:.3f}" for v in row) for row in schedule.rho)
    click.echo("")
    click.echo(f"baseline {label} (ρ = 1): {base.value:.4g}" if base else f"baseline {label}: not finished")
    click.echo(f"{f'best {label}:':<22}{schedule.metric['value']:.4g} (trial {schedule.source['trial'] + 1})")
    if base:
        change = 100 * (schedule.metric["value"] - base.value) / base.value
        click.echo(f"{f'{label} change:':<22}{change:+.1f}% vs baseline")
    knots = f" at σ knots {', '.join(f'{k:.3g}' for k in schedule.sigma_knots)}" if schedule.sigma_knots else ""
    click.echo(f"best ρ (outer→inner): {rhos}{knots}  [{schedule.placement} placement]")
    if edge := S.params_at_edge(schedule.params, space.rho_range):
        click.echo(f"note: {', '.join(edge)} at the edge of the range [{rho_min:g}, {rho_max:g}]: the optimum may "
                   f"lie outside it; try a wider --rho-min/--rho-max in a new study (--study NEW_NAME)")
    click.echo(f"study storage:        {storage}  (study {name!r})")
    click.echo(f"best schedule:        {out_path}")


@main.command()
@_model_options
@click.option("--json", "as_json", is_flag=True, help='Print {"skips": [...]} as JSON instead of a table.')
@_friendly
def inspect(model, trust_pickle, edm_path, as_json) -> None:
    """List a model's long skips in encoder order (0 = outermost): name, resolution, channels,
    the block that consumes it, and whether GroupNorm cancels a ρ placed on its input."""
    import json

    from .skips import SkipController
    from .zoo import load_denoiser

    denoiser, _ = load_denoiser(model, trust_pickle, edm_path)
    ctl = SkipController(denoiser)
    rows = [{"index": i, **s.as_dict(), **g} for i, (s, g) in enumerate(zip(ctl.skips, ctl.groupnorm_report()))]
    if as_json:
        click.echo(json.dumps({"arch": ctl.arch, "skips": rows}, indent=1))
        return
    click.echo(f"{ctl.arch}: {len(rows)} long skips (0 = outermost)")
    click.echo(f"{'#':>2}  {'skip':<30} {'res':>4} {'ch':>4}  {'consumer':<24} input-placement ρ")
    for r in rows:
        fate = ("cancelled by GroupNorm (acts via 1x1 shortcut only)" if r["cancelled"]
                else "reaches the main branch through a mixed group")
        click.echo(f"{r['index']:>2}  {r['name']:<30} {r['resolution']:>4} {r['channels']:>4}  {r['consumer']:<24} {fate}")


@main.command()
@_storage_option
@click.option("--study", required=True, help="Study name (see the 'search' output).")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
@_friendly
def export(storage, study, out) -> None:
    """Write the best completed trial of a study as a schedule JSON file."""
    import optuna

    from . import search as S

    try:
        st = optuna.load_study(study_name=study, storage=S.make_storage(storage, create=False))
    except KeyError:
        raise UserError(f"no study {study!r} in {storage}; list them with optuna-dashboard or run 'search'") from None
    schedule = S.export_best(st, storage)
    schedule.save(out)
    click.echo(f"wrote {out}: trial {schedule.source['trial'] + 1}, FID {schedule.metric['value']:.2f} "
               f"(baseline {schedule.metric['baseline']})")


@main.command()
@_task_options
@click.option("--schedule", default=None, type=click.Path(dir_okay=False),
              help="Schedule JSON to apply; without it the untuned model is sampled.")
@click.option("-n", "n", default=64, show_default=True, type=int, help="Number of images.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
@_friendly
def sample(model, trust_pickle, edm_path, sigma_grid, prompts, guidance, precision, sampler, nfe, seed, threads,
           device, schedule, n, out) -> None:
    """Sample a grid of images, with a schedule applied or untuned. With --schedule, the model,
    sampler, NFE, σ grid, prompts, guidance and precision it was tuned for are the defaults."""
    from . import search as S
    from .grids import save_grid
    from .schedule import load_schedule

    _set_threads(threads)
    if schedule is not None:
        path, schedule = schedule, load_schedule(schedule)
        model, sampler, nfe, sigma_grid, prompts, guidance, precision = _tuned_for_defaults(
            schedule, model=model, sampler=sampler, nfe=nfe, sigma_grid=sigma_grid, prompts=prompts, guidance=guidance,
            precision=precision)
    task = S.Task(model=model, sampler=sampler, nfe=nfe, n=n, seed=seed, sigma_grid=sigma_grid, prompts=prompts,
                  guidance=guidance, precision=precision)
    evaluator = S.Evaluator(task, trust_pickle=trust_pickle, edm_path=edm_path, device=device)
    sched = evaluator.controller.identity() if schedule is None else schedule
    images = evaluator.images(sched)
    save_grid(images, out)
    what = f"schedule {path}" if schedule else "untuned model"
    click.echo(f"wrote {out}: {n} images of {model}, {sampler} NFE {nfe} ({task.sigma_grid} σ grid, {precision}), "
               f"seeds {seed}-{seed + n - 1}, {what}")


@main.command()
@_config_option
@click.option("--schedule", required=True, type=click.Path(dir_okay=False), help="Schedule JSON to evaluate.")
@_model_options
@click.option("--sampler", default=None, type=click.Choice(list(SAMPLERS)), help="[default: the schedule's]")
@click.option("--nfe", default=None, type=int, help="[default: the schedule's]")
@functools.partial(_grid_option, default_help="the schedule's")
@functools.partial(_text_options, default="the schedule's", guidance_default="the schedule's")
@functools.partial(_precision_option, default=None)
@click.option("--n", "n", default=5000, show_default=True, type=int, help="Held-out samples per variant.")
@click.option("--blocks", default=5, show_default=True, type=int, help="Independent seed blocks for the interval.")
@click.option("--seed", default=1_000_000, show_default=True, type=int,
              help="First held-out seed (the search uses seeds from 0 by default).")
@click.option("--features", default=None, type=click.Choice(list(FEATURE_LAYERS)), help="[default: the schedule's]")
@click.option("--inception-weights", default=None, type=click.Path(dir_okay=False))
@click.option("--reference", default="bundled", show_default=True, help="Reference statistics (.npz) or 'bundled'.")
@click.option("--batch", default=250, show_default=True, type=int)
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch's default).")
@click.option("--device", default="auto", show_default=True, help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_friendly
def evaluate(schedule, model, trust_pickle, edm_path, sampler, nfe, sigma_grid, prompts, guidance, precision, n, blocks,
             seed, features, inception_weights, reference, batch, threads, device, as_json) -> None:
    """Confirm a schedule's gain on held-out seeds: FID of the untuned model and of the schedule
    on the same N new samples, with a 95% interval from independent seed blocks."""
    import json

    from . import search as S
    from .evaluate import evaluate_schedule
    from .schedule import load_schedule

    _set_threads(threads)
    sched = load_schedule(schedule)
    model, sampler, nfe, sigma_grid, prompts, guidance, precision = _tuned_for_defaults(
        sched, model=model, sampler=sampler, nfe=nfe, sigma_grid=sigma_grid, prompts=prompts, guidance=guidance,
        precision=precision)
    searched = sched.metric.get("seeds", "")
    if searched and "-" in searched:
        first, last = (int(v) for v in searched.split("-"))
        if seed <= last and seed + n - 1 >= first:
            raise UserError(f"seeds {seed}-{seed + n - 1} overlap the search's seeds {searched}; pick another --seed")
    task = S.Task(model=model, sampler=sampler or "heun", nfe=nfe or 9,  # a hand-written schedule: heun NFE 9
                  n=n, seed=seed, features=features or sched.metric.get("features", "efficientnet-lite0"),
                  reference=reference, sigma_grid=sigma_grid, prompts=prompts, guidance=guidance, precision=precision)
    evaluator = S.Evaluator(task, batch_size=batch, trust_pickle=trust_pickle, edm_path=edm_path,
                            feature_weights=inception_weights, device=device)
    result = evaluate_schedule(evaluator, sched, task.seeds, blocks)
    result["schedule"] = str(schedule)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    b, t, d = result["baseline"], result["tuned"], result["difference"]
    click.echo(f"held-out seeds {result['seeds']} ({result['n']} samples, {blocks} blocks of {result['block_size']}), "
               f"{task.sampler} NFE {task.nfe} ({task.sigma_grid} σ grid), {task.features} features, {task.precision}")
    click.echo(f"untuned  FID {b['fid']:.2f}  (per block {b['block_fid']['mean']:.2f}, "
               f"95% CI {b['block_fid']['low']:.2f}..{b['block_fid']['high']:.2f})")
    click.echo(f"tuned    FID {t['fid']:.2f}  (per block {t['block_fid']['mean']:.2f}, "
               f"95% CI {t['block_fid']['low']:.2f}..{t['block_fid']['high']:.2f})")
    click.echo(f"tuned - untuned per block: {d['mean']:+.2f} (95% CI {d['low']:+.2f}..{d['high']:+.2f})")
    click.echo("the gain holds on held-out seeds" if result["gain_holds"]
               else "the gain does NOT hold: the interval reaches zero or above")


@main.command()
@_storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=int)
@_friendly
def dashboard(storage, host, port) -> None:
    """Serve optuna-dashboard on the storage, with each trial's sample grid (its artifacts)."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    from . import search as S

    storage_obj = S.make_storage(storage, create=False)
    folder = S.artifact_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"optuna-dashboard on {storage} (artifacts in {folder}): http://{host}:{port}/  (Ctrl-C stops)")
    run_server(storage_obj, host=host, port=port, artifact_store=FileSystemArtifactStore(str(folder)))


@main.command()
@_storage_option
@_friendly
def studies(storage) -> None:
    """List the studies in a storage: trials, baseline FID and best FID."""
    import optuna

    from . import search as S

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = S.make_storage(storage, create=False)
    summaries = optuna.get_all_study_summaries(storage_obj, include_best_trial=False)
    if not summaries:
        click.echo(f"no studies in {storage}; run 'skiptune-search search'")
        return
    click.echo(f"{'study':<48} {'done':>5} {'failed':>6} {'baseline':>9} {'best':>9} {'change':>7}")
    for summary in sorted(summaries, key=lambda s: s.study_name):
        st = optuna.load_study(study_name=summary.study_name, storage=storage_obj)
        complete = st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        failed = len(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        base = S.baseline_trial(st)
        best = min((t.value for t in complete), default=None)
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
        change = f"{100 * (best - base.value) / base.value:+6.1f}%" if base and best is not None else f"{'-':>7}"
        click.echo(f"{summary.study_name:<48} {len(complete):>5} {failed:>6} {fmt(base.value if base else None)} "
                   f"{fmt(best)} {change}")


@main.command()
@_storage_option
@click.option("--study", required=True, help="Study name (see 'skiptune-search studies').")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--samples", default=64, show_default=True, type=int,
              help="Sample the model for baseline and best grids (0: no grids, no model needed).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading an EDM .pkl to sample the grids.")
@click.option("--edm-path", default=None, type=click.Path(file_okay=False), help="Checkout of NVlabs/edm.")
@_friendly
def report(storage, study, out, samples, trust_pickle, edm_path) -> None:
    """Write one self-contained HTML report of a study: optimization history, ρ heatmap of the
    best schedule, parameter importances, FID at each rung, FID vs NFE across sibling studies,
    and baseline vs best sample grids."""
    import optuna

    from . import search as S
    from .report import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = S.make_storage(storage, create=False)
    try:
        st = optuna.load_study(study_name=study, storage=storage_obj)
    except KeyError:
        raise UserError(f"no study {study!r} in {storage}; list them with 'skiptune-search studies'") from None
    grids = None
    if samples > 0:
        task = S.with_legacy_defaults(S.study_settings(st)["task"])
        evaluator = S.Evaluator(S.Task(model=task["model"], sampler=task["sampler"], nfe=task["nfe"], n=samples,
                                       seed=task["seed"], sigma_grid=task["sigma_grid"], prompts=task["prompts"],
                                       guidance=task["guidance"], precision=task["precision"]),
                                trust_pickle=trust_pickle, edm_path=edm_path)
        best = S.export_best(st, storage)
        grids = (evaluator.images(evaluator.controller.identity(), progress="baseline grid"),
                 evaluator.images(best, progress="best grid"))
    path = write_report(st, storage_obj, storage, out, grids)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--quick", is_flag=True, help="A small run (a minute or two) that only keeps the command working.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="The Markdown file to write (all tables: measured now or earlier under --work) [default: "
                   "BENCHMARKS.md for studies/bench, else WORK/BENCHMARKS.md: --quick and other folders never "
                   "overwrite the committed tables].")
@click.option("--model", default="fashion-mnist-edm", show_default=True,
              help="Model of tables 1-5 (as --model of search).")
@click.option("--nfe", default=9, show_default=True, type=int, help="Heun NFE of tables 1-4 and 6.")
@click.option("--tables", default=None,
              help="Which tables to measure, comma-separated; the others are rendered from earlier runs "
                   "('none': only render) [default: 1-5, and 6 on a GPU].")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="Folder of the tables' raw results; long tables resume from it [default: studies/bench, "
                   "studies/bench-quick with --quick].")
@click.option("--truth-n", default=None, type=int,
              help="Held-out samples per schedule in table 3 [default: 10000; 32 with --quick]. Table 5 "
                   "always scores 10,000 (32 with --quick).")
@click.option("--threads", default=None, type=int, help="torch CPU threads [default: torch's choice].")
@_friendly
def bench(quick, out, model, nfe, tables, work, truth_n, threads) -> None:
    """Measure the benchmark tables and write them, each with its machine and command, to
    BENCHMARKS.md:

    \b
    1  controller overhead per placement at ρ = 1 (target ≤ 1.02x)
    2  where a trial's time goes (sampling, features, FID, KID, Optuna)
    3  proxy fidelity: Spearman of each objective vs FID on --truth-n held-out samples
    4  search efficiency: an 11x11 grid of the linear family, optimizers replayed on it
    5  headline: held-out FID of the untuned model and each family's best, NFE 5, 9, 19
    6  GPU scaling: images/s and seconds per proxy trial of a 64 px ADM-sized UNet, fp32 vs bf16

    Tables 3-5 take hours on a CPU: their results are saved point by point under --work, and
    rerunning the same command resumes them. One run at a time measures into a --work folder
    (a second is refused); '--tables none' renders beside it.
    """
    import torch

    from .bench import ALL_TABLES, run_bench

    _set_threads(threads)
    if tables is None:
        tables = "1,2,3,4,5" + (",6" if torch.cuda.is_available() else "")
    try:
        wanted = () if tables == "none" else tuple(sorted({int(t) for t in tables.split(",")}))
    except ValueError:
        raise UserError(f"--tables {tables}: give table numbers separated by commas, e.g. 1,2") from None
    if not set(wanted) <= set(ALL_TABLES):
        raise UserError(f"--tables {tables}: the tables are {', '.join(map(str, ALL_TABLES))}")
    folder = Path(work or ("studies/bench-quick" if quick else "studies/bench"))
    # BENCHMARKS.md renders studies/bench; any other folder (--quick's included) renders beside its results
    out = out or ("BENCHMARKS.md" if folder == Path("studies/bench") else str(folder / "BENCHMARKS.md"))
    command = (f"skiptune-search bench{' --quick' if quick else ''} --out {out} --model {model} --nfe {nfe} "
               f"--tables {','.join(map(str, wanted)) or 'none'}" + (f" --work {work}" if work else "")
               + (f" --truth-n {truth_n}" if truth_n else "") + (f" --threads {threads}" if threads else ""))
    click.echo(f"wrote {run_bench(quick, Path(out), folder, model, nfe, command, wanted, truth_n)}")


@main.command("train-default")
@click.option("--steps", default=20000, show_default=True, type=int, help="Total optimizer steps (resume continues to this).")
@click.option("--batch", default=128, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Model folder [default: the bundled model's folder].")
@click.option("--state", default="studies/train-state.pt", show_default=True, type=click.Path(dir_okay=False),
              help="Full training state (weights, EMA, optimizer) for an exact resume.")
@click.option("--fresh", is_flag=True, help="Start from random weights instead of resuming.")
@click.option("--data-dir", default=None, help="Folder with the Fashion-MNIST IDX .gz files.")
@click.option("--threads", default=0, type=int, help="CPU threads for torch (0: torch's default).")
@_friendly
def train_default(steps, batch, lr, out, state, fresh, data_dir, threads) -> None:
    """Train (or resume training) the bundled Fashion-MNIST model with EDM's loss.

    Saves the EMA weights (safetensors, diffusers layout) every 250 steps, atomically, so it
    can be stopped at any time and resumed by running it again.
    """
    from .training import TrainConfig
    from .training import train_default as train
    from .zoo import DEFAULT_MODEL_DIR

    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, threads=threads)
    info = train(Path(out) if out else DEFAULT_MODEL_DIR, Path(state), cfg, data_dir, resume=not fresh)
    loss = f"{info['final_loss']:.4f}" if info.get("final_loss") is not None else "not measured (no step ran)"
    click.echo(f"{info['steps']} steps, {info['images_seen']} images, final loss {loss}, "
               f"{info['wall_seconds'] / 3600:.2f} h")


@main.command("model-card")
@click.option("--model", default="fashion-mnist-edm", show_default=True, help="Model folder to describe.")
@click.option("--nfe", default=35, show_default=True, type=int, help="Heun NFE of the card's samples.")
@click.option("-n", "n", default=2000, show_default=True, type=int, help="Samples for the FID.")
@click.option("--data-dir", default=None, help="Folder with the Fashion-MNIST IDX .gz files (real-data floor).")
@_friendly
def model_card(model, nfe, n, data_dir) -> None:
    """Write MODEL_CARD.md and samples.png into a model folder: training record, FID, floor."""
    from .model_card import write_model_card

    click.echo(f"wrote {write_model_card(model, nfe=nfe, n=n, data_dir=data_dir)}")


@main.command("reference-stats")
@click.option("--data-dir", default=None, help="Folder with the Fashion-MNIST IDX .gz files.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help=".npz file to write.")
@_friendly
def reference_stats(data_dir, split, out) -> None:
    """Compute reference statistics of Fashion-MNIST with EfficientNet-Lite0: mu and sigma of all
    images (FID) and the features of the first 2,000 (KID)."""
    import torch

    from .data import load_fashion_mnist
    from .metrics import DEFAULT_FEATURES, ReferenceStats, extract_features, load_extractor

    images, _ = load_fashion_mnist(split, data_dir)
    start = time.perf_counter()
    features = extract_features(torch.from_numpy(images.copy()).unsqueeze(1), load_extractor(), progress=True)
    ReferenceStats.from_features(features, DEFAULT_FEATURES, kid_samples=2000).save(out)
    click.echo(f"wrote {out}: {len(images)} {split} images, {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
