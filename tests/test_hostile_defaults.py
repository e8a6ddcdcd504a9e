"""Hostile input, round 3 (issue 29): no default that fits only the bundled model is used for
another model; every number is finite and bounded; the Python API checks its arguments as the
command line does. Each refusal is one line (one InputError from Python), exit code 2, and writes
nothing."""

import math
import os

import click
import pytest
import torch

from cli_helpers import one_line_error
from skiptune_search.core.errors import InputError, SkiptuneError
from skiptune_search.models.denoisers import EDMPrecond
from skiptune_search.models.loaders import save_model_dir
from skiptune_search.search.tune import tune


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- class 5: the bundled defaults serve only the bundled kind of model ----------------------------
def test_the_bundled_reference_serves_only_models_trained_on_fashion_mnist(run, tmp_path, tiny_unet, tiny_sd_dir,
                                                                           prompt_file):
    from skiptune_search.core.controller import SkipController

    other = tmp_path / "cifar-model"  # a train-default-style folder whose record names another data set
    save_model_dir(tiny_unet, other, training={"steps": 0}, dataset="cifar10")
    SkipController(EDMPrecond(tiny_unet)).identity().save(tmp_path / "s.json")
    before = files_under(tmp_path)
    says = "--reference: the bundled reference (Fashion-MNIST statistics) fits only a model trained on Fashion-MNIST"
    tiny = ("--n", 4, "--rungs", 4, "--batch", 4)
    one_line_error(run("search", "--model", other, "--nfe", 3, *tiny), says, "its record says 'cifar10'",
                   "skiptune-search reference-stats", "folder of real images", "configs/coco_prepare.py")
    one_line_error(run("evaluate", "--schedule", "s.json", "--model", other, "--nfe", 3, "--n", 4, "--blocks", 2), says)
    # a text-to-image pipeline: no record at all; and without --sampler it is its own scheduler that samples
    one_line_error(run("search", "--model", tiny_sd_dir, "--prompts", prompt_file, "--nfe", 3, *tiny), says,
                   "nothing says it was trained on Fashion-MNIST")
    net = EDMPrecond(tiny_unet)
    with pytest.raises(SkiptuneError, match=r"bundled reference \(Fashion-MNIST statistics\) fits only") as info:
        tune(net, lambda seeds: torch.zeros(len(seeds), 1, 16, 16, dtype=torch.uint8), name="mine",
             reference="bundled", trials=1, n=4, storage=f"sqlite:///{tmp_path}/t.db", progress=False)
    assert info.value.option == "reference" and "\n" not in str(info.value)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())  # the model is left unhooked
    assert files_under(tmp_path) == before  # no study, no cache, no file
    result = run("sample", "--model", tiny_sd_dir, "--prompts", prompt_file, "--nfe", 3, "-n", 1, "-o", "g.png")
    assert result.exit_code == 0 and "pndm NFE 3" in result.output, result.output  # tiny-sd's PNDMScheduler


# --- class 7: numbers ------------------------------------------------------------------------------
def test_every_number_is_finite_and_bounded(run, tmp_path, tiny_model_dir):
    from skiptune_search.cli import main
    from skiptune_search.cli.common import Number, friendly

    before = files_under(tmp_path)
    floats = [(name, param) for name, command in main.commands.items() for param in command.params
              if isinstance(param.type, click.types.FloatParamType)]
    assert {("search", "rho_min"), ("search", "rho_max"), ("search", "timeout"), ("search", "guidance"),
            ("train-default", "lr"), ("evaluate", "guidance")} <= {(c, p.name) for c, p in floats}
    for command, param in floats:
        assert isinstance(param.type, Number), (command, param.name)  # one option type refuses NaN and ±inf
        for bad in ("nan", "inf", "-inf"):
            one_line_error(run(command, max(param.opts, key=len), bad), "is not a finite number")
    (tmp_path / "c.toml").write_text("rho_min = nan\n")  # TOML has nan and inf: a config file is refused alike
    one_line_error(run("search", "--config", "c.toml"), "key 'rho_min'", "is not a finite number")
    before.append("c.toml")
    one_line_error(run("search", "--model", tiny_model_dir, "--batch", 4097), "--batch", "4096")
    cores = len(os.sched_getaffinity(0))
    one_line_error(run("search", "--model", tiny_model_dir, "--workers", cores + 1),
                   f"--workers: {cores + 1} workers, but this machine has {cores} CPU core(s)", "use at most")
    one_line_error(run("search", "--model", tiny_model_dir, "--nfe", 1000),
                   "--nfe: NFE 1000 is impossible for heun; nearest valid: 997, 999")
    assert files_under(tmp_path) == sorted(before)

    @click.command()
    @click.option("--batch", type=int)
    @click.option("--n", "n", type=int)
    @friendly
    def greedy(batch, n):  # what a too-large batch meets: torch's CPU allocator failing
        torch.empty(1 << 55, dtype=torch.uint8)

    one_line_error(click.testing.CliRunner().invoke(greedy, []),
                   "out of memory (CPU): pass a smaller --batch (or a smaller --n)")


# --- class 8: the Python API -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, option", [
    (dict(trials=0), "trials"), (dict(nfe="abc"), "nfe"), (dict(rho_range=(2, 1)), "rho_range"),
    (dict(rho_range=(0.5, math.nan)), "rho_range"), (dict(n=math.nan), "n"), (dict(seed=-1), "seed"),
    (dict(sigma_range=(math.inf, 80.0)), "sigma_range"), (dict(knots=2.5), "knots"), (dict(family=None), "family"),
    (dict(batch_size=True), "batch_size"), (dict(name="../x"), "name"), (dict(rungs=(2, "4")), "rungs"),
    (dict(reference=None), "reference"), (dict(timestep_to_sigma="t"), "timestep_to_sigma"), (dict(rungs=[]), "rungs"),
])
def test_tune_checks_its_arguments_before_anything_is_written(tiny_unet, tmp_path, bundled_npz, bad, option):
    net = EDMPrecond(tiny_unet)
    args = {**dict(name="mine", reference=bundled_npz, trials=1, n=4, storage=f"sqlite:///{tmp_path}/t.db",
                   out=tmp_path / "best.json", progress=False), **bad}
    with pytest.raises(InputError) as info:
        tune(net, lambda seeds: torch.zeros(len(seeds), 1, 16, 16, dtype=torch.uint8), **args)
    assert info.value.option == option and str(info.value).startswith(option) and "\n" not in str(info.value)
    assert files_under(tmp_path) == []  # no study, no schedule
