import pytest
import torch

from skiptune_search import RhoSchedule, ScheduleError, SkipController, apply
from skiptune_search.core.schedule import SkipInfo
from skiptune_search.core.controller import NoSkipsError


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 16, 16, generator=g), torch.tensor([0.1, -0.5, 1.0])


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_discovers_skips_in_encoder_order(tiny_unet):
    ctl = SkipController(tiny_unet)
    names = [s.name for s in ctl.skips]
    assert names == ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.attentions.0"]
    assert [s.resolution for s in ctl.skips] == [16, 16, 8, 8]
    assert [s.channels for s in ctl.skips] == [8, 8, 8, 16]
    # the deepest skip is consumed first, by the first resnet of the first up block
    assert ctl.skips[-1].consumer == "up_blocks.0.resnets.0"
    assert ctl.skips[0].consumer == "up_blocks.1.resnets.1"


@torch.no_grad()
def test_rho_one_is_bit_identical_and_detach_restores(tiny_unet):
    x, t = _inputs()
    before_hooks = _hook_counts(tiny_unet)
    reference = tiny_unet(x, t).sample
    ctl = SkipController(tiny_unet)
    with ctl.attached():
        assert _hook_counts(tiny_unet) != before_hooks
        assert torch.equal(tiny_unet(x, t).sample, reference)
        ctl.use(RhoSchedule.linear(ctl.arch, ctl.skips, 0.7, 0.9))
        changed = tiny_unet(x, t).sample
    assert not torch.allclose(changed, reference)
    assert _hook_counts(tiny_unet) == before_hooks
    assert torch.equal(tiny_unet(x, t).sample, reference)


def _tensor(output):
    """A module's output tensor (transformer blocks return a tuple or an output object)."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def check_skip_routing(model, unet, call, producer_output_is_skip: bool = True):
    """For each skip i: the producer's output is the trailing channels of its consumer's input
    (unless the network changes it after: ``producer_output_is_skip=False``), and a schedule with
    ρ_i = 0.5 scales exactly those channels of exactly that input."""
    ctl = SkipController(model)
    for i, skip in enumerate(ctl.skips):
        produced, plain, tuned = [], [], []
        producer = unet.get_submodule(skip.name)
        consumer = unet.get_submodule(skip.consumer)
        h1 = producer.register_forward_hook(lambda m, a, out: produced.append(_tensor(out).clone()))
        h2 = consumer.register_forward_pre_hook(lambda m, a: plain.append(a[0].clone()))
        call()
        h1.remove(), h2.remove()
        rhos = [1.0] * len(ctl.skips)
        rhos[i] = 0.5
        with apply(model, RhoSchedule.constant(ctl.arch, ctl.skips, rhos)):
            h = consumer.register_forward_pre_hook(lambda m, a: tuned.append(a[0].clone()))
            call()
            h.remove()
        c = skip.channels
        assert len(plain) == len(tuned) == 1, skip.consumer
        if producer_output_is_skip:
            assert torch.equal(plain[0][:, -c:], produced[0]), f"skip {i} is not the tail of {skip.consumer}'s input"
        assert tuple(produced[0].shape[-3:]) == (c, skip.resolution, skip.resolution)
        assert torch.equal(tuned[0][:, :-c], plain[0][:, :-c])
        assert torch.equal(tuned[0][:, -c:], plain[0][:, -c:] * 0.5)


@torch.no_grad()
def test_each_skip_is_scaled_by_its_own_rho(tiny_unet):
    x, t = _inputs()
    check_skip_routing(tiny_unet, tiny_unet, lambda: tiny_unet(x, t))


@torch.no_grad()
def test_apply_context_accepts_a_json_path_and_wrappers(tiny_unet, tmp_path):
    x, t = _inputs()
    ctl = SkipController(tiny_unet)
    path = RhoSchedule.linear(ctl.arch, ctl.skips, 0.8, 1.0).save(tmp_path / "s.json")

    class Pipeline:
        unet = tiny_unet

    reference = tiny_unet(x, t).sample
    with apply(Pipeline(), path) as active:
        assert active.rhos == pytest.approx([1.0, 1 - 0.2 / 3, 1 - 0.4 / 3, 0.8])
        tuned = tiny_unet(x, t).sample
    assert not torch.equal(tuned, reference)
    assert torch.equal(tiny_unet(x, t).sample, reference)


def test_schedule_for_another_layout_is_refused(tiny_unet):
    ctl = SkipController(tiny_unet)
    wrong = [SkipInfo(s.name, s.consumer, s.channels * 2, s.resolution) for s in ctl.skips]
    with pytest.raises(ScheduleError, match="skip 0 differs"):
        ctl.use(RhoSchedule.identity(ctl.arch, wrong))


def test_model_without_skips_is_a_clear_error():
    with pytest.raises(NoSkipsError, match="UNet2DModel"):
        SkipController(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_unet2d_condition_model_with_cross_attention():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    ctl = SkipController(unet)
    assert ctl.arch == "UNet2DConditionModel"
    assert [s.name for s in ctl.skips] == ["conv_in", "down_blocks.0.attentions.0", "down_blocks.0.downsamplers.0",
                                         "down_blocks.1.resnets.0"]
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    check_skip_routing(unet, unet, lambda: unet(x, t, encoder_hidden_states=text))
    reference = unet(x, t, encoder_hidden_states=text).sample
    for placement in ("input", "normalized", "both"):
        with apply(unet, RhoSchedule.constant(ctl.arch, ctl.skips, [1.0] * 4, placement=placement)):
            assert torch.equal(unet(x, t, encoder_hidden_states=text).sample, reference)
