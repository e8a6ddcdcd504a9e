"""Hostile input and faults (issue 21): no code runs unasked, no study of another tool is written,
no baseline is lost to a killed run, every fault is one line with a nonzero exit."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner

from cli_helpers import ends_in_one_line_error, one_line_error
from skiptune_search.cli import main

EXE = str(Path(sys.executable).parent / "skiptune-search")
STATES = optuna.trial.TrialState


def tiny_search(model_dir, *extra):
    return ["search", "--model", model_dir, "--nfe", 3, "--n", 4, "--rungs", 4, "--batch", 4, *extra]


# --- foreign studies ------------------------------------------------------------------------------
def test_a_study_of_another_tool_is_refused_before_any_write_and_listed_as_foreign(run, tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path}/studies/skiptune.db"
    (tmp_path / "studies").mkdir()
    plain = optuna.create_study(study_name="plain", storage=url)
    plain.set_user_attr("mine", "yes")
    plain.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    multi = optuna.create_study(study_name="multi", storage=url, directions=["minimize", "maximize"])
    multi.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=1)

    def snapshot():
        return {n: (optuna.load_study(study_name=n, storage=url).user_attrs,
                    [(t.state, t.params, t.user_attrs) for t in optuna.load_study(study_name=n, storage=url).trials])
                for n in ("plain", "multi")}

    before = snapshot()
    for name in ("plain", "multi"):
        one_line_error(run(*tiny_search(tiny_model_dir, "--study", name)), f"--study: study {name!r} was not made by "
                       "skiptune-search", "left untouched")
        one_line_error(run("export", "--study", name, "-o", "x.json"), "was not made by skiptune-search")
        one_line_error(run("report", "--study", name, "-o", "x.html", "--samples", 0), "was not made by")
    assert snapshot() == before and not (tmp_path / "x.json").exists()
    assert run(*tiny_search(tiny_model_dir, "--trials", 1)).exit_code == 0  # a study of ours beside them
    listing = run("studies")
    assert listing.exit_code == 0, listing.output
    assert "plain" in listing.output and "multi" in listing.output
    assert listing.output.count("(not a skiptune-search study: left alone)") == 2
    row = next(line for line in listing.output.splitlines() if line.startswith("tiny-model"))
    assert row.split()[1:5] == ["1", "0", "0", "0"]  # done, running, pruned, failed
    assert snapshot() == before


# --- killed and terminated runs -------------------------------------------------------------------
def _baseline_running_with_its_worker(tmp_path):
    """The ρ = 1 trial is under way and has recorded its process (the first thing a trial does)."""
    path = tmp_path / "studies" / "skiptune.db"
    if _states(tmp_path)[:1] != ["RUNNING"]:
        return False
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        keys = {row[0] for row in db.execute("SELECT a.key FROM trial_user_attributes a JOIN trials t "
                                              "ON a.trial_id = t.trial_id WHERE t.number = 0")}
    return {"worker", "baseline"} <= keys


def _states(tmp_path):
    """Trial states read without creating anything (read-only SQLite): [] before the study exists."""
    path = tmp_path / "studies" / "skiptune.db"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:
        return []


def _wait_for(predicate, process, timeout=180.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the search ended early: {process.communicate()[1][-1500:]}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError("no trial got under way")


def _slow_search(model_dir, *extra):
    # N = 200 at NFE 3, batch 20: long enough per trial to be stopped mid-way (--optimizer tpe: the
    # same under any optimizer, and TPE spares the process CMA-ES's import of scipy.stats)
    return [EXE, "search", "--model", str(model_dir), "--nfe", "3", "--n", "200", "--rungs", "200",
            "--batch", "20", "--threads", "1", "--optimizer", "tpe", *map(str, extra)]


def test_a_run_killed_during_the_baseline_loses_no_baseline(tiny_model_dir, tmp_path):
    """SIGKILL while the ρ = 1 trial runs, then at once the same command (heartbeat 60 s, so no
    heartbeat has gone stale): the dead trial is failed and run again, the baseline is reported and
    exported, and nothing is left RUNNING."""
    worker = subprocess.Popen(_slow_search(tiny_model_dir, "--trials", 2), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _baseline_running_with_its_worker(tmp_path), worker)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        worker.kill()
    assert _states(tmp_path)[0] == "RUNNING"
    result = subprocess.run(_slow_search(tiny_model_dir, "--trials", 2), cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "baseline FID (ρ = 1): " in result.stdout and "not finished" not in result.stdout
    study = optuna.load_study(study_name="tiny-model-heun-nfe3-linear-input",
                              storage=f"sqlite:///{tmp_path}/studies/skiptune.db")
    states = [t.state for t in study.trials]
    assert STATES.RUNNING not in states and states[0] == STATES.FAIL
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state == STATES.COMPLETE and retry.user_attrs["baseline"]
    # the baseline's ρ = 1 in full, though the kill may have come between the dead trial's first two suggestions
    assert retry.params == {"rho_inner": 1.0, "rho_outer": 1.0} and study.trials[0].params.items() <= retry.params.items()
    exported = json.loads((tmp_path / "studies" / "tiny-model-heun-nfe3-linear-input.best.json").read_text())
    assert exported["metric"]["baseline"] == retry.value


def test_sigterm_stops_like_ctrl_c_with_exit_code_143(tiny_model_dir, tmp_path):
    worker = subprocess.Popen(_slow_search(tiny_model_dir, "--trials", 3), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _states(tmp_path)[:1] == ["RUNNING"], worker)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 143, err[-1500:]
    assert "terminated: every finished trial is saved; rerun the same command to resume" in err
    assert "Traceback" not in err
    assert "RUNNING" not in _states(tmp_path)  # the trial under way is marked failed, to be run again


# --- output paths ---------------------------------------------------------------------------------
def test_outputs_are_regular_files_only(run, tmp_path, tiny_model_dir):
    assert run(*tiny_search(tiny_model_dir, "--trials", 1)).exit_code == 0
    study = "tiny-model-heun-nfe3-linear-input"
    target = tmp_path / "target.json"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "folder.json").mkdir()
    for path, kind in (("link.json", "a symbolic link"), ("fifo.json", "a FIFO"), ("/dev/null", "a device")):
        one_line_error(run("export", "--study", study, "-o", path), f"{path} is {kind}", "pass another path")
    one_line_error(run("export", "--study", study, "-o", "folder.json"), "folder.json")
    (tmp_path / "afile").write_text("x")
    one_line_error(run("export", "--study", study, "-o", "afile/best.json"), "cannot write afile/best.json")
    assert target.read_text() == "keep me" and (tmp_path / "link.json").is_symlink()
    assert run("export", "--study", study, "-o", "out/best.json").exit_code == 0  # folders are made
    assert json.loads((tmp_path / "out" / "best.json").read_text())["source"]["study"] == study


@pytest.mark.parametrize("name, why", [("../outside", "not allowed"), ("a" * 300, "not allowed"),
                                       ("", "not allowed"), (".hidden", "not starting with '.'"),
                                       ("spaces in name", "not allowed")])
def test_study_names_stay_inside_their_folder(run, tmp_path, tiny_model_dir, name, why):
    one_line_error(run(*tiny_search(tiny_model_dir, "--study", name)), "--study: study name", why)
    assert not (tmp_path / "studies").exists() and not list(tmp_path.parent.glob("outside*"))


# --- bounds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, says", [
    ("--nfe", 1_000_000_000, "1<=x<=1000"), ("--batch", 0, "1<=x"), ("--threads", -1, "0<=x"),
    ("--trials", 0, "1<=x"), ("--timeout", -5, "x>0"), ("--seed", -5, "0<=x"), ("--workers", 0, "1<=x"),
    ("--n", 1, "2<=x"), ("--rho-min", 0, "0<x<=4"), ("--rho-max", 9, "0<x<=4"), ("--knots", 1, "2<=x"),
    ("--heartbeat", -1, "0<=x"), ("--search-seed", -1, "0<=x"), ("--guidance", 0.5, "1<=x"),
])
def test_every_numeric_option_is_bounded_before_any_work(run, tmp_path, tiny_model_dir, option, value, says):
    start = time.perf_counter()
    one_line_error(run(*tiny_search(tiny_model_dir, option, value)), f"Invalid value for '{option}'", says,
                   "skiptune-search search --help")
    assert not (tmp_path / "studies").exists()


# --- reference statistics -----------------------------------------------------------------------
@pytest.mark.parametrize("mu, sigma, says", [
    (np.zeros(1280), np.eye(1279), "do not fit together"),
    (np.full(1280, np.nan), np.eye(1280), "NaN or inf"),
    (np.zeros(64), np.eye(64), "holds 64-d statistics, but efficientnet-lite0 features are 1280-d"),
    (np.zeros(1280) + 1j, np.eye(1280), "mu is complex128 (1280,), not real numbers"),  # a cast dropped the 1j
    (np.zeros(1280, dtype=bool), np.eye(1280), "not real numbers"),
    (np.full(1280, 1e300), np.eye(1280), "beyond 1e+08"),  # FID overflowed: a traceback
    (np.zeros(1280), np.eye(1280) * 1e300, "beyond 1e+08"),  # a FID of 1e303 printed
])
def test_reference_statistics_are_checked_before_sampling(run, tmp_path, tiny_model_dir, monkeypatch, mu, sigma, says):
    from skiptune_search.scoring.evaluator import Evaluator

    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    monkeypatch.setattr(Evaluator, "_batches", lambda *a, **k: pytest.fail("sampled before checking"))
    one_line_error(run(*tiny_search(tiny_model_dir, "--reference", "ref.npz")), "--reference" if "d statistics" in says
                   else "ref.npz", says)
    assert not (tmp_path / "studies").exists()


# --- storage and files --------------------------------------------------------------------------
def test_a_corrupt_study_file_is_one_line(run, tmp_path, tiny_model_dir):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "skiptune.db").write_bytes(b"this is not a database" * 100)
    one_line_error(run("studies"), "cannot open storage")
    one_line_error(run(*tiny_search(tiny_model_dir)), "cannot open storage")


def test_a_model_folder_with_a_damaged_record_is_one_line(run, tmp_path, tiny_model_dir):
    info = json.loads((tiny_model_dir / "skiptune_model.json").read_text())
    del info["sigma_data"]
    (tiny_model_dir / "skiptune_model.json").write_text(json.dumps(info))
    one_line_error(run("inspect", "--model", tiny_model_dir), "key 'sigma_data' is missing")
    (tiny_model_dir / "skiptune_model.json").write_text("{not json")
    one_line_error(run("inspect", "--model", tiny_model_dir), "is not valid JSON")
    (tiny_model_dir / "skiptune_model.json").write_text(json.dumps({**info, "sigma_data": 0.5, "precond": "vp"}))
    one_line_error(run("inspect", "--model", tiny_model_dir), "--model: ", "precond 'vp' is not 'edm'",
                   "write the folder again")
    (tiny_model_dir / "skiptune_model.json").write_text(json.dumps({**info, "sigma_data": 0.5}))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**config, "norm_num_groups": 0}))  # diffusers: modulo by 0
    one_line_error(run("inspect", "--model", tiny_model_dir), "--model: could not load", "write the folder again")


def test_a_schedule_path_that_cannot_be_read_is_one_line(run, tmp_path):
    os.symlink(tmp_path / "loop.json", tmp_path / "loop.json")
    deep = "/".join(["d"] * 2000) + "/s.json"
    for path in ("loop.json", deep, "missing.json"):
        result = run("sample", "--schedule", path, "-o", "g.png")
        one_line_error(result)
        assert "schedule" in result.output


def test_a_damaged_page_inside_a_study_file_is_one_line(run, tmp_path, tiny_model_dir):
    assert run(*tiny_search(tiny_model_dir, "--trials", 2)).exit_code == 0
    path = tmp_path / "studies" / "skiptune.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
        page = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    data = bytearray(path.read_bytes())
    for p in range(1, pages):  # every page but the header's: the schema reads, the tables do not
        data[p * page:(p + 1) * page] = b"\xff" * page
    path.write_bytes(bytes(data))
    for args in (["studies"], ["export", "--study", "tiny-model-heun-nfe3-linear-input", "-o", "b.json"],
                 tiny_search(tiny_model_dir, "--trials", 3)):
        result = run(*args)
        one_line_error(result, "--storage: ")
        assert "storage" in result.output
    assert not (tmp_path / "b.json").exists()


def test_a_full_disk_during_a_trial_is_one_line_and_the_run_resumes(run, tmp_path, tiny_model_dir, monkeypatch):
    import errno

    from skiptune_search.search import objective

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "studies/artifacts/x.png")

    with monkeypatch.context() as m:
        m.setattr(objective.Objective, "_upload_grid", disk_full)
        result = run(*tiny_search(tiny_model_dir, "--trials", 2))
    ends_in_one_line_error(result, "the disk is full", "run the same command again")
    assert "RUNNING" not in _states(tmp_path)
    again = run(*tiny_search(tiny_model_dir, "--trials", 2))
    assert again.exit_code == 0 and "baseline FID (ρ = 1): " in again.output


def test_a_dashboard_port_in_use_is_one_line(run, tmp_path, tiny_model_dir):
    import socket

    assert run(*tiny_search(tiny_model_dir, "--trials", 1)).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(run("dashboard", "--port", port), f"--port: cannot serve on 127.0.0.1:{port}")
    for host in ("::1", "no such host;x"):  # the server is IPv4 only: the host is named, not the port
        one_line_error(run("dashboard", "--host", host), f"--host: cannot serve on '{host}'", "give an IPv4 address")


# --- issue 29, class 1: no output is one of the run's own files or inputs -------------------------
def _tree(root: Path) -> dict:
    """Every entry under ``root``: a regular file's bytes, a link's target, else its kind (a FIFO is
    never opened)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir" if path.is_dir() else "special"
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A folder holding a tiny model 'M', a finished one-trial study, its exported schedule, a
    config file naming the model, reference statistics and a Fashion-MNIST-shaped data folder."""
    from conftest import write_idx
    from diffusers import UNet2DModel

    from skiptune_search.models.loaders import FASHION_MNIST, save_model_dir

    root = tmp_path_factory.mktemp("own-files")
    torch_seed = __import__("torch").manual_seed(0)  # noqa: F841
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    save_model_dir(unet, root / "M", training={"steps": 0}, dataset=FASHION_MNIST)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        runner = CliRunner()
        result = runner.invoke(main, [str(a) for a in tiny_search("M", "--trials", 1, "--out", "s.json")],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    (root / "c.toml").write_text('model = "M"\nnfe = 3\nn = 4\nrungs = "4"\nbatch = 4\ntrials = 1\n')
    np.savez(root / "ref.npz", mu=np.zeros(1280), sigma=np.eye(1280))
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "data" / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    write_idx(root / "data" / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (8,)))
    (root / "victim.pt").write_bytes(b"someone else's file")
    return root


STUDY = "M-heun-nfe3-linear-input"
OWN_OUTPUTS = {  # the command, and what its refusal names
    "export over the study's database": (["export", "--study", STUDY, "-o", "studies/skiptune.db"], "study storage"),
    "export over its WAL": (["export", "--study", STUDY, "-o", "studies/skiptune.db-wal"], "study storage"),
    "export over a hard link to it": (["export", "--study", STUDY, "-o", "hard.json"], "study storage"),
    "report over its journal": (["report", "--study", STUDY, "--samples", 0, "-o", "studies/skiptune.db-journal"],
                                "study storage"),
    "sample over the weights": (["sample", "--model", "M", "-n", 2, "-o", "M/diffusion_pytorch_model.safetensors"],
                                "model folder"),
    "sample over the schedule it reads": (["sample", "--schedule", "s.json", "-n", 2, "-o", "s.json"], "schedule file"),
    "search over the config it reads": (["search", "--config", "c.toml", "--out", "c.toml"], "config file"),
    "search over the database": (["search", "--config", "c.toml", "--out", "studies/skiptune.db"], "study storage"),
    "search over its reference": (["search", "--config", "c.toml", "--reference", "ref.npz", "--out", "ref.npz"],
                                  "the reference"),
    "search over the model's config": (["search", "--config", "c.toml", "--out", "M/config.json"], "model folder"),
    "reference-stats over its data": (["reference-stats", "--data-dir", "data", "-o",
                                       "data/t10k-images-idx3-ubyte.gz"], "data folder"),
    "sample over the default storage it does not read": (["sample", "--model", "M", "-n", 2, "-o",
                                                          "studies/skiptune.db"], "study storage"),
    "export over another study storage": (["export", "--study", STUDY, "-o", "other.db"], "SQLite database"),
    "report over a model folder it does not read": (["report", "--study", STUDY, "--samples", 0, "-o", "M/config.json"],
                                                    "model folder"),
    "bench over a result it will write under a new --work": (["bench", "--quick", "--model", "M", "--nfe", 3,
                                                              "--tables", 1, "--work", "W", "--out", "W/table1.json"],
                                                             "results folder"),
    "train-default's state through a link": (["train-default", "--steps", 0, "--out", "M2", "--state", "link.pt",
                                              "--data-dir", "data"], "symbolic link"),
    "train-default's state inside the model it rewrites": (["train-default", "--steps", 0, "--out", "M", "--state",
                                                            "M/state.pt", "--data-dir", "data"], "model folder"),
}


@pytest.mark.parametrize("case", list(OWN_OUTPUTS))
def test_no_output_is_one_of_the_runs_own_files(searched, tmp_path, monkeypatch, case):
    work = tmp_path / "w"
    shutil.copytree(searched, work, symlinks=True)
    os.symlink(work / "victim.pt", work / "link.pt")
    os.link(work / "studies" / "skiptune.db", work / "hard.json")
    shutil.copy(work / "studies" / "skiptune.db", work / "other.db")
    monkeypatch.chdir(work)
    monkeypatch.setattr("skiptune_search.scoring.evaluator.Evaluator.__init__",
                        lambda *a, **k: pytest.fail("work started before the output was checked"))
    args, says = OWN_OUTPUTS[case]
    before = _tree(work)
    one_line_error(CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False), says,
                   "pass another")
    assert _tree(work) == before


@pytest.mark.parametrize("planted", ["MODEL_CARD.md", "samples.png"])
def test_model_card_checks_its_outputs_before_sampling(searched, tmp_path, monkeypatch, planted):
    """A link planted where the card goes was found only after minutes of sampling (samples.png
    already replaced when MODEL_CARD.md was the link)."""
    work = tmp_path / "w"
    shutil.copytree(searched, work, symlinks=True)
    os.symlink(work / "victim.pt", work / "M" / planted)
    monkeypatch.chdir(work)
    monkeypatch.setattr("skiptune_search.scoring.evaluator.Evaluator.__init__",
                        lambda *a, **k: pytest.fail("sampled before the outputs were checked"))
    before = _tree(work)
    one_line_error(CliRunner().invoke(main, ["model-card", "--model", "M"], catch_exceptions=False),
                   f"--model: M/{planted} is a symbolic link", "remove it")
    assert _tree(work) == before


def test_tune_checks_its_output_before_any_work(tmp_path):
    from skiptune_search.core.errors import OutputPathError
    from skiptune_search.search.tune import tune

    (tmp_path / "ref.npz").write_bytes(b"statistics")
    net, sample = torch.nn.Linear(1, 1), lambda seeds: None  # checked for their types only: never called
    with pytest.raises(OutputPathError, match="is the reference"):
        tune(net, sample, name="x", reference=str(tmp_path / "ref.npz"), out=tmp_path / "ref.npz")
    with pytest.raises(OutputPathError, match="study storage"):
        tune(net, sample, name="x", reference="bundled", storage=f"sqlite:///{tmp_path}/s.db", out=f"{tmp_path}/s.db-wal")
    assert _tree(tmp_path) == {"ref.npz": b"statistics"}


# --- issue 29, class 6: every file read is bounded and typed before use ---------------------------
def _edit_json(path, edit):
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def _png(path, size, mode="L"):
    from PIL import Image

    Image.new(mode, size).save(path)


def _reference_folder(*images):
    Path("imgs").mkdir()
    for i, make in enumerate(images):
        make(Path("imgs") / f"{i}.png")


def _npz_bomb():
    """An .npz whose mu.npy header declares a terabyte: numpy would allocate it before reading."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 37,)})
    with zipfile.ZipFile("bomb.npz", "w") as z:
        z.writestr("mu.npy", header.getvalue())
        z.writestr("sigma.npy", header.getvalue())


