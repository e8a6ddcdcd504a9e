import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli_helpers import one_line_error
from skiptune_search.cli import main


def _search_args(model_dir):
    return ["search", "--model", model_dir, "--nfe", 3, "--n", 10, "--rungs", 10, "--trials", 3, "--batch", 5]


def test_a_gp_search_prunes_nothing(run, tiny_model_dir):
    """Optuna's GP models completed trials only (with pruning it searched at random): a GP study
    records no pruning, and its rungs report FID without stopping a trial."""
    import optuna

    result = run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 16, "--trials", 4, "--batch", 16,
                 "--optimizer", "gp", "--rungs", "2,16")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny-model-heun-nfe3-linear-input", storage="sqlite:///studies/skiptune.db")
    assert study.user_attrs["reduction_factor"] == 0
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4 and "pruned" not in result.output
    assert all(2 in t.intermediate_values for t in study.trials)  # the rung still reports
    assert ", optimizer gp, no pruning" in result.output  # the first line says how the study prunes


def test_search_export_sample_end_to_end(run, tiny_model_dir, tmp_path):
    result = run(*_search_args(tiny_model_dir))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "baseline FID (ρ = 1):" in out and "best FID:" in out and "best ρ (outer→inner):" in out
    assert "sqlite:///studies/skiptune.db" in out and ", optimizer cmaes, no pruning" in out  # linear's default; one rung
    exported = tmp_path / "studies" / "tiny-model-heun-nfe3-linear-input.best.json"
    assert exported.is_file() and str(exported.relative_to(tmp_path)) in out
    assert (tmp_path / "studies" / "skiptune.db").is_file()

    # resuming the finished study runs no new trial
    again = run(*_search_args(tiny_model_dir))
    assert again.exit_code == 0 and "3 finished trials so far" in again.output and "trial 4" not in again.output

    listing = run("studies")
    assert listing.exit_code == 0 and "tiny-model-heun-nfe3-linear-input" in listing.output
    row = next(line for line in listing.output.splitlines() if line.startswith("tiny-model"))
    assert row.split()[1:3] == ["3", "0"] and row.split()[-1] == "cmaes"

    result = run("report", "--study", "tiny-model-heun-nfe3-linear-input", "-o", "report.html", "--samples", 4)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    for part in ("Optimization history", "Best schedule", "Parameter importances", "Samples (same seeds)",
                 "<img src='data:image/png;base64,"):
        assert part in page
    assert "<script src=" not in page and page.count("<script") >= 3  # plotly inlined: works offline

    result = run("export", "--study", "tiny-model-heun-nfe3-linear-input", "-o", "best.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "best.json").read_text())
    assert data["source"]["study"] == "tiny-model-heun-nfe3-linear-input"

    for extra in (["--schedule", "best.json"], []):
        result = run("sample", "--model", tiny_model_dir, "--nfe", 3, "-n", 4, "-o", "grid.png", *extra)
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / "grid.png") as img:
            assert img.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16px, 2px padding
    # the schedule's own model and NFE when the command line names none
    result = run("sample", "--schedule", "best.json", "-n", 4, "-o", "tuned.png")
    assert result.exit_code == 0, result.output
    assert f"of {tiny_model_dir}, heun NFE 3 (karras σ grid, fp32)" in result.output


def test_bad_input_is_a_one_line_error(run, tiny_model_dir, tmp_path):
    one_line_error(run("search", "--model", tiny_model_dir, "--nfe", 10), "nearest valid: 9, 11")
    one_line_error(run("search", "--model", tiny_model_dir, "--rho-min", 2), "--rho-min")
    one_line_error(run("search", "--model", tmp_path / "nowhere"), "--model: model", "not found",
                    "use fashion-mnist-edm (bundled)")
    one_line_error(run("sample", "--model", tiny_model_dir, "--schedule", "missing.json", "-o", "g.png"),
                    "missing.json not found")
    one_line_error(run("export", "--study", "nope", "-o", "x.json"), "no study storage at studies/skiptune.db")
    for read_only in (["studies"], ["export", "--study", "s", "-o", "x.json"], ["report", "--study", "s", "-o", "r.html"],
                      ["dashboard"]):  # a mistyped storage path is not created empty
        one_line_error(run(*read_only, "--storage", "sqlite:///typo/s.db"), "no study storage at typo/s.db")
    assert not (tmp_path / "typo").exists()
    import optuna

    from skiptune_search.search.storage import make_storage

    optuna.create_study(storage=make_storage("sqlite:///studies/skiptune.db"), study_name="other")
    one_line_error(run("export", "--study", "nope", "-o", "x.json"), "no study 'nope'")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "g.png").exists()


