"""Issue 19 item 5, part: the controller on real architectures at their published sizes, with
random weights (no checkpoint is needed to check the hooks): ρ = 1 is bit-exact on one call and
ρ ≠ 1 changes it. Slow (a full-size UNet on a CPU): run with -m slow. SD 1.5 and SDXL base 1.0
are built from their published unet/config.json (``bench/sizes.py``, table 7's); EDM's ADM,
EDM2-img64-S and U-ViT-M from checkouts named by SKIPTUNE_EDM_PATH, SKIPTUNE_EDM2_PATH and
SKIPTUNE_UVIT_PATH (the test is skipped, saying so, where one is not set)."""

import os
from pathlib import Path

import pytest
import torch

from skiptune_search import RhoSchedule, SkipController, apply
from skiptune_search.bench.sizes import SD15, SDXL


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


@pytest.mark.slow
@pytest.mark.parametrize("key, env, skips, params", [("edm-adm64", "SKIPTUNE_EDM_PATH", 16, 295_899_267),
                                                     ("edm2-img64-s", "SKIPTUNE_EDM2_PATH", 16, 280_209_381),
                                                     ("uvit-m-in64", "SKIPTUNE_UVIT_PATH", 8, 130_940_292)])
def test_published_checkout_architecture_rho_one_is_exact_and_rho_acts(key, env, skips, params):
    """Built by the checkout's own code at the published size, in a process of its own (table 7's
    measurement, one call each): ρ = 1 bit-exact, a σ-dependent schedule changes the output."""
    from skiptune_search.bench.sizes import measure_in_child

    if not os.environ.get(env):
        pytest.skip(f"set {env} to a checkout to build this architecture")
    r = measure_in_child(key, Path(os.environ[env]), calls=1, device="cpu", threads=0)
    assert (r["skips"], r["params"]) == (skips, params)
    assert r["rho1_exact"] and r["varying_changes"]
