"""A self-contained HTML report of a study (plotly): how the search went and what it found."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path

import optuna
import plotly.graph_objects as go

from ..core import freeu
from ..core.families import family, family_names
from ..core.files import write_text_atomic
from ..core.schedule import RhoSchedule
from ..scoring.objectives import objective_label
from .space import CALL_PARAMS
from .storage import shown_url
from .study import baseline_trial, export_best, siblings


def _rho_heatmap(schedule: RhoSchedule) -> go.Figure:
    columns = [f"σ={k:.3g}" for k in schedule.sigma_knots] or ["all σ"]
    rows = [f"{i}: {s.name} ({s.resolution}px)" for i, s in enumerate(schedule.skips)]
    fig = go.Figure(go.Heatmap(z=schedule.rho, x=columns, y=rows, colorscale="RdBu", zmid=1.0,
                               colorbar={"title": "ρ"}, hovertemplate="%{y}<br>%{x}<br>ρ = %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"ρ of the best schedule ({schedule.family}, {schedule.placement} placement)",
                      yaxis={"autorange": "reversed"}, height=max(300, 28 * len(rows) + 120))
    return fig


def _freeu_text(f: freeu.FreeU) -> str:
    factors = ", ".join(f"{name}={getattr(f, name):.3f}" for name in freeu.FACTORS)
    return factors + (" at every σ" if f.window is None else f", while σ is in [{f.window[0]:.4g}, {f.window[1]:.4g}]")


def _fid_vs_nfe(study: optuna.Study) -> go.Figure | None:
    """Untuned vs tuned FID over the NFEs of sibling studies: every setting but the NFE the same
    (model and its weights, sampler, σ grid, N, seeds, reference, objective, family, range...);
    of several at one NFE, the best."""
    task = study.user_attrs.get("settings", {}).get("task", {})
    by_nfe = {}
    for other in [study, *siblings(study)]:
        base = baseline_trial(other)
        complete = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if base and complete:
            nfe = other.user_attrs["settings"]["task"]["nfe"]
            point = (nfe, base.value, min(c.value for c in complete))
            by_nfe[nfe] = min(by_nfe.get(nfe, point), point, key=lambda p: p[2])
    points = sorted(by_nfe.values())
    if len(points) < 2:
        return None
    nfes = [p[0] for p in points]
    fig = go.Figure([go.Scatter(x=nfes, y=[p[1] for p in points], name="untuned (ρ = 1)", mode="lines+markers"),
                     go.Scatter(x=nfes, y=[p[2] for p in points], name="tuned (best trial)", mode="lines+markers")])
    fig.update_layout(title="FID vs NFE", xaxis_title="NFE", yaxis_title=objective_label(task.get("objective", "fid")))
    return fig


def _png_data_uri(images) -> str:
    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(images.float().div(255), buffer, nrow=8, padding=2, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_report(study: optuna.Study, storage, storage_url: str, out: str | os.PathLike,
                 sample_grids: tuple | None = None) -> Path:
    """Write the report; ``sample_grids`` = (baseline uint8 images, best uint8 images) or None."""
    schedule = export_best(study, storage_url)
    base = baseline_trial(study)
    figures: list[tuple[str, go.Figure]] = [
        ("Optimization history", optuna.visualization.plot_optimization_history(study))]
    if schedule.family not in family_names() or family(schedule.family).rho_family is not None:  # else ρ = 1
        figures.append(("Best schedule", _rho_heatmap(schedule)))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    freeu_params = [p for p in (*freeu.FACTORS, *freeu.WINDOW_PARAMS, *CALL_PARAMS) if p in schedule.params]
    if freeu_params and complete:  # each of FreeU's factors (and the window's ends) against the objective
        figures.append(("FreeU's factors", optuna.visualization.plot_slice(study, params=freeu_params)))
    preset = next((t for t in complete if t.user_attrs.get("freeu_preset")), None)
    if len(complete) >= 3 and len(study.best_params) > 1:
        figures.append(("Parameter importances", optuna.visualization.plot_param_importances(study)))
    if any(len(t.intermediate_values) > 1 for t in study.trials):
        figures.append(("FID at each rung", optuna.visualization.plot_intermediate_values(study)))
    nfe_fig = _fid_vs_nfe(study)
    if nfe_fig is not None:
        figures.append(("FID vs NFE", nfe_fig))

    metric = schedule.metric
    change = (f"{100 * (metric['value'] - base.value) / base.value:+.1f}%" if base else "n/a")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>skiptune-search report: {html.escape(study.study_name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}"
        ".grids{display:flex;gap:2em}.grids img{image-rendering:pixelated;width:480px}</style></head><body>",
        f"<h1>{html.escape(study.study_name)}</h1>",
        "<table>",
        f"<tr><th>storage</th><td>{html.escape(shown_url(storage_url))}</td></tr>",
        f"<tr><th>task</th><td>{html.escape(str(study.user_attrs.get('settings', {}).get('task')))}</td></tr>",
        f"<tr><th>trials</th><td>{len(complete)} complete, {len(study.trials)} in all</td></tr>",
        f"<tr><th>baseline (ρ = 1)</th><td>{base.value:.3f}</td></tr>" if base else "",
        f"<tr><th>best</th><td>{metric['value']:.3f} (trial {schedule.source['trial']}, {change})</td></tr>",
        (f"<tr><th>FreeU preset ({html.escape(str(preset.user_attrs['freeu_preset']))})</th><td>{preset.value:.3f} "
         f"(trial {preset.number})</td></tr>" if preset else ""),
        (f"<tr><th>best FreeU</th><td>{html.escape(_freeu_text(schedule.freeu))}</td></tr>" if schedule.freeu else ""),
        f"<tr><th>best parameters</th><td>{html.escape(str(schedule.params))}, "
        f"placement {schedule.placement}</td></tr>",
        f"<tr><th>written</th><td>{_dt.datetime.now().isoformat(timespec='seconds')}</td></tr></table>",
    ]
    for i, (title, fig) in enumerate(figures):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False))
    if sample_grids is not None:
        parts.append("<h2>Samples (same seeds)</h2><div class='grids'>")
        for label, images in zip(("untuned (ρ = 1)", "best schedule"), sample_grids):
            parts.append(f"<figure><img src='{_png_data_uri(images)}'><figcaption>{label}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")

    return write_text_atomic(out, "\n".join(parts))