def test_changed_settings_do_not_touch_the_study(run, tiny_model_dir, tmp_path):
    assert run(*_search_args(tiny_model_dir)[:-4], "--trials", 1, "--batch", 5).exit_code == 0, "setup"
    db = _rows(tmp_path / "studies" / "skiptune.db")
    result = run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 20, "--trials", 2)
    one_line_error(result, "--study: study", "n: 10 (now 20)", "or another study name")
    assert _rows(tmp_path / "studies" / "skiptune.db") == db


def _rows(path: Path) -> list[str]:
    """Every row of the SQLite file, as SQL. Not its bytes: a write-ahead log folded into the file
    (when a connection closes) changes the bytes and no row."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return list(db.iterdump())


def test_help_is_the_manual(run):
    result = run("--help")
    for command in ("search", "export", "sample", "train-default", "reference-stats"):
        assert command in result.output
    assert "--nfe" in run("search", "--help").output


def test_inspect_lists_skips_and_groupnorm_fate(run, tiny_model_dir):
    result = run("inspect", "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "UNet2DModel: 4 long skips" in result.output and "cancelled by GroupNorm" in result.output
    data = json.loads(run("inspect", "--model", tiny_model_dir, "--json").output)
    assert [s["name"] for s in data["skips"]][0] == "conv_in"
    assert {"index", "name", "consumer", "channels", "resolution", "cancelled"} <= set(data["skips"][0])


def test_config_file_sets_defaults_and_rejects_unknown_keys(run, tiny_model_dir, tmp_path):
    (tmp_path / "c.toml").write_text(f'model = "{tiny_model_dir}"\nnfe = 3\nn = 8\ntrials = 1\nbatch = 4\n')
    result = run("search", "--config", "c.toml", "--n", 6)  # the command line wins over the file
    assert result.exit_code == 0, result.output
    assert "heun NFE 3 (karras σ grid), N = 6 samples" in result.output
    (tmp_path / "bad.toml").write_text("nfee = 3\n")
    one_line_error(run("search", "--config", "bad.toml"), "unknown key 'nfee'", "did you mean 'nfe'?")
    (tmp_path / "broken.toml").write_text("nfe = \n")
    one_line_error(run("search", "--config", "broken.toml"), "not valid TOML")
    (tmp_path / "latin1.toml").write_bytes('model = "modèle"\n'.encode("latin-1"))  # TOML must be UTF-8
    one_line_error(run("search", "--config", "latin1.toml"), "not UTF-8 text")


@pytest.mark.parametrize("line, message", [
    ('trust_pickle = "yes"', "key 'trust_pickle' is not allowed in a config file"),
    ("trust_pickle = true", "pass --trust-pickle on the command line"),
    ('edm-path = "edm"', "key 'edm-path' is not allowed in a config file"),
    ('checkout = "edm=edm"', "key 'checkout' is not allowed in a config file"),
    ("nfe = 5.7", "key 'nfe' = 5.7 must be an integer"),
    ('nfe = "9"', "key 'nfe' = '9' must be an integer"),
    ("nfe = true", "key 'nfe' = True must be an integer"),
    ('rho_min = "0.5"', "key 'rho_min' = '0.5' must be a number"),
    ('family = "zigzag"', "key 'family': 'zigzag' is not one of"),
    ("sampler = 3", "key 'sampler' = 3 must be a string"),
    ("seeds = [1, 2]", "unknown key 'seeds'"),
    ("model = [1, 2]", "key 'model' holds a list"),
])
def test_config_values_are_type_checked_and_never_grant_trust(run, tmp_path, line, message):
    """A config file cannot let a pickle run (not even with a truthy string), and every value must
    have its option's type: one line naming the file and the key, exit 2, no study written."""
    (tmp_path / "c.toml").write_text(f'model = "x.pkl"\n{line}\n' if not line.startswith("model") else line + "\n")
    result = run("search", "--config", "c.toml")
    one_line_error(result, "c.toml", message)
    assert not (tmp_path / "studies").exists()


