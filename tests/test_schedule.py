import json

import pytest

from skiptune_search.core.schedule import FORMAT, RhoSchedule, ScheduleError, SkipInfo, linear_rhos, load_schedule

SKIPS = [SkipInfo(f"s{i}", f"c{i}", 8 * (i + 1), 32 // (i + 1)) for i in range(4)]


def test_linear_ramp_goes_from_outer_to_inner():
    assert linear_rhos(4, rho_inner=0.7, rho_outer=1.0) == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert linear_rhos(1, 0.8, 1.0) == [0.8]


def test_json_round_trip(tmp_path):
    s = RhoSchedule.linear("UNet2DModel", SKIPS, 0.8, 1.1, tuned_for={"nfe": 9})
    path = s.save(tmp_path / "best.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["family"] == "linear"
    assert [row[0] for row in data["rho"]] == pytest.approx([1.1, 1.0, 0.9, 0.8])
    again = load_schedule(path)
    assert again.rho == s.rho and again.skips == s.skips and again.tuned_for == {"nfe": 9}


def test_factors_at_one_sigma_and_per_sample_agree():
    """factors_at: ρ interpolated in log σ, FreeU's (b, s) by stage inside its window only, the
    same numbers at one σ and in a per-sample tensor."""
    import math

    import torch

    from skiptune_search.core.freeu import FreeU

    skips = [SkipInfo("a", "", 8, 16), SkipInfo("b", "", 8, 8), SkipInfo("c", "", 16, 4)]  # stages: -, 1, 0
    s = RhoSchedule("A", skips, rho=[[0.5, 1.0], [1.0, 1.5], [2.0, 1.0]], sigma_knots=[1.0, 10.0],
                    freeu=FreeU(1.5, 1.6, 0.9, 0.2, window=(2.0, 5.0)))
    outside = s.factors_at(1.0)
    assert [(f.rho, f.b, f.s, f.freeu) for f in outside] == [(0.5, 1.0, 1.0, False), (1.0, 1.0, 1.0, False),
                                                             (2.0, 1.0, 1.0, False)]
    inside = s.factors_at(3.0)
    w = math.log(3.0) / math.log(10.0)
    assert [f.rho for f in inside] == pytest.approx([0.5 + 0.5 * w, 1.0 + 0.5 * w, 2.0 - w])
    assert [(f.b, f.s, f.freeu) for f in inside] == [(1.0, 1.0, False), (1.6, 0.2, True), (1.5, 0.9, True)]
    per_sample = s.factors_at(torch.tensor([1.0, 3.0, 100.0], dtype=torch.float64))
    for k, f in enumerate(per_sample):
        assert f.rho.tolist() == pytest.approx([outside[k].rho, inside[k].rho, s.rhos_at(100.0)[k]], rel=1e-12)
    assert per_sample[0].freeu is False and (per_sample[2].b, per_sample[2].s) == (1.5, 0.9)
    assert per_sample[1].freeu.tolist() == per_sample[2].freeu.tolist() == [False, True, False]
    with pytest.raises(ScheduleError, match="depends on σ: pass the noise level"):
        s.factors_at()
    plain = RhoSchedule.identity("A", skips).factors_at()
    assert [(f.rho, f.changes_input) for f in plain] == [(1.0, False)] * 3
    assert [f.changes_input for f in inside] == [True, True, True] and not outside[1].changes_input


def test_sigma_knots_interpolate_in_log_sigma():
    s = RhoSchedule("A", SKIPS[:1], rho=[[0.5, 1.0]], sigma_knots=[0.1, 10.0])
    assert s.rhos_at(1.0) == pytest.approx([0.75])  # halfway in log σ
    assert s.rhos_at(0.01) == [0.5] and s.rhos_at(100.0) == [1.0]  # clamped


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="skiptune-schedule/0"), "export it again"),
        (lambda d: d.pop("rho"), "'rho' is a required property"),
        (lambda d: d["skips"][0].update(channels="8"), r"skips\[0\].channels must be a whole number"),
        (lambda d: d["rho"].__setitem__(0, [9.0]), r"outside \(0.0, 4.0\]"),
        (lambda d: d["rho"].__setitem__(0, [0.0]), "outside"),
        (lambda d: d["skips"][1].update(name="other"), "fingerprint"),
        (lambda d: d["rho"].pop(), "rows"),
        (lambda d: d.update(sigma_knots=[1.0]), "at least 2 knots"),  # one knot: the hook would divide 0 by 0
    ],
)
def test_invalid_files_say_what_is_wrong(tmp_path, edit, message):
    data = RhoSchedule.linear("UNet2DModel", SKIPS, 0.8, 1.0).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match=message):
        load_schedule(path)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(tmp_path / "x.json")
    with pytest.raises(ScheduleError, match="not found"):
        load_schedule(tmp_path / "missing.json")


def test_layout_check_names_first_difference():
    s = RhoSchedule.linear("UNet2DModel", SKIPS, 0.8, 1.0)
    other = list(SKIPS)
    other[2] = SkipInfo("s2", "c2", 99, other[2].resolution)
    with pytest.raises(ScheduleError, match="skip 2 differs"):
        s.check_layout("UNet2DModel", other)
    with pytest.raises(ScheduleError, match="the model has 3"):
        s.check_layout("UNet2DModel", SKIPS[:3])
    with pytest.raises(ScheduleError, match="SongUNet"):
        s.check_layout("SongUNet", SKIPS)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    s = RhoSchedule.linear("UNet2DModel", SKIPS, 0.8, 1.0)
    target = s.save(tmp_path / "best.json")
    before = target.read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError):
        RhoSchedule.linear("UNet2DModel", SKIPS, 0.5, 0.5).save(target)
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]