class Payload:
    """What a pickled .bin may hold besides tensors: unpickling it would build this object."""


def _pickled_text_encoder():
    import torch

    os.unlink("sd/text_encoder/model.safetensors")
    torch.save({"text_model.embeddings.position_ids": Payload()}, "sd/text_encoder/pytorch_model.bin")


SAMPLE = ["sample", "-n", 2, "-o", "g.png", "--schedule", "s.json"]
SD_SAMPLE = ["sample", "--model", "sd", "--sampler", "dpmsolver", "--nfe", 2, "--prompts", "p.txt", "-n", 2,
             "-o", "g.png"]
SEARCH = ["search", "--config", "c.toml"]
HOSTILE_INPUTS = {  # (what to do to the files, the command, what its one line says)
    "a FIFO as the schedule": (lambda: os.mkfifo("s.json.fifo"), [*SAMPLE[:-1], "s.json.fifo"], "is a FIFO"),
    "/dev/zero as the schedule": (None, [*SAMPLE[:-1], "/dev/zero"], "is a device"),
    "/dev/urandom as the config": (None, ["search", "--config", "/dev/urandom"], "is a device"),
    "a folder as the config": (lambda: os.mkdir("cfg.toml"), ["search", "--config", "cfg.toml"], "is a directory"),
    "a 100,000-deep schedule": (lambda: Path("s.json").write_text("[" * 100_000 + "]" * 100_000), SAMPLE,
                                "nested more than"),
    "a duplicate rho key": (lambda: Path("s.json").write_text(Path("s.json").read_text().replace(
        '"rho":', '"rho": [[1.0]], "rho":', 1)), SAMPLE, "key 'rho' appears twice"),
    "tuned_for.nfe a word": (lambda: _edit_json("s.json", lambda d: d["tuned_for"].update(nfe="nine")), SAMPLE,
                             "tuned_for.nfe must be a whole number in [1, 1000]"),
    "tuned_for.nfe over the CLI's bound": (lambda: _edit_json("s.json", lambda d: d["tuned_for"].update(nfe=100000001)),
                                           SAMPLE, "tuned_for.nfe must be a whole number in [1, 1000]"),
    "tuned_for.model a number": (lambda: _edit_json("s.json", lambda d: d["tuned_for"].update(model=123)), SAMPLE,
                                 "tuned_for.model must be a string"),
    "metric.seeds malformed": (lambda: _edit_json("s.json", lambda d: d["metric"].update(seeds="a-b")),
                               ["evaluate", "--schedule", "s.json", "--n", 4], "metric.seeds must be 'FIRST-LAST'"),
    "a NaN in the schedule": (lambda: Path("s.json").write_text(Path("s.json").read_text().replace(
        '"value":', '"value": NaN, "x":', 1)), SAMPLE, "holds NaN"),
    "a config key given twice": (lambda: Path("c.toml").write_text("nfe = 3\nnfe = 5\n"), SEARCH, "not valid TOML"),
    "a covariance -I": (lambda: np.savez("neg.npz", mu=np.zeros(1280), sigma=-np.eye(1280)),
                        [*SEARCH, "--reference", "neg.npz"], "negative eigenvalues"),
    "an asymmetric covariance": (lambda: np.savez("asym.npz", mu=np.zeros(1280), sigma=np.eye(1280) + np.triu(
        np.ones((1280, 1280)), 1)), [*SEARCH, "--reference", "asym.npz"], "not symmetric"),
    "an .npz declaring a terabyte": (_npz_bomb, [*SEARCH, "--reference", "bomb.npz"], "declares"),
    "a broken reference image": (lambda: _reference_folder(lambda p: _png(p, (8, 8)), lambda p: p.write_bytes(
        b"\x89PNG\r\n\x1a\n broken")), [*SEARCH, "--reference", "imgs"], "cannot be decoded"),
    "a huge reference image": (lambda: _reference_folder(lambda p: _png(p, (8, 8)), lambda p: _png(p, (5000, 5000), "1")),
                               [*SEARCH, "--reference", "imgs"], "resize the images first"),
    "a single reference image": (lambda: _reference_folder(lambda p: _png(p, (8, 8))), [*SEARCH, "--reference", "imgs"],
                                 "need at least 2"),
    "sigma_data 0 in the model folder": (lambda: _edit_json("M/skiptune_model.json", lambda d: d.update(sigma_data=0)),
                                         ["inspect", "--model", "M"], "sigma_data = 0 must be positive"),
    "a config.json that is not the record's network": (lambda: _edit_json("M/config.json", lambda d: d.update(
        sample_size=64)), ["inspect", "--model", "M"], "does not match the model record"),
    "a pipeline's pickled text encoder": (_pickled_text_encoder, SD_SAMPLE, "holds a pickled .bin"),
    "a pipeline's UNet config that lies about shapes": (
        lambda: _edit_json("sd/unet/config.json", lambda d: d.update(block_out_channels=[
            2 * c for c in d["block_out_channels"]])), ["inspect", "--model", "sd"], "does not match its weights"),
    "a FIFO among a pipeline's files": (lambda: (os.unlink("sd/unet/config.json"), os.mkfifo("sd/unet/config.json")),
                                        ["inspect", "--model", "sd"], "is a FIFO"),
    "a FIFO among the data files": (lambda: (os.unlink("data/t10k-images-idx3-ubyte.gz"),
                                             os.mkfifo("data/t10k-images-idx3-ubyte.gz")),
                                    ["reference-stats", "--data-dir", "data", "-o", "r.npz"], "is a FIFO"),
}


@pytest.mark.parametrize("case", list(HOSTILE_INPUTS))
def test_every_file_read_is_bounded_and_typed(searched, tmp_path, monkeypatch, request, case):
    work = tmp_path / "w"
    shutil.copytree(searched, work, symlinks=True)
    if "pipeline" in case:  # a tiny Stable Diffusion pipeline, and prompts for it
        shutil.copytree(request.getfixturevalue("tiny_sd_dir"), work / "sd")
        (work / "p.txt").write_text("a cat\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr("skiptune_search.scoring.evaluator.Evaluator._batches",
                        lambda *a, **k: pytest.fail("sampled before its inputs were checked"))
    setup, args, says = HOSTILE_INPUTS[case]
    if setup:
        setup()
    before = _tree(work)
    one_line_error(CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False), says)
    assert _tree(work) == before
