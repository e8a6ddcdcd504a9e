"""EDM SongUNet / DhariwalUNet (stand-ins with EDM's structure), bare and inside EDMPrecond."""

import pytest
import torch

from edm_standins import DhariwalUNet, EDMPrecond, SongUNet
from skiptune_search import RhoSchedule, SkipController, apply
from skiptune_search.core.schedule import PLACEMENTS
from test_placements import check_sigma_per_sample
from test_skips import check_skip_routing


def cifar_like():
    """DDPM++ at EDM's CIFAR-10 layout (3 levels, 4 blocks, attention at 16) at reduced width."""
    torch.manual_seed(0)
    return SongUNet(img_resolution=16, model_channels=16, channel_mult=(2, 2, 2), num_blocks=2,
                    attn_resolutions=(8,)).eval()


def imagenet_like():
    """ADM at EDM's ImageNet-64 layout (mult 1,2,3,4; 3 blocks) at reduced width and size."""
    torch.manual_seed(0)
    return DhariwalUNet(img_resolution=16, model_channels=16, channel_mult=(1, 2, 3, 4), num_blocks=3,
                        attn_resolutions=(8, 4, 2)).eval()


def ncsnpp_like():
    """SongUNet with NCSN++'s residual encoder (EDM's VE networks): the auxiliary path from the
    input image folds into each level's down-sampled skip, adding no skips of its own."""
    torch.manual_seed(0)
    return SongUNet(img_resolution=16, model_channels=16, channel_mult=(2, 2, 2), num_blocks=2,
                    attn_resolutions=(8,), encoder_type="residual").eval()


def _call(net):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return lambda: net(x, torch.tensor([0.3, -0.7]))


@pytest.mark.parametrize("make", [cifar_like, imagenet_like, ncsnpp_like])
@torch.no_grad()
def test_edm_skips_are_routed_to_their_decoder_blocks(make):
    net = make()
    ctl = SkipController(net)
    assert ctl.arch == type(net).__name__
    assert ctl.skips[0].name.endswith("_conv") and ctl.skips[0].resolution == 16
    assert ctl.skips[-1].consumer.endswith("_block0")  # the deepest skip meets the first decoder block
    assert not any("aux" in s.name for s in ctl.skips)
    check_skip_routing(net, net, _call(net), producer_output_is_skip=make is not ncsnpp_like)


def test_edm_auxiliary_encoder_adds_no_skips():
    """The residual and skip encoders have the standard encoder's skips, in the same order."""
    standard = SkipController(cifar_like()).skips
    for encoder_type in ("residual", "skip"):
        net = SongUNet(img_resolution=16, model_channels=16, channel_mult=(2, 2, 2), num_blocks=2,
                       attn_resolutions=(8,), encoder_type=encoder_type)
        assert SkipController(net).skips == standard, encoder_type


@pytest.mark.parametrize("make", [cifar_like, imagenet_like, ncsnpp_like])
@pytest.mark.parametrize("placement", PLACEMENTS)
@torch.no_grad()
def test_edm_rho_one_is_exact_and_unhooks(make, placement):
    net = make()
    precond = EDMPrecond(net)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in precond.modules()]
    reference = precond(x, sigma)
    ctl = SkipController(precond)
    n = len(ctl.skips)
    with apply(precond, RhoSchedule.constant(ctl.arch, ctl.skips, [1.0] * n, placement=placement)):
        assert torch.equal(precond(x, sigma), reference)
    with apply(precond, RhoSchedule.linear(ctl.arch, ctl.skips, 0.7, 0.95, placement=placement)):
        assert not torch.allclose(precond(x, sigma), reference)
    assert before == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in precond.modules()]
    assert torch.equal(precond(x, sigma), reference)


@torch.no_grad()
def test_edm_precond_gives_sigma_per_sample():
    net = imagenet_like()
    check_sigma_per_sample(EDMPrecond(net), net, channels=3, size=16)


@torch.no_grad()
def test_sigma_of_one_call_is_not_reused_by_the_next():
    """σ comes from the Precond's call; the bare UNet called after it has no σ to go by."""
    net = imagenet_like()
    precond = EDMPrecond(net)
    ctl = SkipController(precond)
    params = {f"{e}_k{k}": 0.8 for k in range(2) for e in ("rho_inner", "rho_outer")}
    schedule = RhoSchedule.from_family("per_noise", ctl.arch, ctl.skips, params, sigma_knots=[0.1, 10.0])
    with apply(precond, schedule):
        precond(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]))
        with pytest.raises(RuntimeError, match="outside a model call"):
            _call(net)()