def test_trust_from_the_command_line_still_reaches_the_loader(run, tmp_path):
    (tmp_path / "c.toml").write_text('model = "missing.pkl"\n')
    result = run("search", "--config", "c.toml", "--trust-pickle")
    one_line_error(result, "missing.pkl not found")  # past the trust gate: the file itself is missing
    assert "Error: --trust-pickle: missing.pkl is a pickle" in run("search", "--config", "c.toml").output


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_parse_and_build(config, request, monkeypatch, tmp_path):
    """Every shipped config names only known options and builds its model, sampler and space; a
    checkpoint this machine cannot have is a one-line error, and the config's sampler, σ grid and
    guidance run on a tiny stand-in of the same model family."""
    from dataclasses import fields, replace

    from skiptune_search.cli.common import parse_rungs
    from skiptune_search.cli.config import read_config
    from skiptune_search.cli.tune import search
    from skiptune_search.core.errors import ModelLoadError
    from skiptune_search.models.source import ModelSource
    from skiptune_search.sampling import SCHEDULERS, SIGMA_SAMPLERS
    from skiptune_search.sampling.samplers import steps_for_nfe
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task
    from skiptune_search.search.space import Space

    values = read_config(config, [p.name for p in search.params])
    values_for_task = {f.name: values[f.name] for f in fields(Task) if f.name in values}
    values_for_task["rungs"] = parse_rungs(values.get("rungs"), values["n"])
    task = Task(**values_for_task)  # validates rungs, objective, the sampler's name (a σ-space sampler's NFE)
    Space(values["family"], values["placement"], (values["rho_min"], values["rho_max"]))
    if task.model == "fashion-mnist-edm":
        evaluator = Evaluator(task)  # loads the model, attaches the controller, builds the σ grid
        assert len(evaluator.sigmas) == evaluator.steps + 1
        assert evaluator.reference.mu.shape == (1280,)
    elif task.model.endswith(".pkl"):  # a checkpoint this machine cannot have: the loader must say so in one line
        with pytest.raises(ModelLoadError, match="not found"):
            Evaluator(task, source=ModelSource(task.model, trust_pickle=True))  # as --trust-pickle gives it
    elif task.model.endswith(".pth"):  # a U-ViT state dict: built by a checkout, which must be named
        with pytest.raises(ModelLoadError, match="built from a checkout of baofff/U-ViT"):
            Evaluator(task)
    else:  # a Hugging Face repo id, not in this machine's cache
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelLoadError, match=f"hf download {task.model}$"):
            Evaluator(task)
        evaluator = Evaluator(replace(task, model=_stand_in(task, request, tmp_path), n=4, rungs=(2, 4), **(
            {"prompts": str(_write(tmp_path / "p.txt", "a cat\n"))} if task.prompts else {})), device="cpu")
        if task.sampler in SIGMA_SAMPLERS:
            assert len(evaluator.sigmas) == steps_for_nfe(task.sampler, task.nfe) + 1
        else:  # a scheduler: the σ of each of its NFE UNet calls, then 0
            assert len(evaluator.sigmas) == task.nfe + 1 and evaluator.pipeline.pipe.scheduler.__class__.__name__ == (
                SCHEDULERS[task.sampler])
        assert evaluator.sigmas[-1] == 0
        images = evaluator.images(evaluator.controller.identity(), progress=False)
        assert images.dtype == torch.uint8 and images.shape[0] == 4
    ctx = search.make_context("search", ["--config", str(config)], resilient_parsing=True)
    assert ctx.default_map == values


def _write(path, text):
    path.write_text(text)
    return path


def _stand_in(task, request, tmp_path) -> str:
    """A tiny random pipeline of the task's model family: SDXL or Stable Diffusion when the task has
    prompts, else a DDPM pipeline with google/ddpm-cifar10-32's scheduler config."""
    if task.prompts:
        return str(request.getfixturevalue("tiny_sdxl_dir" if "-xl-" in task.model else "tiny_sd_dir"))
    from diffusers import DDPMPipeline, DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=request.getfixturevalue("tiny_unet"), scheduler=scheduler).save_pretrained(tmp_path / "ddpm")
    return str(tmp_path / "ddpm")


