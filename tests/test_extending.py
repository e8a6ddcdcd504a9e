"""Extending the tool from outside the package: docs/extending.md's recipes, run."""

import json

import optuna
import pytest
import torch

from skiptune_search.bundled import FASHION_MNIST
from skiptune_search.core.errors import InputError, ModelLoadError
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.models.source import ModelKind, ModelSource, model_kinds, register_model_kind, \
    unregister_model_kind
from skiptune_search.search.tune import run


class ToyKind(ModelKind):
    """Models named 'toy:SEED': a tiny random UNet in EDM's preconditioning, built here."""

    name, what = "toy", "toy:SEED (a test's toy model)"

    def __init__(self, make_unet):
        self.make_unet, self.loaded = make_unet, []

    def recognizes(self, source):
        return source.model.startswith("toy:")

    def inputs(self, source):
        return []  # reads no file

    def load(self, source):
        self.loaded.append(source)
        info = {"name": source.model, "resolution": 16, "channels": 1, "sigma_min": 0.002, "sigma_max": 80.0,
                "dataset": FASHION_MNIST}  # what the bundled reference needs to score it
        return EDMPrecond(self.make_unet()), info


@pytest.fixture
def toy_kind(tiny_unet):
    kind = register_model_kind(ToyKind(lambda: tiny_unet))
    yield kind
    unregister_model_kind("toy")


def test_a_toy_model_source(toy_kind, tmp_path):
    """A kind registered from this file alone is found by name and searched like a built-in one,
    through the library's one entry point of a search; worker processes, which do not know it,
    are refused in one line before any starts."""
    assert model_kinds()[0] == "toy" and "toy:SEED" in str(pytest.raises(ModelLoadError, ModelSource("nothing").load)
                                                            .value)
    url = f"sqlite:///{tmp_path}/s.db"
    lines = []
    result = run(dict(model="toy:0", nfe=3, n=4, rungs=(4,)), ModelSource("toy:0"), storage=url, trials=2,
                 batch_size=4, device="cpu", out=tmp_path / "best.json", say=lines.append, progress=False)
    assert [s.model for s in toy_kind.loaded] == ["toy:0"]  # loaded once, by the kind registered here
    assert result.study.study_name == "toy_0-heun-nfe3-linear-input" and result.out == tmp_path / "best.json"
    study = optuna.load_study(study_name=result.study.study_name, storage=url)
    assert len(study.trials) == 2 and study.trials[0].user_attrs["baseline"]
    assert json.loads((tmp_path / "best.json").read_text())["tuned_for"]["model"] == "toy:0"
    assert lines[0].startswith("study 'toy_0-heun-nfe3-linear-input' in ") and len(lines) == 3  # + 2 trial lines
    with pytest.raises(InputError, match=r"^model kind 'toy' was registered in this process, .*: use one worker$") \
            as error:
        ModelSource("toy:0").for_workers()
    assert error.value.option == "workers"
    assert ModelSource("fashion-mnist-edm").for_workers().kind == "folder"
