"""Extending the tool from outside the package: docs/extending.md's recipes, run."""

import json

import optuna
import pytest
import torch
from click.testing import CliRunner

from cli_helpers import one_line_error
from skiptune_search.bundled import FASHION_MNIST
from skiptune_search.cli import main
from skiptune_search.core.errors import InputError, ModelLoadError
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.models.source import ModelKind, ModelSource, known_checkouts, model_kinds, \
    register_model_kind, unregister_model_kind
from skiptune_search.search.tune import run


class ToyKind(ModelKind):
    """Models named 'toy:SEED': a tiny random UNet in EDM's preconditioning, built here."""

    name, what = "toy", "toy:SEED (a test's toy model)"
    checkouts = {"toy": "Toy"}  # the code base its loader may run: --checkout toy=PATH

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


def cli(*args):
    """The command line in-process, so that it sees the kinds registered here."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_kind_s_checkout_comes_from_the_command_line(toy_kind, tmp_path, monkeypatch):
    """A kind that declares a checkout gets it from --checkout NAME=PATH, with no option of its
    own: its loader sees the folder, a worker's job carries it, and the output guard keeps every
    output out of it (refused before the model loads)."""
    monkeypatch.chdir(tmp_path)
    code = tmp_path / "toy-code"
    code.mkdir()
    assert known_checkouts() == {"edm": "EDM", "toy": "Toy", "uvit": "U-ViT"}
    result = cli("inspect", "--model", "toy:0", "--checkout", f"toy={code}")
    assert result.exit_code == 0 and "long skips" in result.output, result.output
    [source] = toy_kind.loaded
    assert source.checkout("toy") == str(code) and source.checkouts == {"toy": str(code)}
    assert ModelSource.from_dict(json.loads(json.dumps(source.to_dict()))) == source  # a worker's job, as JSON
    assert ("the Toy checkout", str(code)) in source.inputs()
    one_line_error(cli("sample", "--model", "toy:0", "--checkout", f"toy={code}", "-n", 2, "-o", code / "grid.png"),
                   "--out: ", "is inside the Toy checkout")
    assert len(toy_kind.loaded) == 1 and not (code / "grid.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--checkout", "toy"], "--checkout': 'toy' is not NAME=PATH: give the code base's name and its folder, e.g. "),
    (["--checkout", "=code"], "'=code' is not NAME=PATH"),
    (["--checkout", "toy="], "'toy=' is not NAME=PATH"),
    (["--checkout", "dit=code"], "'dit' is not a checkout a model kind runs: name one of edm, toy, uvit"),
    (["--edm-path", "a", "--checkout", "edm=b"], "two checkouts of edm: --edm-path a and --checkout edm=b; give one"),
    (["--checkout", "toy=a", "--checkout", "toy=b"], "two checkouts of toy: --checkout toy=a and --checkout toy=b"),
])
def test_a_bad_checkout_is_one_line(toy_kind, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("inspect", "--model", "toy:0", *args), message)
    assert toy_kind.loaded == []


def test_a_checkout_never_comes_from_a_config_file(toy_kind, tmp_path, monkeypatch):
    """--checkout runs code, as --edm-path does: a config file that gives it is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text('model = "toy:0"\ncheckout = "toy=code"\n')
    one_line_error(cli("search", "--config", "c.toml"), "key 'checkout' is not allowed in a config file",
                   "pass --checkout on the command line")
    assert toy_kind.loaded == []


def test_a_kind_s_checkouts_are_known_while_it_is_registered(tiny_unet):
    """Registering a kind makes its checkout names known (and unregistering forgets them); a kind
    whose checkouts are not a mapping of names to what messages call them is refused."""

    class DiT(ToyKind):
        name, checkouts = "dit", {"dit": "DiT"}

    assert "dit" not in known_checkouts()
    register_model_kind(DiT(lambda: tiny_unet))
    try:
        assert known_checkouts()["dit"] == "DiT"
    finally:
        unregister_model_kind("dit")
    assert "dit" not in known_checkouts()
    for checkouts in ({"a=b": "A"}, {"": "A"}, {"a": ""}, ["a"]):
        DiT.checkouts = checkouts
        with pytest.raises(InputError, match="^model kind 'dit': checkouts = .* is not a mapping of code base names"):
            register_model_kind(DiT(lambda: tiny_unet))
        assert "dit" not in model_kinds()