def test_evaluate_on_held_out_seeds(run, tiny_model_dir, tmp_path):
    assert run(*_search_args(tiny_model_dir)).exit_code == 0
    best = tmp_path / "studies" / "tiny-model-heun-nfe3-linear-input.best.json"
    result = run("evaluate", "--schedule", best, "--model", tiny_model_dir, "--n", 12, "--blocks", 3,
                 "--batch", 6, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n"] == 12 and data["seeds"] == "1000000-1000011" and data["nfe"] == 3
    assert len(data["baseline"]["block_fids"]) == 3
    diffs = [t - b for t, b in zip(data["tuned"]["block_fids"], data["baseline"]["block_fids"])]
    assert data["difference"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert data["difference"]["low"] <= data["difference"]["mean"] <= data["difference"]["high"]
    assert data["gain_holds"] == (data["difference"]["high"] < 0)
    text = run("evaluate", "--schedule", best, "--model", tiny_model_dir, "--n", 12, "--blocks", 3, "--batch", 6)
    assert "untuned  FID" in text.output and ("gain holds" in text.output or "does NOT hold" in text.output)
    one_line_error(run("evaluate", "--schedule", best, "--model", tiny_model_dir, "--seed", 5, "--n", 12),
                    "overlap the search's seeds 0-9")


def test_more_bad_input_each_one_line(run, tiny_model_dir, tmp_path):
    # a corrupt checkpoint
    broken = tmp_path / "broken-model"
    import shutil

    shutil.copytree(tiny_model_dir, broken)
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    one_line_error(run("search", "--model", broken, "--nfe", 3), "could not load")
    # missing reference statistics
    one_line_error(run("search", "--model", tiny_model_dir, "--nfe", 3, "--reference", "nope.npz"),
                    "nope.npz not found")
    # a storage path that cannot be written (a file where a folder should be)
    (tmp_path / "afile").write_text("x")
    one_line_error(run("search", "--model", tiny_model_dir, "--nfe", 3, "--storage", "sqlite:///afile/s.db"),
                    "cannot open storage")
    # an impossible NFE and an unknown sampler for evaluate's schedule
    one_line_error(run("search", "--model", tiny_model_dir, "--sampler", "euler", "--nfe", 0), "'--nfe': 0 is not in the range 1<=x<=1000")
    one_line_error(run("search", "--model", tiny_model_dir, "--sampler", "heun", "--nfe", 4), "--nfe: NFE 4 is impossible for heun")
    # devices this tool does not run on, or that this machine lacks
    for device, says in (("mps", "use 'auto', 'cpu', 'cuda' or 'cuda:N'"), ("gpu0", "use 'auto', 'cpu'"),
                         ("cuda:7", "cuda:7")):
        one_line_error(run("sample", "--model", tiny_model_dir, "-n", 2, "-o", "x.png", "--device", device), says)
    assert not (tmp_path / "studies").exists()  # nothing was created by any of these


def test_nan_samples_fail_that_trial_and_the_study_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    from skiptune_search.core.errors import NonFiniteSamplesError
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task
    from skiptune_search.search.objective import run_search
    from skiptune_search.search.space import Space
    from skiptune_search.search.storage import make_storage
    from skiptune_search.search.study import export_best, open_study

    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=6), batch_size=6)
    real = evaluator.features
    calls = []

    def sometimes_nan(schedule, seeds=None, progress=True):
        calls.append(1)
        if len(calls) == 2:
            raise NonFiniteSamplesError("non-finite values in samples of seeds 0..5")
        return real(schedule, seeds, progress)

    monkeypatch.setattr(evaluator, "features", sometimes_nan)
    space = Space("linear", "input", (0.5, 1.5))
    study = open_study(make_storage(f"sqlite:///{tmp_path}/s.db"), "nan", evaluator.task, space,
                       evaluator.controller, 0)
    run_search(evaluator, study, space, trials=4)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "non-finite" in study.trials[1].user_attrs["fail_reason"]
    assert export_best(study, "x").source["trial"] != 1


