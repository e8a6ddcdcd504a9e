"""Your own model and sampling loop from Python: the same study, rungs, pruning, export and
artifacts as the CLI's search."""

import json

import optuna
import pytest
import torch

from skiptune_search import apply
from skiptune_search.core.errors import InputError
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.scoring.task import default_rungs
from skiptune_search.search.tune import tune


@pytest.fixture
def net(tiny_unet):
    return EDMPrecond(tiny_unet)


def euler_loop(net):
    def sample(seeds):  # a user's own loop: Euler on four σ, sample i seeded by seeds[i] alone
        x = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 80
        sigmas = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * (x - net(x, s)) / s
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)

    return sample


def test_tune_a_model_of_your_own_with_your_own_loop(net, tmp_path, bundled_npz):
    url = f"sqlite:///{tmp_path}/s.db"
    best = tune(net, euler_loop(net), name="my-unet", reference=bundled_npz, trials=4, n=16, storage=url,
                out=tmp_path / "best.json", progress=False, batch_size=4)
    assert best.tuned_for["model"] == "my-unet" and best.source["study"] == "my-unet-linear-input"
    assert json.loads((tmp_path / "best.json").read_text())["rho"] == best.rho
    study = optuna.load_study(study_name="my-unet-linear-input", storage=url)
    assert len(study.trials) == 4 and study.trials[0].user_attrs["baseline"]
    assert list(study.trials[0].intermediate_values) == list(default_rungs(16)) == [2, 16]  # rungs N/8, N
    assert study.trials[0].intermediate_values[16] == study.trials[0].value
    assert list((tmp_path / "artifacts").rglob("*")), "no sample grid uploaded for the dashboard"
    # the baseline trial scored the untouched model: the same images with the hooks at ρ = 1
    again = tune(net, euler_loop(net), name="my-unet", reference=bundled_npz, trials=4, n=16, storage=url,
                 progress=False, batch_size=4)
    assert len(optuna.load_study(study_name="my-unet-linear-input", storage=url).trials) == 4  # resumed, no new trial
    assert again.rho == best.rho
    with apply(net, best):
        tuned = euler_loop(net)([0, 1])
    assert torch.equal(tuned, euler_loop(net)([0, 1])) == best.is_identity()


def test_what_your_loop_returns_is_checked(net, tmp_path, bundled_npz):
    def floats(seeds):
        return torch.zeros(len(seeds), 1, 16, 16)

    with pytest.raises(InputError, match=r"sample\(seeds\) returned torch.float32 \[1, 1, 16, 16\] for 1 seeds"):
        tune(net, floats, name="bad", reference=bundled_npz, trials=1, n=4, storage=f"sqlite:///{tmp_path}/s.db",
             progress=False)
    assert not (tmp_path / "s.db").exists()  # refused before any study was written
    with pytest.raises(InputError, match="σ range your sampler visits") as info:
        tune(net, euler_loop(net), name="noise", reference=bundled_npz, family="per_noise", trials=1, n=4,
             storage=f"sqlite:///{tmp_path}/s.db", progress=False)
    assert info.value.option == "sigma_range"


def test_freeu_from_python_needs_the_sigma_map_only_with_its_window(tiny_unet, tmp_path, bundled_npz):
    """A bare UNet called with timesteps: FreeU at every σ needs neither σ range nor timestep map;
    with its σ window the missing map is a one-line error before any study is written."""
    def sample(seeds):  # a loop over the UNet's own timesteps
        x = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
        for t in (900, 500, 100):
            x = x - 0.3 * tiny_unet(x, t).sample
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)

    url = f"sqlite:///{tmp_path}/s.db"
    with pytest.raises(InputError, match="no timestep_to_sigma was given") as info:
        tune(tiny_unet, sample, name="bare", reference=bundled_npz, family="freeu", sigma_range=(0.1, 80.0), trials=2,
             n=4, storage=url, progress=False)
    assert info.value.option == "family" and "\n" not in str(info.value)
    assert not (tmp_path / "s.db").exists() or optuna.get_all_study_summaries(url) == []
    best = tune(tiny_unet, sample, name="bare", reference=bundled_npz, family="freeu", freeu_window=False, trials=2,
                n=4, storage=url, progress=False, batch_size=4)
    assert best.source["study"] == "bare-freeu-allsteps-input" and best.freeu is not None and best.freeu.window is None
    study = optuna.load_study(study_name="bare-freeu-allsteps-input", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2  # baseline, preset
    with apply(tiny_unet, best):
        tuned = sample([0, 1])
    assert torch.equal(tuned, sample([0, 1])) == best.is_identity()
