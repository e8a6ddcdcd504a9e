"""Reading studies: list them, export the best schedule, write a report, serve the dashboard."""

from __future__ import annotations

import click

from ..search.ui_presets import FORMATS as UI_FORMATS
from .common import (
    UserError, check_outputs, freeu_lines, friendly, model_options, model_source, refuse_trust_for, storage_option,
    torch_setup,
)

STUDY = click.option("--study", required=True, help="Study name (see 'skiptune-search studies').")


@click.command()
@storage_option
@friendly
def studies(storage) -> None:
    """List the studies in a storage: finished, running, pruned and failed trials, baseline, best
    and the optimizer (a study keeps the one it was made with). Studies of other tools in the same
    storage are named, not read."""
    from ..search.storage import make_storage, shown_url
    from ..search.study import study_rows

    rows = study_rows(make_storage(storage, create=False))
    if not rows:
        click.echo(f"no studies in {shown_url(storage)}; run 'skiptune-search search'")
        return
    click.echo(f"{'study':<48} {'done':>5} {'run':>4} {'pruned':>6} {'failed':>6} {'baseline':>9} {'best':>9} "
               f"{'change':>7} {'optimizer':>9}")
    fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
    for r in rows:
        if r["foreign"]:
            click.echo(f"{r['name']:<48} (not a skiptune-search study: left alone)")
            continue
        base, best = r["baseline"], r["best"]
        change = f"{100 * (best - base) / base:+6.1f}%" if base is not None and best is not None else f"{'-':>7}"
        click.echo(f"{r['name']:<48} {r['complete']:>5} {r['running']:>4} {r['pruned']:>6} {r['fail']:>6} "
                   f"{fmt(base)} {fmt(best)} {change} {r['optimizer'] or '-':>9}")


@click.command()
@storage_option
@STUDY
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False),
              help="File to write: the schedule JSON; Forge's infotext line (--format forge); sd-webui-freeu's "
                   "presets.json (--format a1111-freeu: an existing one gets the preset added, its others kept).")
@click.option("--format", "format", default="schedule", show_default=True, type=click.Choice(["schedule", *UI_FORMATS]),
              help="schedule: the schedule JSON (skiptune_search.apply, evaluate). forge: Forge's built-in FreeU "
                   "settings as an infotext line; a1111-freeu: a preset of the AUTOMATIC1111 extension "
                   "sd-webui-freeu. Written only where that UI computes the same FreeU as the schedule (search with "
                   "--freeu-variant v2-channels for Forge, v1- or v2-channels for sd-webui-freeu), the σ window as "
                   "that UI's step fractions at the study's sampler and NFE; else a one-line refusal saying why. "
                   "See docs/forge-a1111.md.")
@click.option("--name", default=None, help="The preset's name in sd-webui-freeu [default: the study's name].")
@friendly
def export(storage, study, out, format, name) -> None:  # noqa: A002 (the option's name)
    """Write the best completed trial of a study as a schedule JSON file, or (--format) as a FreeU
    preset for Forge or sd-webui-freeu. For a FreeU schedule it also prints the factors, and
    diffusers' equivalent pipe.enable_freeu(...) call when there is one (a UNet2DConditionModel such
    as Stable Diffusion's and SDXL's, FreeU v1-stages at every σ, no factor 0), or why there is none."""
    from ..core.files import write_text_atomic
    from ..scoring.objectives import objective_label
    from ..search import ui_presets
    from ..search.storage import make_storage, shown_url
    from ..search.eye import preferred_schedule
    from ..search.study import export_best, is_eye, load_own_study, study_space

    check_outputs(out, storage=storage)
    st = load_own_study(make_storage(storage, create=False), study, shown_url(storage))
    schedule = (preferred_schedule if is_eye(st.user_attrs) else export_best)(st, storage)
    metric = schedule.metric
    if metric["name"] == "eye":
        best = f"trial {schedule.source['trial']}, chosen by eye after {metric['comparisons']} choices"
    else:
        best = (f"trial {schedule.source['trial']}, {objective_label(metric.get('name', 'fid'))} "
                f"{metric['value']:.4g} (baseline {metric['baseline']})")
    if format == "schedule":
        schedule.save(out)
        click.echo(f"wrote {out}: {best}")
        for line in freeu_lines(schedule):
            click.echo(line)
        return
    sigma_range = study_space(st).sigma_range
    if format == "forge":
        text, lines = ui_presets.forge_preset(schedule, sigma_range)
    else:
        entry, lines = ui_presets.a1111_preset(schedule, sigma_range)
        text = ui_presets.presets_json(out, name or st.study_name, entry)
    write_text_atomic(out, text)
    what = "Forge infotext line" if format == "forge" else f"sd-webui-freeu preset {name or st.study_name!r}"
    click.echo(f"wrote {out}: {what} from {best}")
    for line in lines:
        click.echo(line)


@click.command()
@storage_option
@STUDY
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--samples", default=64, show_default=True, type=click.IntRange(0, 1024),
              help="Sample the model for baseline and best grids (0: no grids, no model needed).")
@model_options
@friendly
def report(storage, study, out, samples, model, trust_pickle, checkouts, uvit_config) -> None:
    """Write one self-contained HTML report of a study: optimization history, ρ heatmap of the
    best schedule, parameter importances, FID at each rung, FID vs NFE across sibling studies,
    and baseline vs best sample grids. --model defaults to the study's model."""
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task, with_legacy_defaults
    from ..search.report import write_report
    from ..search.storage import make_storage, shown_url
    from ..search.study import export_best, is_eye, load_own_study, study_settings

    check_outputs(out, storage=storage)
    storage_obj = make_storage(storage, create=False)
    st = load_own_study(storage_obj, study, shown_url(storage))
    if is_eye(st.user_attrs):
        raise UserError(f"--study: study {study!r} was judged by eye and holds no FID to report: export its "
                        f"schedule, then 'skiptune-search evaluate --schedule FILE' scores it")
    grids = None
    if samples > 0:
        torch_setup()
        task = with_legacy_defaults(study_settings(st)["task"])
        source = click.get_current_context().get_parameter_source("model")
        if source == click.core.ParameterSource.DEFAULT:
            refuse_trust_for(task["model"], f"the study {study!r}", trust_pickle)
        model = task["model"] if source == click.core.ParameterSource.DEFAULT else model
        model = model_source(model, trust_pickle, checkouts, uvit_config)
        check_outputs(out, inputs=[*model.inputs(), ("the prompt file", task["prompts"])], storage=storage)
        evaluator = Evaluator(Task(model=model.model,
                                   sampler=task["sampler"], nfe=task["nfe"], n=max(samples, 2), seed=task["seed"],
                                   sigma_grid=task["sigma_grid"], prompts=task["prompts"], guidance=task["guidance"],
                                   height=task["height"], width=task["width"], precision=task["precision"]),
                              source=model)
        best = export_best(st, storage)
        grids = (evaluator.images(evaluator.controller.identity(), progress="baseline grid")[:samples],
                 evaluator.images(best, progress="best grid")[:samples])
    path = write_report(st, storage_obj, storage, out, grids)
    click.echo(f"wrote {path}")


@click.command()
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@friendly
def dashboard(storage, host, port) -> None:
    """Serve optuna-dashboard on the storage, with each trial's sample grid (its artifacts)."""
    from ..search.dashboard import serve

    serve(storage, host, port, announce=click.echo)


COMMANDS = [studies, export, report, dashboard]
