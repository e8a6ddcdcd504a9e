"""Using a model and a schedule: inspect the skips, sample a grid, evaluate on held-out seeds."""

from __future__ import annotations

import functools

import click

from ..core.limits import MAX_N
from .common import (
    Seeds, UserError, batch_option, config_option, device_option, features_option, friendly, grid_option,
    model_options, nfe_option, precision_option, sampler_option, size_options, task_options, text_options,
    check_outputs, model_source, threads_option, torch_setup, tuned_for_defaults,
)


@click.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help='Print {"skips": [...]} as JSON instead of a table.')
@friendly
def inspect(model, trust_pickle, checkouts, uvit_config, as_json) -> None:
    """List a model's long skips in encoder order (0 = outermost): name, resolution, channels,
    the block that consumes it, the FreeU stage whose factors act there (b1/s1 at the lowest
    resolution, b2/s2 at the next), and whether GroupNorm cancels a ρ placed on its input."""
    import json

    from ..core import freeu
    from ..core.controller import SkipController
    from ..core.errors import ScheduleError

    # a pipeline's UNet alone, whatever samples it; anything else as the denoiser its sampler sees
    ctl = SkipController(model_source(model, trust_pickle, checkouts, uvit_config).network())
    try:
        stages = freeu.stages(ctl.skips)
    except ScheduleError:  # skips at one resolution: no FreeU stages
        stages = [None] * len(ctl.skips)
    rows = [{"index": i, **s.as_dict(), "freeu_stage": None if st is None else st + 1, **g}
            for i, (s, g, st) in enumerate(zip(ctl.skips, ctl.groupnorm_report(), stages))]
    if as_json:
        click.echo(json.dumps({"arch": ctl.arch, "skips": rows}, indent=1))
        return
    click.echo(f"{ctl.arch}: {len(rows)} long skips (0 = outermost)")
    click.echo(f"{'#':>2}  {'skip':<30} {'res':>4} {'ch':>4}  {'consumer':<24} {'FreeU':<5}  input-placement ρ")
    for r in rows:
        fate = ("no normalization at the decoder input: reaches the block as it is" if not r["normalization"]
                else "cancelled by GroupNorm (acts via 1x1 shortcut only)" if r["cancelled"]
                else "reaches the main branch through a mixed group")
        stage = f"b{r['freeu_stage']}/s{r['freeu_stage']}" if r["freeu_stage"] else "-"
        click.echo(f"{r['index']:>2}  {r['name']:<30} {r['resolution']:>4} {r['channels']:>4}  {r['consumer']:<24} "
                   f"{stage:<5}  {fate}")


@click.command()
@task_options
@click.option("--schedule", default=None, type=click.Path(dir_okay=False),
              help="Schedule JSON to apply; without it the untuned model is sampled.")
@click.option("-n", "n", default=64, show_default=True, type=click.IntRange(1, 100_000), help="Number of images.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="PNG grid to write.")
@friendly
def sample(model, trust_pickle, checkouts, uvit_config, sigma_grid, prompts, guidance, height, width,
           precision, sampler, nfe, seed, threads, device, schedule, n, out) -> None:
    """Sample a grid of images, with a schedule applied or untuned. With --schedule, the model,
    sampler, NFE, σ grid, prompts, guidance, image size and precision it was tuned for are the
    defaults."""
    from ..core.schedule import load_schedule
    from ..sampling.images import save_grid
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task

    torch_setup(threads)
    settings = dict(model=model, sampler=sampler, nfe=nfe, sigma_grid=sigma_grid, prompts=prompts,
                    guidance=guidance, height=height, width=width, precision=precision)
    path = schedule
    if schedule is not None:
        schedule = load_schedule(schedule)
        settings = tuned_for_defaults(schedule, trust_pickle=trust_pickle, **settings)
    source = model_source(settings["model"], trust_pickle, checkouts, uvit_config)
    check_outputs(out, inputs=[("the schedule file", path), ("the prompt file", settings["prompts"]),
                               *source.inputs()])
    task = Task(n=max(n, 2), seed=seed, **settings)
    evaluator = Evaluator(task, source=source, device=device)
    images = evaluator.images(schedule or evaluator.controller.identity(), seeds=range(seed, seed + n))
    save_grid(images, out)
    what = f"schedule {path}" if schedule else "untuned model"
    click.echo(f"wrote {out}: {n} images of {task.model}, {task.sampler} NFE {task.nfe} ({task.sigma_grid} σ grid, "
               f"{task.precision}), seeds {seed}-{seed + n - 1}, {what}")


@click.command()
@config_option
@click.option("--schedule", required=True, type=click.Path(dir_okay=False), help="Schedule JSON to evaluate.")
@model_options
@functools.partial(sampler_option, default_help="the schedule's")
@functools.partial(nfe_option, default=None)
@functools.partial(grid_option, default_help="the schedule's")
@functools.partial(text_options, default="the schedule's", guidance_default="the schedule's")
@functools.partial(size_options, default="the schedule's")
@functools.partial(precision_option, default=None)
@click.option("--n", "n", default=5000, show_default=True, type=click.IntRange(4, MAX_N),
              help="Held-out samples per variant.")
@click.option("--blocks", default=5, show_default=True, type=click.IntRange(2, 1000),
              help="Independent seed blocks for the interval.")
@click.option("--seed", default=1_000_000, show_default=True, type=Seeds,
              help="First held-out seed (the search uses seeds from 0 by default).")
@functools.partial(features_option, default=None)
@click.option("--reference", default="bundled", show_default=True,
              help="Reference: an .npz with mu and sigma, a folder of images, 'fashion-mnist:test', or 'bundled' "
                   "(Fashion-MNIST statistics: only for a model whose record says it was trained on Fashion-MNIST).")
@batch_option
@threads_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@friendly
def evaluate(schedule, model, trust_pickle, checkouts, uvit_config, sampler, nfe, sigma_grid, prompts,
             guidance, height, width, precision, n, blocks, seed, features, inception_weights, reference, batch, threads,
             device, as_json) -> None:
    """Confirm a schedule's gain on held-out seeds: FID of the untuned model and of the schedule
    on the same N new samples, with a 95% interval from independent seed blocks."""
    import json

    from ..core.schedule import load_schedule
    from ..scoring.evaluator import Evaluator
    from ..scoring.heldout import evaluate_schedule
    from ..scoring.task import Task

    torch_setup(threads)
    sched = load_schedule(schedule)
    settings = tuned_for_defaults(sched, trust_pickle=trust_pickle, model=model, sampler=sampler, nfe=nfe,
                                  sigma_grid=sigma_grid, prompts=prompts, guidance=guidance, height=height, width=width,
                                  precision=precision)
    searched = sched.metric.get("seeds", "")
    if searched and "-" in searched:
        first, last = (int(v) for v in searched.split("-"))
        if seed <= last and seed + n - 1 >= first:
            raise UserError(f"seeds {seed}-{seed + n - 1} overlap the search's seeds {searched}; pick another --seed")
    task = Task(n=n, seed=seed, features=features or sched.metric.get("features", "efficientnet-lite0"),
                reference=reference, **settings)
    evaluator = Evaluator(task, batch, source=model_source(task.model, trust_pickle, checkouts, uvit_config),
                          feature_weights=inception_weights, device=device)
    evaluator.check_reference()
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


COMMANDS = [inspect, sample, evaluate]
