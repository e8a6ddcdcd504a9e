"""U-ViT (a stand-in with baofff/U-ViT's structure): the adapter, the controller on a skip that is
an argument of its own, and the loader from a checkout (state dict + the repo's config module)."""

import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from skiptune_search import RhoSchedule, ScheduleError, SkipController, apply
from skiptune_search.core.errors import ModelLoadError
from skiptune_search.models.source import load_denoiser
from skiptune_search.models.uvit import UViTPrecond
from skiptune_search.scoring.metrics import DEFAULT_REFERENCE
from test_placements import check_exact_and_unhooks
from uvit_standins import UViT


def tiny_uvit(num_classes=-1, use_checkpoint=False):
    torch.manual_seed(0)
    return UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=6, num_heads=2, num_classes=num_classes,
                use_checkpoint=use_checkpoint).eval()


def _call(net):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return lambda: net(x, torch.tensor([10.0, 700.0]))


def test_uvit_skips_pair_in_blocks_with_out_blocks_last_first():
    ctl = SkipController(tiny_uvit())
    assert ctl.arch == "UViT"
    assert [(s.name, s.consumer) for s in ctl.skips] == [
        ("in_blocks.0", "out_blocks.2"), ("in_blocks.1", "out_blocks.1"), ("in_blocks.2", "out_blocks.0")]
    assert {(s.channels, s.resolution) for s in ctl.skips} == {(16, 4)}  # embed_dim; a 4 x 4 token grid
    assert ctl.placements == ("input",)
    assert not any(r["normalization"] for r in ctl.groupnorm_report())


@torch.no_grad()
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_uvit_each_skip_argument_is_scaled_by_its_own_rho(use_checkpoint):
    """Skip i is the second argument of its out block: that argument alone is scaled, into a copy
    (the in block's output itself is left as it was), and the hidden tokens pass untouched."""
    net = tiny_uvit(use_checkpoint=use_checkpoint)
    call = _call(net)
    ctl = SkipController(net)
    for i, skip in enumerate(ctl.skips):
        produced, plain, tuned = [], [], []
        h1 = net.get_submodule(skip.name).register_forward_hook(lambda m, a, out: produced.append(out))
        h2 = net.get_submodule(skip.consumer).register_forward_pre_hook(lambda m, a: plain.append(a))
        call()
        h2.remove()
        rhos = [1.0] * len(ctl.skips)
        rhos[i] = 0.5
        with apply(net, RhoSchedule.constant(ctl.arch, ctl.skips, rhos)):
            h2 = net.get_submodule(skip.consumer).register_forward_pre_hook(lambda m, a: tuned.append(a))
            call()
            h2.remove()
        h1.remove()
        assert plain[0][1] is produced[0]  # U-ViT hands the in block's output over as it is
        assert torch.equal(tuned[0][0], plain[0][0])
        assert torch.equal(tuned[0][1], plain[0][1] * 0.5)
        assert torch.equal(produced[1], plain[0][1])  # the tuned call's in-block output: not scaled in place


@torch.no_grad()
def test_uvit_skip_passed_by_keyword():
    net = tiny_uvit()
    ctl = SkipController(net)
    block = net.out_blocks[0]
    x, s = torch.randn(2, 17, 16), torch.randn(2, 17, 16)
    expected, plain = block(x, s * 0.5), block(x, skip=s)
    with apply(net, RhoSchedule.constant(ctl.arch, ctl.skips, [1.0, 1.0, 0.5])):  # out_blocks.0 takes the deepest
        assert torch.equal(block(x, skip=s), expected)
        assert torch.equal(block(x, s), expected)
    assert torch.equal(block(x, skip=s), plain)


@torch.no_grad()
@pytest.mark.parametrize("num_classes", [-1, 5])
def test_uvit_rho_one_is_exact_and_unhooks(num_classes):
    net = tiny_uvit(num_classes)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0])
    y = torch.tensor([1, 4]) if num_classes > 0 else None
    check_exact_and_unhooks(net, lambda: net(x, t, y))


@torch.no_grad()
def test_uvit_sigma_dependent_schedule_per_sample():
    """The VP wrapper calls U-ViT at t·999; the controller maps that back to each sample's σ."""
    net = tiny_uvit()
    precond = UViTPrecond(net)
    ctl = SkipController(precond)
    params = {"rho_inner_k0": 0.5, "rho_outer_k0": 0.5, "rho_inner_k1": 1.5, "rho_outer_k1": 1.5}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    sigma = torch.tensor([0.01, 1.0, 50.0])
    x = torch.randn(3, 3, 8, 8)
    consumer = net.get_submodule(ctl.skips[-1].consumer)
    plain, tuned = [], []
    handle = consumer.register_forward_pre_hook(lambda m, a: plain.append(a[1]))
    precond(x, sigma)
    handle.remove()
    with apply(precond, schedule):
        handle = consumer.register_forward_pre_hook(lambda m, a: tuned.append(a[1]))
        precond(x, sigma)
        handle.remove()
    expected = torch.tensor([0.5, 1.0, 1.5]).reshape(-1, 1, 1)
    assert torch.allclose(tuned[0], plain[0] * expected, rtol=1e-4)


