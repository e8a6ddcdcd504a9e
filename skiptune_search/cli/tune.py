"""search: run (or resume) one study, then export its best schedule."""

from __future__ import annotations

import click

from ..core.limits import MAX_KNOTS, MAX_N, MAX_SEARCH_SEED, MAX_TRIALS, MIN_KNOTS, RHO_MAX
from ..scoring.objectives import objective_names, objectives_help
from ..core.freeu import VARIANTS as FREEU_VARIANTS
from ..search import DEFAULT_OPTIMIZERS, FALLBACK_OPTIMIZER, OPTIMIZERS
from .common import (
    Number, UserError, batch_option, config_option, config_read, family_options, features_option, freeu_lines,
    friendly, model_source, parse_rungs, storage_option, task_options, torch_setup,
)

RHO = Number(0, RHO_MAX, min_open=True)  # a schedule's ρ lies in (0, 4]
# the options that are the task's fields (rungs parsed apart), and those run() takes as they are
TASK_OPTIONS = ("model", "sampler", "nfe", "n", "seed", "features", "reference", "objective", "sigma_grid", "prompts",
                "guidance", "height", "width", "precision")
SEARCH_OPTIONS = ("storage", "study", "family", "placement", "knots", "freeu_window", "freeu_variant", "optimizer",
                  "search_seed", "warm_start", "heartbeat", "trials", "timeout", "workers", "threads", "device", "out")


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
              help="Sample counts at which a trial reports FID, ending at N, e.g. 125,1000 [default: N/8,N]. "
                   "Successive halving keeps the best third at the first rung and at first rung x 3^k; with "
                   "CMA-ES the best eighth, at first rung x 8^k; GP never prunes (a resumed study keeps the "
                   "pruning it was made with); a single number turns pruning off.")
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
@click.option("--optimizer", default=None, type=click.Choice(OPTIMIZERS),
              help="Optuna sampler proposing the trials (grid: 11 values per ρ; gp: without pruning, as it "
                   "models completed trials only) [default: per family, the one BENCHMARKS.md "
                   "table 4 picked"
                   + "".join(f", {method} {name}" for method, name in DEFAULT_OPTIMIZERS.items())
                   + f"; {FALLBACK_OPTIMIZER} for the others (FreeU with --no-window among them) and for --placement "
                   "search; a "
                   "resumed study keeps the one it was made with].")
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
def search(**options) -> None:
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
    from ..search.storage import shown_url
    from ..search.study import params_at_edge
    from ..scoring.objectives import objective_label
    from ..search.tune import run

    o = options
    if o["rho_min"] >= o["rho_max"]:
        raise UserError(f"need --rho-min < --rho-max, got {o['rho_min']} and {o['rho_max']}")
    torch_setup(o["threads"])
    task = {name: o[name] for name in TASK_OPTIONS} | {"rungs": parse_rungs(o["rungs"], o["n"])}
    source = model_source(o["model"], o["trust_pickle"], o["checkouts"], o["uvit_config"])
    result = run(task, source, **{name: o[name] for name in SEARCH_OPTIONS},
                 rho_range=(o["rho_min"], o["rho_max"]), batch_size=o["batch"], feature_weights=o["inception_weights"],
                 read=[("the config file", config_read())], say=click.echo)
    label, base, schedule = objective_label(o["objective"]), result.baseline, result.best
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
    if edge := params_at_edge(schedule.params, result.space.rho_range):
        low, high = o["rho_min"], o["rho_max"]
        click.echo(f"note: {', '.join(edge)} at the edge of the range [{low:g}, {high:g}]: the optimum "
                   f"may lie outside it; try a wider --rho-min/--rho-max in a new study (--study NEW_NAME)")
    click.echo(f"study storage:        {shown_url(o['storage'])}  (study {result.study.study_name!r})")
    click.echo(f"best schedule:        {result.out}")


COMMANDS = [search]
