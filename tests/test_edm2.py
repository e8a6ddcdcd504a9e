"""EDM2's UNet (stand-ins with NVlabs/edm2's structure): the adapter, the controller on it, and
the pickle loader (trust, the edm2 checkout, latent models and their VAE)."""

import numpy as np
import pytest
import torch

from edm2_standins import Precond, UNet
from skiptune_search import RhoSchedule, ScheduleError, SkipController, apply
from test_placements import check_sigma_per_sample
from test_skips import check_skip_routing


def tiny_precond(label_dim=0, channels=3, resolution=16):
    """EDM2's layout (a conv, then blocks; down blocks; in0/in1; up blocks) at a small size."""
    torch.manual_seed(0)
    precond = Precond(resolution, channels, label_dim, model_channels=8, channel_mult=(1, 2, 3), num_blocks=2,
                      attn_resolutions=(4,)).eval()
    return with_gains(precond)


def with_gains(precond):
    """EDM2 starts its output and embedding gains at 0 (the network's output is then 0); a trained
    network has them away from 0, as here."""
    with torch.no_grad():
        for name, p in precond.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    return precond


def _inputs(precond):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, precond.img_channels, precond.img_resolution, precond.img_resolution, generator=g)
    return x, torch.tensor([0.4, 7.0])


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_edm2_skips_and_their_decoder_blocks():
    ctl = SkipController(tiny_precond())
    assert ctl.arch == "UNet"
    assert [s.name for s in ctl.skips[:4]] == ["enc.16x16_conv", "enc.16x16_block0", "enc.16x16_block1", "enc.8x8_down"]
    assert [s.resolution for s in ctl.skips] == [16] * 3 + [8] * 3 + [4] * 3
    assert [s.channels for s in ctl.skips] == [8] * 4 + [16] * 3 + [24] * 2
    assert ctl.skips[-1].consumer == "dec.4x4_block0" and ctl.skips[0].consumer == "dec.16x16_block2"
    assert all("block" in s.consumer for s in ctl.skips)


@torch.no_grad()
def test_edm2_each_skip_reaches_its_block_on_top_of_mp_cat():
    precond = tiny_precond()
    x, sigma = _inputs(precond)
    # mp_cat weights the skip before the block: its trailing channels are w·skip, so the producer's
    # output is not the tail as it is; ρ then scales exactly that tail
    check_skip_routing(precond, precond.unet, lambda: precond(x, sigma), producer_output_is_skip=False)
    ctl = SkipController(precond)
    deepest = ctl.skips[-1]
    produced, consumed = [], []
    h1 = precond.unet.get_submodule(deepest.name).register_forward_hook(lambda m, a, out: produced.append(out))
    h2 = precond.unet.get_submodule(deepest.consumer).register_forward_pre_hook(lambda m, a: consumed.append(a[0]))
    precond(x, sigma)
    h1.remove(), h2.remove()
    n_hidden, c = consumed[0].shape[1] - deepest.channels, deepest.channels
    weight = np.sqrt((n_hidden + c) / 0.5) / np.sqrt(c) * 0.5  # mp_cat's weight of b at t = 0.5
    assert torch.allclose(consumed[0][:, -c:], produced[0] * weight, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("label_dim", [0, 5])
def test_edm2_rho_one_is_exact_and_unhooks(label_dim):
    precond = tiny_precond(label_dim)
    x, sigma = _inputs(precond)
    labels = torch.eye(5)[[1, 3]] if label_dim else None
    before = _hooks(precond)
    reference = precond(x, sigma, labels)
    ctl = SkipController(precond)
    with apply(precond, RhoSchedule.identity(ctl.arch, ctl.skips)):
        assert _hooks(precond) != before
        assert torch.equal(precond(x, sigma, labels), reference)
    with apply(precond, RhoSchedule.linear(ctl.arch, ctl.skips, 0.7, 0.95)):
        assert not torch.allclose(precond(x, sigma, labels), reference)
    assert _hooks(precond) == before
    assert torch.equal(precond(x, sigma, labels), reference)


@torch.no_grad()
def test_edm2_sigma_dependent_schedule_per_sample():
    precond = tiny_precond()
    check_sigma_per_sample(precond, precond.unet, channels=3, size=16)


@pytest.mark.parametrize("placement", ["normalized", "both"])
def test_edm2_has_no_normalization_for_the_normalized_placements(placement):
    ctl = SkipController(tiny_precond())
    assert ctl.placements == ("input",)
    with pytest.raises(ScheduleError, match="UNet has no normalization at the decoder input") as error:
        ctl.use(RhoSchedule.linear(ctl.arch, ctl.skips, 0.8, 1.0, placement=placement))
    assert error.value.option == "placement" and "\n" not in str(error.value)
    report = ctl.groupnorm_report()
    assert not any(r["normalization"] or r["cancelled"] for r in report)
    assert all(r["shortcut"] for r in report)  # a consumer takes more channels than it gives: a 1x1 conv_skip


@pytest.mark.parametrize("channels, skips", [(3, 16), (4, 16)])
def test_edm2_published_layouts(channels, skips):
    """edm2-img64-s (pixels) and edm2-img512-xs (4x64x64 latents): EDM2's defaults, mult 1,2,3,4,
    3 blocks, attention at 16 and 8: 16 skips at 64, 32, 16 and 8 px."""
    with torch.device("meta"):
        precond = Precond(64, channels, 1000, model_channels=192 if channels == 3 else 128,
                          channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64)
    ctl = SkipController(precond)
    assert len(ctl.skips) == skips and {s.resolution for s in ctl.skips} == {64, 32, 16, 8}
