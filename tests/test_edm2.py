"""EDM2's UNet (stand-ins with NVlabs/edm2's structure): the adapter, the controller on it, and
the pickle loader (trust, the edm2 checkout, latent models and their VAE)."""

import numpy as np
import pytest
import torch

from edm2_standins import Precond, UNet
from skiptune_search import RhoSchedule, ScheduleError, SkipController
from skiptune_search.scoring.metrics import DEFAULT_REFERENCE
from test_placements import check_exact_and_unhooks, check_sigma_per_sample
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
    check_exact_and_unhooks(precond, lambda: precond(x, sigma, labels))


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


# --- the pickle loader -------------------------------------------------------------------------
TINY_VAE = "skiptune-test/tiny-vae"  # a name no real cache holds


@pytest.fixture
def edm2_checkout(tmp_path, monkeypatch):
    """A stand-in checkout of NVlabs/edm2: training/networks_edm2.py and training/encoders.py
    (the stand-ins), importable only through --edm-path; sys.path and sys.modules restored after."""
    import shutil
    import sys
    from pathlib import Path

    repo = tmp_path / "edm2-checkout"
    (repo / "training").mkdir(parents=True)
    (repo / "training" / "__init__.py").write_text("")
    for module in ("networks_edm2", "encoders"):
        shutil.copy(Path(__file__).parent / "edm2_standins.py", repo / "training" / f"{module}.py")
    monkeypatch.setattr(sys, "path", sys.path[:])
    yield repo
    for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
        del sys.modules[name]


def write_edm2_pickle(repo, path, latent=False, label_dim=0):
    """A pickle as EDM2 writes it: {'ema': Precond, 'encoder': ...}, its classes from the checkout."""
    import pickle
    import sys

    sys.path.insert(0, str(repo))
    try:
        from training import encoders, networks_edm2

        torch.manual_seed(0)
        net = networks_edm2.Precond(8 if latent else 16, 4 if latent else 3, label_dim, model_channels=8,
                                    channel_mult=(1, 2), num_blocks=1)
        with_gains(net)
        encoder = encoders.StabilityVAEEncoder(vae_name=TINY_VAE) if latent else encoders.StandardRGBEncoder()
        path.write_bytes(pickle.dumps({"ema": net, "loss_fn": None, "encoder": encoder}))
    finally:
        sys.path.remove(str(repo))
        for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
            del sys.modules[name]
    return path