def test_bench_quick_writes_its_tables(run, tiny_model_dir, tmp_path):
    result = run("bench", "--quick", "--model", tiny_model_dir, "--nfe", 3, "--out", "B.md", "--tables", "1,2,3,4,5,6,8,9")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "B.md").read_text()
    assert f"`skiptune-search bench --quick --out B.md --model {tiny_model_dir} --nfe 3 --tables 1,2,3,4,5,6,8,9`" in text
    for part in ("Controller overhead", "| input, ρ = 1 |", "| normalized, ρ = 1 |", "Where a trial's time goes",
                 "images/s", "of their speed", "| input, paper ramp (ρ 0.8 → 1.0) |", "the mean trial of a 16-trial search", "of the trial (target ≥ 90%)", "Machine:", "| fid@16 |", "| kid@4 |", "| fid_inf |", "all 3x3 (ρ_inner, ρ_outer)",
                 "| tpe | on |", "| cmaes | off |", "Largest overhead:", "Per model call, where the hooks weigh most", "| no controller | ", " | 1.000x |", "| random | on |", "| NFE | untuned | linear | per_layer |",
                 "| 4 | bf16 autocast |", "seconds per proxy trial", "FID and KID at N/4 and N. fp32 rows ran with TF32",
                 "| NFE | untuned | FreeU preset | tuned FreeU (every σ) | tuned FreeU + σ window |",
                 "The preset is SD1.5's (b1, b2, s1, s2 = 1.5, 1.6, 0.9, 0.2)", "| best ρ family (table 5) |"):
        assert part in text, part
    assert "Pruning variants" in text and "| tpe | 2,16 |" in text and "| tpe | 4,16 |" in text  # low rungs replayed
    assert "(N = 16, rungs 16, no pruning) per search seed" in text  # table 8: one rung in --quick
    assert ("(rungs 4,16, successive halving keeping the best eighth at 4, CMA-ES counting a pruned trial toward its "
            "generation at its rung's FID; pruning off: N only)") in text  # every family
    assert "### Every family" in text and "| linear | tpe |" in text and "| freeu | tpe |" in text  # real searches
    assert ("| linear | tpe | 4,16: successive halving keeping the best third at 4 (the search before issue 27) |"
            in text)  # a pruning variant
    assert "| linear tuned at NFE 3 |" in text and "| untuned |" in text  # table 9, from table 5's search
    # table 4 runs before table 5, whose quick run searches --nfe alone: no warm search, and the part says why
    assert "### Warm starts" in text and "(table 5 here has NFE 3): run --tables 5 first" in text
    raw = tmp_path / "studies" / "bench-quick"
    headline, freeu_table = (json.loads((raw / f).read_text())["nfe"]["3"] for f in ("headline.json", "freeu.json"))
    assert freeu_table["untuned"] == headline["untuned"] and "untuned" in freeu_table["taken_from"]  # not scored again
    assert "untuned_seconds" not in freeu_table and len(freeu_table["freeu"]) == 1
    assert {p.name for p in raw.iterdir()} >= {"table1.json", "table2.json", "grid.json", "truth.json",
                                               "headline.json", "gpu.json", "replays.json", "freeu.json", "cost.json", "transfer.json"}
    assert not (raw / "warm.json").exists()

    # a second run of table 1 alone keeps the other tables, rendered from the saved results
    again = run("bench", "--quick", "--model", tiny_model_dir, "--nfe", 3, "--out", "B.md", "--tables", "1",
                "--work", "studies/bench-quick")
    assert again.exit_code == 0, again.output
    text = (tmp_path / "B.md").read_text()
    assert "--tables 1 --work studies/bench-quick`" in text and "| fid@16 |" in text and "| tpe | on |" in text

    # 'none' measures nothing and renders what was measured; without --out, a folder other than
    # studies/bench (--quick's too) renders beside its results, never over BENCHMARKS.md
    (tmp_path / "B.md").unlink()
    assert run("bench", "--quick", "--tables", "none").exit_code == 0
    assert "| fid@16 |" in (raw / "BENCHMARKS.md").read_text() and not (tmp_path / "BENCHMARKS.md").exists()

    bad = run("bench", "--quick", "--tables", "10")
    assert bad.exit_code == 2 and "the tables are 1, 2, 3, 4, 5, 6, 7, 8, 9" in bad.output