def test_edm_imagenet64_layout_groupnorm_cancellation():
    """EDM's ImageNet-64 ADM at full width: 16 skips, and in 10 of the 16 concatenations the
    skip channels fill whole GroupNorm groups, so ρ on the input is normalized away."""
    with torch.device("meta"):
        net = DhariwalUNet(img_resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3)
    report = SkipController(EDMPrecond(net)).groupnorm_report()
    assert len(report) == 16
    assert sum(r["cancelled"] for r in report) == 10
    assert all(r["shortcut"] for r in report)  # every consuming block has a 1x1 skip conv


def test_edm_cifar10_layout_has_15_skips():
    with torch.device("meta"):
        net = SongUNet(img_resolution=32, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4)
    ctl = SkipController(EDMPrecond(net))
    assert len(ctl.skips) == 15 and {s.resolution for s in ctl.skips} == {32, 16, 8}


@pytest.fixture
def edm_pickle(tmp_path, monkeypatch, request):
    """(path, repo) of a pickled EDM-style net; sys.path and sys.modules are restored after."""
    import sys

    monkeypatch.setattr(sys, "path", sys.path[:])
    yield _edm_pickle(tmp_path, getattr(request, "param", 0))
    sys.modules.pop("edm_nets_checkout", None)


def _edm_pickle(tmp_path, label_dim=0):
    """A pickle like EDM's ({'ema': EDMPrecond(...)}) whose classes live in a module that only
    --edm-path makes importable, as EDM's 'training.networks' does."""
    import pickle
    import shutil
    import sys
    from pathlib import Path

    repo = tmp_path / "edm-checkout"
    repo.mkdir()
    shutil.copy(Path(__file__).parent / "edm_standins.py", repo / "edm_nets_checkout.py")
    sys.path.insert(0, str(repo))
    try:
        import edm_nets_checkout as nets

        torch.manual_seed(0)
        net = nets.EDMPrecond(nets.DhariwalUNet(img_resolution=16, model_channels=16, channel_mult=(1, 2),
                                                num_blocks=1, attn_resolutions=(), label_dim=label_dim))
        path = tmp_path / "edm-tiny.pkl"
        path.write_bytes(pickle.dumps({"ema": net, "augment_pipe": None}))
    finally:
        sys.path.remove(str(repo))
        sys.modules.pop("edm_nets_checkout", None)
    return path, repo


def test_edm_pickle_needs_trust_and_the_edm_code(edm_pickle):
    from skiptune_search.models.loaders import ModelLoadError
    from skiptune_search.models.source import load_denoiser

    path, repo = edm_pickle
    with pytest.raises(ModelLoadError, match="loading a pickle runs code from it") as info:
        load_denoiser(str(path))
    assert info.value.option == "trust_pickle"
    with pytest.raises(ModelLoadError, match="of the EDM code base: give the path of a checkout") as error:
        load_denoiser(str(path), trust_pickle=True)
    assert error.value.option == "edm_path"
    denoiser, info = load_denoiser(str(path), trust_pickle=True, edm_path=str(repo))
    assert info["resolution"] == 16 and info["channels"] == 3
    assert (info["sigma_min"], info["sigma_max"]) == (0.002, 80.0)  # EDM's Precond says 0 and inf
    assert len(SkipController(denoiser).skips) == 4


def test_edm_pickle_through_the_cli(edm_pickle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from skiptune_search.cli import main

    path, repo = edm_pickle
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(main, ["inspect", "--model", str(path)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    result = runner.invoke(main, ["inspect", "--model", str(path), "--trust-pickle", "--edm-path", str(repo)])
    assert result.exit_code == 0, result.output
    assert "DhariwalUNet: 4 long skips" in result.output
    result = runner.invoke(main, ["sample", "--model", str(path), "--trust-pickle", "--edm-path", str(repo),
                                  "--nfe", "3", "-n", "4", "-o", "edm.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "edm.png").is_file()


@pytest.mark.parametrize("edm_pickle", [10], indirect=True)
def test_class_conditional_edm_gets_one_label_per_seed(edm_pickle):
    """Labels come from each sample's seed (after its noise), the same in any batch and trial."""
    from skiptune_search.sampling.samplers import seeded_inputs
    from skiptune_search.models.source import ModelSource
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    path, repo = edm_pickle
    evaluator = Evaluator(Task(model=str(path), nfe=3, n=6, seed=40), batch_size=4,
                          source=ModelSource(str(path), trust_pickle=True, checkouts={"edm": str(repo)}))
    assert evaluator.model_info["label_dim"] == 10
    seen = []
    handle = evaluator.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].argmax(1).tolist()), with_kwargs=True)
    evaluator.images(evaluator.controller.identity(), progress=False)
    handle.remove()
    _, labels = seeded_inputs(list(range(40, 46)), (3, 16, 16), 10)
    expected = labels.argmax(1).tolist()
    assert seen[0] == expected[:4] and seen[-1] == expected[4:]  # two batches, every step the same labels
    _, again = seeded_inputs([44, 41], (3, 16, 16), 10)
    assert again.argmax(1).tolist() == [expected[4], expected[1]]
