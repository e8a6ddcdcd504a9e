"""The installed console script on the bundled model and assets, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _cli():
    """The console script that `pip install -e .` put beside this interpreter."""
    exe = Path(sys.executable).parent / "skiptune-search"
    assert exe.is_file(), f"{exe} missing: install the project with pip install -e '.[dev]'"
    return [str(exe)]


def test_search_on_the_bundled_model(tmp_path):
    cmd = _cli() + ["search", "--nfe", "3", "--n", "16", "--trials", "2", "--batch", "8", "--threads", "1"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "study 'fashion-mnist-edm-heun-nfe3-linear-input'" in result.stdout
    # trial numbers are Optuna's, from 0, as the dashboard shows them: the baseline is trial 0
    assert any(line.startswith("trial 0: FID") and line.endswith("]") and "(baseline)" in line
               for line in result.stdout.splitlines()), result.stdout
    assert "best FID:" in result.stdout
    assert "trial 1/2" in result.stderr  # the per-trial progress bar
    best = json.loads((tmp_path / "studies" / "fashion-mnist-edm-heun-nfe3-linear-input.best.json").read_text())
    assert len(best["skips"]) == 9 and best["tuned_for"]["model"] == "fashion-mnist-edm"


@pytest.mark.slow
def test_default_search_command(tmp_path):
    """README command 1's search exactly as shipped (about 15 minutes on 2 cores)."""
    result = subprocess.run(_cli() + ["search"], cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("baseline FID (ρ = 1):", "best FID:", "best ρ (outer→inner):", "best schedule:"):
        assert line in result.stdout


def test_shipped_schedules_apply_to_their_model():
    """Every schedule in configs/schedules loads, validates and fits the bundled model's layout."""
    import torch

    from skiptune_search import apply, load_schedule
    from skiptune_search.models.source import load_denoiser

    denoiser, _ = load_denoiser("fashion-mnist-edm")
    files = sorted((Path(__file__).parent.parent / "configs" / "schedules").glob("*.json"))
    assert files
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = denoiser(x, torch.tensor([2.0, 2.0]))
        for path in files:
            schedule = load_schedule(path)
            assert schedule.tuned_for["model"] == "fashion-mnist-edm"
            with apply(denoiser, path):
                assert not torch.equal(denoiser(x, torch.tensor([2.0, 2.0])), plain)