def test_uvit_vp_sigma_and_t_are_inverse():
    t = torch.tensor([1e-4, 1e-3, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(UViTPrecond.t_of_sigma(UViTPrecond.sigma_of_t(t)), t, rtol=1e-9)
    precond = UViTPrecond(tiny_uvit(), t_min=1e-3)
    assert precond.sigma_min == pytest.approx(0.010486, rel=1e-4) and precond.sigma_max == pytest.approx(152.0, rel=1e-2)


def test_uvit_normalized_placement_is_refused():
    ctl = SkipController(tiny_uvit())
    with pytest.raises(ScheduleError, match="UViT has no normalization at the decoder input"):
        ctl.use(RhoSchedule.constant(ctl.arch, ctl.skips, [0.9] * 3, placement="both"))


def test_uvit_published_layout():
    """U-ViT-S/2 of CIFAR-10 (configs/cifar10_uvit_small.py): depth 12, 512 wide, 16 x 16 tokens."""
    with torch.device("meta"):
        net = UViT(img_size=32, patch_size=2, embed_dim=512, depth=12, num_heads=8)
    skips = SkipController(net).skips
    assert len(skips) == 6 and {(s.channels, s.resolution) for s in skips} == {(512, 16)}


# --- the loader --------------------------------------------------------------------------------
CONFIG = '''\
"""A config in U-ViT's form (get_config() with nnet, train, sample), without ml_collections."""


class d(dict):
    def __init__(self, **kwargs):
        super().__init__(kwargs)

    __getattr__ = dict.__getitem__


def get_config():
    config = d(seed=1234, pred="noise_pred")
    config.update(
        train=d(mode="{mode}", batch_size=128),
        nnet=d(name="uvit", img_size=8, patch_size=2, embed_dim=16, depth=6, num_heads=2, mlp_ratio=4,
               qkv_bias=False, mlp_time_embed=False, num_classes={classes}, use_checkpoint=True),
        sample=d(sample_steps=50, algorithm="{algorithm}"),
        {extra}
    )
    return config
'''


@pytest.fixture
def uvit_checkout(tmp_path):
    """A stand-in checkout of baofff/U-ViT (libs/uvit.py = the stand-in, configs/*.py) and a
    checkpoint named after its config."""
    repo = tmp_path / "U-ViT"
    (repo / "libs").mkdir(parents=True)
    (repo / "configs").mkdir()
    (repo / "libs" / "__init__.py").write_text("")
    shutil.copy(Path(__file__).parent / "uvit_standins.py", repo / "libs" / "uvit.py")
    configs = {"tiny_uvit": dict(mode="uncond", classes=-1, algorithm="euler_maruyama_sde", extra=""),
               "tiny_uvit_cond": dict(mode="cond", classes=5, algorithm="dpm_solver", extra=""),
               "tiny_uvit_latent": dict(mode="cond", classes=5, algorithm="dpm_solver", extra="z_shape=(4, 4, 4),")}
    for name, values in configs.items():
        (repo / "configs" / f"{name}.py").write_text(CONFIG.format(**values))
    (repo / "configs" / "needs_a_package.py").write_text("import uvit_test_absent_package\n")
    torch.save(tiny_uvit().state_dict(), tmp_path / "tiny_uvit.pth")
    torch.save(tiny_uvit(5).state_dict(), tmp_path / "nnet_ema.pth")
    return repo


def test_uvit_checkpoint_from_a_checkout(uvit_checkout, tmp_path):
    denoiser, info = load_denoiser(str(tmp_path / "tiny_uvit.pth"), uvit_path=str(uvit_checkout))
    assert type(denoiser).__name__ == "UViTPrecond" and type(denoiser.net).__module__.endswith("libs.uvit")
    assert (info["resolution"], info["channels"], info["label_dim"], info["config"]) == (8, 3, 0, "tiny_uvit")
    assert info["sigma_min"] == pytest.approx(0.010486, rel=1e-4)  # Euler-Maruyama's t from 1e-3
    assert all(not block.use_checkpoint for block in denoiser.net.out_blocks)
    ref = tiny_uvit()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma), UViTPrecond(ref)(x, sigma))  # the checkpoint's weights
    assert len(SkipController(denoiser).skips) == 3
    denoiser, info = load_denoiser(str(tmp_path / "nnet_ema.pth"), uvit_path=str(uvit_checkout),
                                   uvit_config="tiny_uvit_cond")
    assert info["label_dim"] == 5 and info["sigma_min"] == pytest.approx(0.00317, rel=1e-2)  # dpm_solver: 1e-4
    seen = []
    handle = denoiser.net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["y"]), with_kwargs=True)
    with torch.no_grad():
        denoiser(x, sigma, class_labels=torch.eye(5)[[3, 1]])
    handle.remove()
    assert seen[0].tolist() == [3, 1]  # one-hot labels become U-ViT's class indices


