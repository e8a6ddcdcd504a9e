import json

import pytest
import torch

from skiptune_search.bundled.training import TrainConfig, _ema_beta, train_default
from skiptune_search.models.loaders import MODEL_INFO_FILE, load_unet
from skiptune_search.models.source import load_denoiser


def test_train_saves_resumes_and_writes_a_card(tmp_path, tiny_fashion_dir):
    out, state = tmp_path / "model", tmp_path / "state.pt"
    cfg = TrainConfig(steps=2, batch=4, save_every=1, warmup_steps=1)
    info = train_default(out, state, cfg, data_dir=str(tiny_fashion_dir))
    assert info["steps"] == 2 and info["images_seen"] == 8 and state.is_file()
    first = load_unet(out).state_dict()

    # resume from the exact state continues the step count and changes the weights
    info = train_default(out, state, TrainConfig(steps=3, batch=4, save_every=1), data_dir=str(tiny_fashion_dir))
    assert info["steps"] == 3
    second = load_unet(out).state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)

    # without the state file, resume starts from the shipped EMA weights and step count
    state.unlink()
    info = train_default(out, state, TrainConfig(steps=4, batch=4, save_every=1), data_dir=str(tiny_fashion_dir))
    assert info["steps"] == 4 and info["images_seen"] == 16

    record = json.loads((out / MODEL_INFO_FILE).read_text())
    assert record["precond"] == "edm" and record["training"]["config"]["batch"] == 4
    denoiser, meta = load_denoiser(str(out))
    assert meta["resolution"] == 28 and denoiser.sigma_data == 0.5

    from skiptune_search.bundled.card import write_model_card

    card = write_model_card(str(out), nfe=3, n=20, data_dir=str(tiny_fashion_dir))
    text = card.read_text()
    assert "4 steps" in text and "Proxy FID" in text and "floor" in text
    assert (out / "samples.png").is_file()
    # a later checkpoint keeps the card and grid beside the new weights
    train_default(out, state, TrainConfig(steps=5, batch=4, save_every=1), data_dir=str(tiny_fashion_dir))
    assert (out / "MODEL_CARD.md").is_file() and (out / "samples.png").is_file()


def test_a_resumed_run_ends_where_a_straight_run_does(tmp_path, tiny_fashion_dir):
    """The state file carries the random stream: 2 steps, stop, 2 more = 4 steps in one go."""
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    cfg = dict(batch=4, save_every=1, warmup_steps=1)
    train_default(straight, tmp_path / "s.pt", TrainConfig(steps=4, **cfg), data_dir=str(tiny_fashion_dir))
    train_default(parts, tmp_path / "p.pt", TrainConfig(steps=2, **cfg), data_dir=str(tiny_fashion_dir))
    train_default(parts, tmp_path / "p.pt", TrainConfig(steps=4, **cfg), data_dir=str(tiny_fashion_dir))
    a, b = load_unet(straight).state_dict(), load_unet(parts).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_a_finished_training_changes_nothing(tmp_path, tiny_fashion_dir):
    out, state = tmp_path / "model", tmp_path / "state.pt"
    cfg = TrainConfig(steps=2, batch=4, save_every=1, warmup_steps=1)
    done = train_default(out, state, cfg, data_dir=str(tiny_fashion_dir))
    before = (out / MODEL_INFO_FILE).read_text()
    assert train_default(out, state, cfg, data_dir=str(tiny_fashion_dir)) == done
    assert (out / MODEL_INFO_FILE).read_text() == before and done["final_loss"] is not None


def test_a_save_survives_a_leftover_of_a_killed_save_and_keeps_extra_folders(tmp_path, tiny_unet):
    from skiptune_search.models.loaders import save_model_dir

    out = tmp_path / "model"
    save_model_dir(tiny_unet, out, training={"steps": 1}, dataset="fashion-mnist")
    (out / "grids").mkdir()
    (out / "grids" / "a.png").write_bytes(b"png")
    (tmp_path / ".model.old").mkdir()  # a run killed between its two renames leaves this
    (tmp_path / ".model.old" / "x").write_text("stale")
    save_model_dir(tiny_unet, out, training={"steps": 2}, dataset="fashion-mnist")
    assert json.loads((out / MODEL_INFO_FILE).read_text())["training"] == {"steps": 2}
    assert (out / "grids" / "a.png").read_bytes() == b"png" and not (tmp_path / ".model.old").exists()


def test_ema_half_life_ramps_up_with_images_seen():
    cfg = TrainConfig(batch=100, ema_halflife_kimg=10, ema_rampup=0.1)
    # after 1000 images the half-life is 100 images: one batch of 100 halves the old weight
    assert _ema_beta(1000, 100, cfg) == pytest.approx(0.5)
    # far along, the cap of 10k images applies
    assert _ema_beta(10**7, 100, cfg) == pytest.approx(0.5 ** (100 / 10000))