def test_out_of_gpu_memory_is_a_one_line_error_naming_the_batch(run, tiny_model_dir, monkeypatch):
    import torch

    from skiptune_search.scoring.evaluator import Evaluator

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Evaluator, "images", out_of_memory)
    one_line_error(run("sample", "--model", tiny_model_dir, "--nfe", 3, "-n", 2, "-o", "g.png"),
                    "out of GPU memory: pass a smaller --batch")


def test_locked_storage_is_a_one_line_error(run, tiny_model_dir, tmp_path, monkeypatch):
    import sqlite3

    import skiptune_search.search.storage as S

    monkeypatch.setattr(S, "SQLITE_BUSY_TIMEOUT", 0.5)
    (tmp_path / "studies").mkdir()
    holder = sqlite3.connect(tmp_path / "studies" / "skiptune.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock and never lets go
    try:
        one_line_error(run("search", "--model", tiny_model_dir, "--nfe", 3, "--n", 4), "cannot open storage",
                        "locked")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_report_plots_fid_against_nfe_across_sibling_studies(run, tiny_model_dir, tmp_path):
    for nfe, extra in ((1, []), (3, []), (5, ["--rho-max", 1.2, "--study", "narrower"])):
        args = ["search", "--model", tiny_model_dir, "--nfe", nfe, "--n", 4, "--rungs", 4, "--trials", 2, *extra]
        assert run(*args).exit_code == 0
    result = run("report", "--study", "tiny-model-heun-nfe3-linear-input", "-o", "r.html", "--samples", 0)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "FID vs NFE" in page and "tuned (best trial)" in page and "Samples (same seeds)" not in page
    assert '"x":[1,3]' in page  # the study of another ρ range is no sibling


def test_search_says_when_the_best_sits_at_the_edge_of_the_range(run, tiny_model_dir):
    # in [0.9, 1.0] every trial, the ρ = 1 baseline included, touches a bound
    result = run(*_search_args(tiny_model_dir), "--rho-min", 0.9, "--rho-max", 1.0)
    assert result.exit_code == 0, result.output
    assert "at the edge of the range [0.9, 1]: the optimum may lie outside it" in result.output


def test_schedule_fills_what_the_command_line_leaves_unset():
    """sample and evaluate take the model, sampler, NFE, σ grid and precision a schedule was tuned
    for, unless given: naming the bundled model explicitly keeps it, another sampler keeps its own
    default σ grid, and a schedule that names no precision is fp32."""
    import types

    import click

    from skiptune_search.cli.common import task_options, tuned_for_defaults

    schedule = types.SimpleNamespace(tuned_for={"model": "models/mine", "sampler": "dpmpp_2m", "nfe": 7,
                                                "sigma_grid": "model", "precision": "bf16"})
    seen = []

    @click.command()
    @task_options
    def command(model, sampler, nfe, sigma_grid, prompts, guidance, precision, **_):
        v = tuned_for_defaults(schedule, model=model, sampler=sampler, nfe=nfe, sigma_grid=sigma_grid,
                               prompts=prompts, guidance=guidance, precision=precision)
        seen.append(tuple(v[k] for k in ("model", "sampler", "nfe", "sigma_grid", "prompts", "guidance", "precision")))

    for args in ([], ["--model", "fashion-mnist-edm", "--sampler", "heun"], ["--nfe", "5", "--sigma-grid", "karras",
                                                                              "--precision", "fp32"]):
        assert CliRunner().invoke(command, args, catch_exceptions=False).exit_code == 0
    assert seen == [("models/mine", "dpmpp_2m", 7, "model", None, None, "bf16"),
                    ("fashion-mnist-edm", "heun", 7, None, None, None, "bf16"),
                    ("models/mine", "dpmpp_2m", 5, "karras", None, None, "fp32")]
    del schedule.tuned_for["precision"]
    assert CliRunner().invoke(command, [], catch_exceptions=False).exit_code == 0
    assert seen[-1][-1] == "fp32"
