"""Issue 19 item 5, part: the controller on real architectures at their published sizes, with
random weights (no checkpoint is needed to check the hooks): ρ = 1 is bit-exact on one call and
ρ ≠ 1 changes it. Slow (a full-size UNet on a CPU): run with -m slow. The configs below are the
published UNet configs of Stable Diffusion 1.5 and SDXL base 1.0 (their unet/config.json)."""

import pytest
import torch

from skiptune_search import RhoSchedule, SkipController, apply

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def _call(unet, config, latent):
    torch.manual_seed(1)
    x = torch.randn(1, 4, latent, latent)
    kwargs = {"encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"])}
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280),
                                       "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]],
                                                                dtype=torch.float32)}
    with torch.inference_mode():
        return unet(x, torch.tensor([500.0]), **kwargs).sample


@pytest.mark.slow
@pytest.mark.parametrize("config, skips, params", [(SD15, 12, 859_520_964), (SDXL, 9, 2_567_463_684)],
                         ids=["sd15", "sdxl"])
def test_published_unet_rho_one_is_exact_and_rho_acts(config, skips, params):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    assert sum(p.numel() for p in unet.parameters()) == params
    ctl = SkipController(unet)
    assert len(ctl.skips) == skips
    latent = 32  # a smaller latent than the model's native size keeps the CPU call short
    plain = _call(unet, config, latent)
    with apply(unet, ctl.identity()):
        assert torch.equal(_call(unet, config, latent), plain)
    with apply(unet, RhoSchedule.linear(ctl.arch, ctl.skips, 0.8, 1.0)):
        tuned = _call(unet, config, latent)
    assert not torch.equal(tuned, plain) and torch.isfinite(tuned).all()
    assert torch.equal(_call(unet, config, latent), plain)  # hooks gone
