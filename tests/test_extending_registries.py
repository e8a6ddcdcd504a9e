"""The registration points of docs/extending.md: a family, an objective and a benchmark table
added from outside the package, then used by a real (tiny) search and the bench entry point."""

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner

from skiptune_search.bench import run as bench_run
from skiptune_search.bench import tables as bench_tables
from skiptune_search.cli import main
from skiptune_search.core import families
from skiptune_search.core.errors import InputError, ScheduleError
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.scoring import objectives
from skiptune_search.search.objective import trial_line
from skiptune_search.search.tune import tune


@pytest.fixture
def registries(monkeypatch):
    """The three registries as they are (built-in tables loaded first), restored after the test."""
    bench_tables.tables()
    for module, name in ((families, "_FAMILIES"), (objectives, "_OBJECTIVES"), (bench_tables, "_TABLES")):
        monkeypatch.setattr(module, name, dict(getattr(module, name)))


def test_a_toy_family_objective_and_table(registries, tiny_unet, tmp_path, bundled_npz):
    # a family: one ρ for every skip, with a first trial of its own
    families.register_family(families.Family(
        "toy_flat", "one ρ for every skip", lambda skips, k: ["rho_all"],
        lambda skips, p, k: [[p["rho_all"]] for _ in skips],
        first_trials=(families.FirstTrial("toy_first", {"rho_all": 0.9}, "toy's own first"),)))
    # an objective with a metric of its own: the squared distance of the feature mean to the reference's
    objectives.register_objective(objectives.Objective(
        "toy_mean", "TOY", "squared distance of the feature means", lambda r: r.values["toy_mean"],
        lambda rungs: rungs[-1].values["toy_mean"],
        measure=lambda feats, ref: float(np.sum((feats.double().mean(0).numpy() - ref.mu) ** 2))))
    net = EDMPrecond(tiny_unet)

    def sample(seeds):  # Euler on three σ, sample i from seeds[i] alone
        x = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 80
        for s, s_next in ((80.0, 5.0), (5.0, 0.5), (0.5, 0.0)):
            x = x + (s_next - s) * (x - net(x, torch.tensor(s))) / s
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)

    url = f"sqlite:///{tmp_path}/s.db"
    best = tune(net, sample, name="toy", reference=bundled_npz, family="toy_flat", objective="toy_mean", trials=2,
                n=4, rungs=(2, 4), storage=url, progress=False, batch_size=4)
    study = optuna.load_study(study_name="toy-toy_flat-input", storage=url)
    base, first = study.trials
    assert base.user_attrs["baseline"] and first.user_attrs["toy_first"] and first.params == {"rho_all": 0.9}
    for t in (base, first):  # each rung reported the toy metric; the value is the last rung's
        assert t.intermediate_values == {n: t.user_attrs["toy_mean_at"][str(n)] for n in (2, 4)}
        assert t.value == t.user_attrs["toy_mean_at"]["4"] != t.user_attrs["fid"]
    assert base.user_attrs["toy_mean_at"] != first.user_attrs["toy_mean_at"]  # ρ = 0.9 changed the images
    assert best.family == "toy_flat" and len({row[0] for row in best.rho}) == 1 and best.metric["name"] == "toy_mean"
    assert trial_line(study, first, "toy_mean").startswith(f"trial 1: TOY {first.value:.4g}  rho_all=0.900 "
                                                           f"(toy's own first)")
    result = CliRunner().invoke(main, ["export", "--storage", url, "--study", "toy-toy_flat-input",
                                       "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 0 and f", TOY {best.metric['value']:.4g} (baseline" in result.output  # not "FID"

    # a table: measured from the study above into the work folder, rendered with the built-in ones
    def measure(ctx):
        ctx.save("toy.json", {"values": [t.value for t in study.trials], "command": ctx.command})

    def render(ctx):
        r = ctx.results("toy.json")
        return [f"toy values {', '.join(f'{v:.4g}' for v in r['values'])} (by `{r['command']}`)"] if r else None

    bench_tables.register_table(bench_tables.Table(99, "A toy table", measure, render))
    out = bench_run.run_bench(True, tmp_path / "B.md", tmp_path / "work", "m", 3, "toy command", tables=(99,))
    text = out.read_text()
    assert f"## 99. A toy table\n\ntoy values {base.value:.4g}, {first.value:.4g} (by `toy command`)\n" in text
    assert text.index("## 9. Transfer across NFEs") < text.index("## 99.") and text.count("Not measured yet") == 9
    # bench --help lists every built-in table, each one registered by the module BUILTIN names
    helped = CliRunner().invoke(main, ["bench", "--help"], terminal_width=400).output
    listed = [line.split(None, 1) for line in helped[helped.index("Tables:"):helped.index("Options:")].splitlines()[1:]]
    assert listed == [[str(k), line] for k, (_, line) in sorted(bench_tables.BUILTIN.items())] + [[]]
    assert sorted(bench_tables.BUILTIN) == [t.number for t in bench_tables.tables() if t.number != 99]


def test_a_registered_name_is_not_taken_twice_and_an_unknown_one_is_one_line(registries, tiny_unet, tmp_path):
    linear = families.family("linear")
    with pytest.raises(ScheduleError, match="a family named 'linear' is already registered; pick another name"):
        families.register_family(linear)
    with pytest.raises(InputError, match="an objective named 'fid' is already registered") as info:
        objectives.register_objective(objectives.objective("fid"))
    assert info.value.option == "objective"
    with pytest.raises(InputError, match=r"a table numbered 4 is already registered \(Search efficiency"):
        bench_tables.register_table(bench_tables.Table(4, "again", print, print))
    net = EDMPrecond(tiny_unet)
    for kwargs, option in (({"family": "toy_flat"}, "family"), ({"objective": "toy_mean"}, "objective")):
        with pytest.raises(InputError, match=r"(family|objective) = 'toy_\w+' is not one of|unknown objective") as info:
            tune(net, lambda seeds: None, name="x", reference="r.npz", storage=f"sqlite:///{tmp_path}/s.db",
                 progress=False, **kwargs)
        assert info.value.option == option and "\n" not in str(info.value)
    assert not (tmp_path / "s.db").exists()
