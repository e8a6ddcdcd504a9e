"""optuna-dashboard on a real study, opened in headless Chromium: the study and a trial's grid show."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from skiptune_search.cli import main

CHROMIUM = shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_shows_study_and_trial_grid(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--model", str(tiny_model_dir), "--nfe", "3", "--n", "8",
                                       "--rungs", "8", "--trials", "2", "--batch", "8"])
    assert result.exit_code == 0, result.output
    port = _free_port()
    exe = Path(sys.executable).parent / "skiptune-search"
    server = subprocess.Popen([str(exe), "dashboard", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                studies = json.loads(_get(f"{base}/api/studies"))
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("dashboard did not start")
        study_id = studies["study_summaries"][0]["study_id"]
        trial = json.loads(_get(f"{base}/api/studies/{study_id}"))["trials"][0]
        artifact = trial["artifacts"][0]
        assert artifact["mimetype"] == "image/png"
        # one numbering everywhere: the grid is named by the trial number the dashboard shows
        assert artifact["filename"] == f"trial-{trial['number']}-samples.png"
        png = _get(f"{base}/artifacts/{study_id}/{trial['trial_id']}/{artifact['artifact_id']}")
        assert png.startswith(b"\x89PNG")

        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", "--dump-dom",
             f"{base}/dashboard/studies/{study_id}/trials"],
            capture_output=True, text=True, timeout=120).stdout
        assert "tiny-model-heun-nfe3-linear-input" in dom
        assert f'src="/artifacts/{study_id}/{trial["trial_id"]}/{artifact["artifact_id"]}"' in dom
    finally:
        server.terminate()
        server.wait(timeout=10)