@pytest.mark.parametrize("kwargs, option, message", [
    ({}, "uvit_path", "built from a checkout of baofff/U-ViT"),
    ({"uvit_path": "nowhere"}, "uvit_path", "nowhere is not a checkout of baofff/U-ViT"),
    ({"uvit_path": "REPO", "model": "nnet_ema.pth"}, "uvit_config", "no config named like the checkpoint ('nnet_ema')"),
    ({"uvit_path": "REPO", "uvit_config": "../x"}, "uvit_config", "config '../x' in"),
    ({"uvit_path": "REPO", "uvit_config": "tiny_uvit_latent"}, None, "is a latent-space model"),
    ({"uvit_path": "REPO", "uvit_config": "needs_a_package"}, None,
     "needs the package 'uvit_test_absent_package', which is not installed: pip install uvit_test_absent_package"),
    ({"uvit_path": "REPO", "model": "nnet_ema.pth", "uvit_config": "tiny_uvit"}, None, "does not load into the U-ViT"),
    ({"uvit_path": "REPO", "model": "missing.pth", "uvit_config": "tiny_uvit"}, "model", "missing.pth not found"),
    ({"uvit_path": "REPO", "model": "fashion-mnist-edm"}, "model", "a U-ViT checkpoint is a state dict (.pth)"),
])
def test_uvit_says_what_is_missing(uvit_checkout, tmp_path, monkeypatch, kwargs, option, message):
    monkeypatch.chdir(tmp_path)
    kwargs = {k: str(uvit_checkout) if v == "REPO" else v for k, v in kwargs.items()}
    model = kwargs.pop("model", "tiny_uvit.pth")
    with pytest.raises(ModelLoadError, match=None) as error:
        load_denoiser(model, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert error.value.option == option


def test_uvit_through_the_cli(uvit_checkout, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "--model", "tiny_uvit.pth"])
    assert result.exit_code == 2 and result.output.startswith("Error: --uvit-path: a U-ViT checkpoint is built")
    result = runner.invoke(main, ["inspect", "--model", "nnet_ema.pth", "--uvit-path", str(uvit_checkout)])
    assert result.exit_code == 2 and "Error: --uvit-config: no config named like" in result.output
    assert "tiny_uvit, tiny_uvit_cond" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["inspect", "--model", "tiny_uvit.pth", "--uvit-path", str(uvit_checkout)])
    assert result.exit_code == 0, result.output
    assert "UViT: 3 long skips" in result.output and "out_blocks.2" in result.output
    assert result.output.count("no normalization at the decoder input") == 3
    result = runner.invoke(main, ["sample", "--model", "nnet_ema.pth", "--uvit-path", str(uvit_checkout),
                                  "--uvit-config", "tiny_uvit_cond", "--nfe", "3", "-n", "4", "-o", "uvit.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "uvit.png").is_file()
    (tmp_path / "c.toml").write_text(f'model = "tiny_uvit.pth"\nuvit_path = "{uvit_checkout}"\n')
    result = runner.invoke(main, ["search", "--config", "c.toml"])
    assert result.exit_code == 2 and "'uvit_path' is not allowed in a config file" in result.output
    assert "pass --uvit-path on the command line" in result.output


@pytest.mark.slow
def test_uvit_search_end_to_end(uvit_checkout, tmp_path, monkeypatch):
    """search on a class-conditional U-ViT checkpoint through the CLI (about 20 s on two CPU cores)."""
    from click.testing import CliRunner

    from skiptune_search.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["search", "--model", "nnet_ema.pth", "--uvit-path", str(uvit_checkout),
                                       "--uvit-config", "tiny_uvit_cond", "--nfe", "3", "--n", "8", "--trials", "2",
                                       "--reference", str(DEFAULT_REFERENCE)])
    assert result.exit_code == 0, result.output
    assert "baseline FID (ρ = 1):" in result.output and "[input placement]" in result.output
    assert (tmp_path / "studies" / "nnet_ema.pth-heun-nfe3-linear-input.best.json").is_file()