def write_tiny_vae_cache(root):
    """A tiny AutoencoderKL (4 latent channels, x2) as EDM2's loader caches it: a Hugging Face hub
    cache at $DNNLIB_CACHE_DIR/diffusers."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        norm_num_groups=4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    repo = root / "diffusers" / ("models--" + TINY_VAE.replace("/", "--"))
    revision = "0" * 40
    vae.save_pretrained(repo / "snapshots" / revision, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return vae


def test_edm2_pickle_needs_trust_and_the_edm2_code(edm2_checkout, tmp_path):
    from skiptune_search.core.errors import ModelLoadError
    from skiptune_search.models.source import load_denoiser

    path = write_edm2_pickle(edm2_checkout, tmp_path / "edm2-img16.pkl", label_dim=10)
    with pytest.raises(ModelLoadError, match="loading a pickle runs code from it") as error:
        load_denoiser(str(path))
    assert error.value.option == "trust_pickle"
    with pytest.raises(ModelLoadError, match="module 'training'.*NVlabs/edm2 for an EDM2 network") as error:
        load_denoiser(str(path), trust_pickle=True)
    assert error.value.option == "edm_path"
    denoiser, info = load_denoiser(str(path), trust_pickle=True, edm_path=str(edm2_checkout))
    assert type(denoiser).__name__ == "Precond" and not hasattr(denoiser, "decode")  # pixels: no decoder
    assert (info["sigma_min"], info["sigma_max"]) == (0.002, 80.0)  # generate_images.py's range
    assert (info["resolution"], info["channels"], info["label_dim"], info["precond"]) == (16, 3, 10, "edm2")
    assert len(SkipController(denoiser).skips) == 4


def test_edm2_inspect_and_errors_through_the_cli(edm2_checkout, tmp_path, monkeypatch):
    """inspect lists the skips and says there is no normalization; every missing piece, and a
    placement EDM2 cannot have, is one line."""
    from click.testing import CliRunner

    from skiptune_search.cli import main

    path = write_edm2_pickle(edm2_checkout, tmp_path / "edm2-img16.pkl", label_dim=10)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    load = ["--model", str(path), "--trust-pickle", "--edm-path", str(edm2_checkout)]
    for args, message in [(load[:2], "--trust-pickle: "), (load[:3], "--edm-path: ")]:  # before the code is imported
        result = runner.invoke(main, ["inspect", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(main, ["inspect", *load])
    assert result.exit_code == 0, result.output
    assert "UNet: 4 long skips" in result.output
    assert result.output.count("no normalization at the decoder input") == 4
    for args, message in [([*load, "--placement", "normalized"], "--placement: placement 'normalized'"),
                          ([*load, "--placement", "search"], "--placement: a searched placement picks among")]:
        result = runner.invoke(main, ["search", *args, "--nfe", "3", "--n", "8", "--trials", "2", "--reference",
                                      str(DEFAULT_REFERENCE)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_edm2_search_end_to_end(edm2_checkout, tmp_path, monkeypatch):
    """A search through the CLI on a class-conditional EDM2 pickle, each model call given one-hot
    labels (one class per seed, as generate_images.py draws them). About 20 s on two CPU cores."""
    from click.testing import CliRunner

    from skiptune_search.cli import main

    path = write_edm2_pickle(edm2_checkout, tmp_path / "edm2-img16.pkl", label_dim=10)
    monkeypatch.chdir(tmp_path)
    load = ["--model", str(path), "--trust-pickle", "--edm-path", str(edm2_checkout)]
    seen = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if type(module).__name__ == "Precond":
            seen.append(args[2] if len(args) > 2 else kwargs.get("class_labels"))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", spy)
    result = CliRunner().invoke(main, ["search", *load, "--nfe", "3", "--n", "8", "--trials", "2", "--batch", "4",
                                       "--reference", str(DEFAULT_REFERENCE)])
    assert result.exit_code == 0, result.output
    assert "best ρ (outer→inner)" in result.output and "[input placement]" in result.output
    assert seen and all(labels.shape[1] == 10 and torch.equal(labels.sum(1), torch.ones(len(labels))) for labels in seen)
    assert {len(labels) for labels in seen} == {2, 4}  # the first rung's 2 samples, then batches of 4


@pytest.mark.parametrize("cached", [True, False])
def test_latent_edm2_decodes_through_the_cached_vae(edm2_checkout, tmp_path, monkeypatch, cached):
    from click.testing import CliRunner

    from skiptune_search.cli import main
    from skiptune_search.models.source import load_denoiser

    path = write_edm2_pickle(edm2_checkout, tmp_path / "edm2-img512-tiny.pkl", latent=True)
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "dnnlib"))
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--model", str(path), "--trust-pickle", "--edm-path", str(edm2_checkout), "--nfe", "3",
            "-n", "2", "-o", "grid.png"]
    if not cached:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"latent EDM2 model decoded by the VAE {TINY_VAE}" in result.output
        assert result.output.strip().endswith(f"hf download {TINY_VAE}")
        return
    vae = write_tiny_vae_cache(tmp_path / "dnnlib")
    denoiser, info = load_denoiser(str(path), trust_pickle=True, edm_path=str(edm2_checkout))
    assert (info["channels"], info["resolution"], info["image_resolution"]) == (4, 8, 16)
    assert len(SkipController(denoiser).skips) == 4  # the Precond inside the latent wrapper
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # EDM2's decoding: undo the encoder's affine map, the VAE, clamp to [0, 1], truncate to uint8
    from edm2_standins import StabilityVAEEncoder

    encoder = StabilityVAEEncoder(vae_name=TINY_VAE)
    raw = (latents - torch.tensor(encoder.bias).reshape(1, -1, 1, 1)) / torch.tensor(encoder.scale).reshape(1, -1, 1, 1)
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(0, 1).mul(255).to(torch.uint8)
    assert torch.equal(denoiser.decode(latents), expected)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 + 16 + 2, 2 + 2 * (16 + 2))  # a column of two 16 px images
