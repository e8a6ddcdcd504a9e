"""The search-quality benchmarks (tables 3 and 4) on synthetic grids, where the answer is known."""

import contextlib
import json
import sqlite3
import statistics

import optuna
import pytest
import torch

from skiptune_search.bench import search as BS
from skiptune_search.search.space import grid_values
from skiptune_search.search.storage import make_storage


def _bowl_grid(points=11, best=(0.7, 0.9)):
    """A grid whose FID is a bowl around ``best``; FID at the small rung is the same bowl plus 10."""
    grid = {}
    for i in grid_values(points):
        for o in grid_values(points):
            value = 100 + 100 * ((i - best[0]) ** 2 + (o - best[1]) ** 2)
            grid[BS.point_key(i, o)] = {"fid": {"250": value + 10, "1000": value}, "kid": {"250": value / 100,
                                        "1000": value / 100}, "fid_inf": value - 5}
    return grid


def test_replayed_searches_stay_on_the_grid_and_find_a_bowls_bottom():
    grid = _bowl_grid()
    log = BS.replay_search(grid, 11, (250, 1000), "tpe", seed=0, trials=40, reduction_factor=3)
    assert len(log) == 40 and all(t["point"] in grid for t in log)
    assert log[0]["point"] == "1,1" and log[1]["point"] == "0.8,1"  # baseline, then the paper ramp
    assert {t["samples"] for t in log} <= {0, 250, 1000}
    # no samples only for a point proposed again, which the objective records without sampling
    assert all(t["point"] in {u["point"] for u in log[:k]} for k, t in enumerate(log) if t["samples"] == 0)
    assert any(t["value"] is None for t in log)  # successive halving pruned some
    assert min(t["value"] for t in log if t["value"] is not None) <= 1.01 * 100


def test_search_efficiency_counts_trials_and_samples_to_the_target():
    results = {"grid": _bowl_grid(), "settings": {"points": 11, "task": {"rungs": [250, 1000]}}}
    runs = BS.replays(results, ("random",), seeds=3, trials=30, pruners=(((250, 1000), 3),))
    rows = BS.search_efficiency(results, runs)
    assert [(r["optimizer"], r["pruning"], r["pruner"]) for r in rows] == [("random", True, "250-1000,rf3"),
                                                                         ("random", False, None)]
    for row, key in zip(rows, ("random,on,250-1000,rf3", "random,off")):
        reached = [BS._reach(log, 101.0) for log in runs[key]]
        assert row["reached"] == sum(r[0] is not None for r in reached)
        assert row["samples_to_target"] == [r[1] for r in reached]  # seed by seed, for the pruning comparison
    # without pruning every trial costs N
    assert all(t["samples"] == 1000 or t["samples"] == 0 and t["point"] in {u["point"] for u in log[:k]}
               for log in runs["random,off"] for k, t in enumerate(log))  # a repeated point is not sampled again


def test_pruner_variants_are_replayed_from_the_grid_s_low_rungs_and_prune_where_they_check():
    """Pruner variants (rungs, reduction factor[, min_resource]): pruning at lower rungs the grid
    holds FID at; a pruned trial costs the samples of the rung it stopped at, which is a rung the
    pruner checks; each row says which pruner it ran."""
    grid = _bowl_grid()
    for point in grid.values():
        point["fid"].update({"63": point["fid"]["1000"] + 30, "125": point["fid"]["1000"] + 20})
    results = {"grid": grid, "settings": {"points": 11, "task": {"rungs": [250, 1000]}}}
    pruners = (((125, 1000), 8), ((63, 250, 1000), 4), ((63, 250, 1000), 4, 62))
    runs = BS.replays(results, ("random",), seeds=2, trials=30, pruners=pruners)
    assert sorted(runs) == ["random,off", "random,on,125-1000,rf8", "random,on,63-250-1000,rf4",
                            "random,on,63-250-1000,rf4,from62"]
    spent = lambda key: {t["samples"] for log in runs[key] for t in log}  # noqa: E731
    assert 125 in spent("random,on,125-1000,rf8") and spent("random,on,125-1000,rf8") <= {0, 125, 1000}
    assert spent("random,on,63-250-1000,rf4") <= {0, 63, 1000}  # 250 < 63 x 4: never checked
    assert {63, 250} <= spent("random,on,63-250-1000,rf4,from62") <= {0, 63, 250, 1000}  # 250 ≥ 62 x 4
    rows = {r["pruner"]: r for r in BS.search_efficiency(results, runs) if r["pruning"]}
    assert set(rows) == {BS.pruning_key(*p) for p in pruners} and rows["125-1000,rf8"]["reached"] >= 1


def test_replays_are_saved_and_rerun_only_when_the_grid_changes(tmp_path, monkeypatch):
    results = {"grid": _bowl_grid(points=3), "settings": {"points": 3, "task": {"rungs": [250, 1000]}}}
    path = tmp_path / "replays.json"
    pruners = (((250, 1000), 3),)
    first = BS.replays(results, ("random",), seeds=2, trials=4, path=path, pruners=pruners)
    more = BS.replays(results, ("random",), seeds=3, trials=4, path=path, pruners=pruners)
    assert {k: v[:2] for k, v in more.items()} == first  # more seeds add the missing ones, the first unchanged
    calls = []
    monkeypatch.setattr(BS, "replay_search", lambda *a: calls.append(a) or [])
    assert BS.replays(results, ("random",), seeds=2, trials=4, path=path, pruners=pruners) == first and not calls
    assert BS.replays(results, ("random",), seeds=3, trials=4, path=path, pruners=pruners) == more and not calls
    results["grid"]["1,1"]["fid"]["1000"] += 1  # a re-measured point: the saved replays no longer apply
    BS.replays(results, ("random",), seeds=2, trials=4, path=path, pruners=pruners)
    assert len(calls) == 4
    monkeypatch.setattr(BS, "search_code_digest", lambda: "changed")  # an edit to the objective or its parts
    BS.replays(results, ("random",), seeds=2, trials=4, path=path, pruners=pruners)
    assert len(calls) == 8


def test_the_search_code_digest_follows_code_not_comments_or_docstrings(monkeypatch):
    """Table 4's replays rerun when the search code changes, not when a comment or docstring does."""
    import inspect

    sources = {}
    monkeypatch.setattr(inspect, "getsource", lambda m: sources.get(m.__name__.rsplit(".", 1)[-1], "x = 1\n"))
    code = 'class C:\n    """a class"""\n\n    def f(self, x):\n        """doc"""\n        return x + 1  # one\n'
    sources["objective"] = code
    first = BS.search_code_digest()
    sources["objective"] = code.replace("doc", "other words").replace("# one", "# two").replace("a class", "C")
    assert BS.search_code_digest() == first
    sources["objective"] = code.replace("x + 1", "x + 2")
    assert BS.search_code_digest() != first
    sources["objective"], sources["study"] = code, code
    assert BS.search_code_digest() != first  # each module counts


def test_replays_run_the_search_s_own_objective_and_first_trials(monkeypatch):
    """Table 4 replays a search through the real objective: its enqueued first trials and its
    pruning rule (the baseline is never pruned) show in the replay, and a change to them does too."""
    from skiptune_search.search.space import Space

    grid = _bowl_grid(points=11)
    log = BS.replay_search(grid, 11, (250, 1000), "random", 0, 6, 3)
    assert [t["point"] for t in log[:2]] == ["1,1", "0.8,1"]  # the baseline, then the paper ramp
    assert log[0]["samples"] == 1000 and log[0]["value"] is not None
    monkeypatch.setattr(Space, "first_trials", lambda self, skips, optimizer: [("baseline", self.baseline(skips))])
    changed = BS.replay_search(grid, 11, (250, 1000), "random", 0, 6, 3)
    assert changed[0]["point"] == "1,1" and changed[1]["point"] != "0.8,1"


def test_reach_is_the_first_completed_trial_under_the_target():
    log = [{"value": 120, "samples": 1000}, {"value": None, "samples": 250}, {"value": 99, "samples": 1000}]
    assert BS._reach(log, 100) == (3, 2250)
    assert BS._reach(log, 50) == (None, None)


def test_picked_schedules_are_the_baseline_the_tpe_finds_and_random_points():
    grid = _bowl_grid()
    results = {"grid": grid, "settings": {"task": {"rungs": [250, 1000]}}}
    logs = [BS.replay_search(grid, 11, (250, 1000), "tpe", s, 20, 3) for s in range(2)]
    keys = BS.pick_schedules(results, logs, 20)
    assert len(keys) == len(set(keys)) == 20 and keys[0] == "1,1"
    found = {t["point"] for log in logs for t in log if t["value"] is not None}
    assert set(keys[1:10]) <= found
    # the TPE half holds the best points the replays completed
    assert grid[keys[1]]["fid"]["1000"] == min(grid[p]["fid"]["1000"] for p in found)


def test_proxy_fidelity_ranks_and_spreads():
    grid = _bowl_grid()
    keys = sorted(grid)[:12]
    truth = {}
    for k in keys:
        v = grid[k]["fid"]["1000"]
        blocks = [{"fid": {"250": v + 10 + d, "1000": v + d}, "kid": {"250": 1.0, "1000": 1.0 + d}, "fid_inf": v}
                  for d in (0.0, 2.0)]
        truth[k] = {"fid": v - 1, "blocks": blocks}
    rows = {r["proxy"]: r for r in BS.proxy_fidelity(grid, truth, (250, 1000), keys)}
    assert set(rows) == {"fid@250", "fid@1000", "fid_inf", "kid@250", "kid@1000"}
    # the proxies are monotone in the truth here, so every Spearman is 1
    assert all(r["spearman"] == pytest.approx(1.0) for r in rows.values())
    assert rows["fid@1000"]["seed_spread"] == pytest.approx(2 ** 0.5)  # stdev of (v, v + 2)
    assert rows["fid_inf"]["seed_spread"] == 0


def test_results_of_other_settings_are_refused(tmp_path, tiny_model_dir):
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=4, rungs=(2, 4)), batch_size=4, device="cpu")
    path = tmp_path / "grid.json"
    BS.save_results(path, {"settings": {"task": {"nfe": 5}, "points": 3, "placement": "input"}, "grid": {}})
    with pytest.raises(ValueError, match=r"other settings \(nfe: 5 \(now 3\)\); .* another folder") as info:
        BS.run_grid(evaluator, path, 3, "cmd", "test machine", progress=False)
    assert info.value.option == "work"  # the CLI names --work


def test_table_3_of_another_truth_n_is_refused_before_anything_is_measured(tmp_path, monkeypatch):
    from skiptune_search.bench import run as bench

    BS.save_results(tmp_path / "truth.json", {"settings": {"truth_n": 4000}, "truth": {}})
    monkeypatch.setattr(bench, "Evaluator", lambda *a, **k: pytest.fail("measured before the check"))
    with pytest.raises(ValueError, match="on 4,000 held-out samples per schedule, not 10,000: use 4000 to extend it") as info:
        bench.run_bench(False, tmp_path / "B.md", tmp_path, "m", 9, "cmd", tables=(1, 3))
    assert info.value.option == "truth_n"


def test_a_work_folder_another_bench_is_measuring_into_is_refused(tmp_path, monkeypatch):
    """Two runs measuring into one folder would interleave their trials: the second is refused
    before it measures, naming the first; rendering alone still works beside it."""
    import subprocess
    import sys

    from skiptune_search.bench import run as bench
    from skiptune_search.core.errors import SkiptuneError

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from skiptune_search.core.files import folder_lock\n"
        f"with folder_lock({str(tmp_path)!r}, 'the first bench'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(bench, "Evaluator", lambda *a, **k: pytest.fail("measured beside another run"))
        with pytest.raises(SkiptuneError, match=r"in use by the first bench \(pid \d+\); .* another folder"):
            bench.run_bench(False, tmp_path / "B.md", tmp_path, "m", 9, "cmd", tables=(1,))
        assert bench.run_bench(False, tmp_path / "B.md", tmp_path, "m", 9, "cmd", tables=()).exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(RuntimeError, match="measured"):  # the lock dies with its process
        monkeypatch.setattr(bench, "Evaluator", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("measured")))
        bench.run_bench(False, tmp_path / "B.md", tmp_path, "m", 9, "cmd", tables=(1,))


def test_an_interrupted_grid_resumes_with_only_the_missing_points(tmp_path, tiny_model_dir, monkeypatch):
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task

    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=4, rungs=(2, 4)), batch_size=4, device="cpu")
    path = tmp_path / "grid.json"
    calls = []
    real = evaluator.features

    def counting(schedule, *args, **kwargs):  # one call per rung: two per grid point
        calls.append(schedule)
        if len(calls) == 7 and interrupt:  # the fourth point's first rung
            raise RuntimeError("interrupted")
        return real(schedule, *args, **kwargs)

    interrupt = True
    monkeypatch.setattr(BS, "_scores", lambda rungs: {"fid": {"4": float(rungs[-1].features.sum())}})
    monkeypatch.setattr(evaluator, "features", counting)
    with pytest.raises(RuntimeError, match="interrupted"):
        BS.run_grid(evaluator, path, 3, "cmd", "test machine", progress=False)
    assert len(json.loads(path.read_text())["grid"]) == 3  # each finished point was saved
    calls.clear()
    interrupt = False
    results = BS.run_grid(evaluator, path, 3, "cmd", "other machine", progress=False)
    assert len(calls) == 2 * 6 and len(results["grid"]) == 9
    assert results["command"] == "cmd" and results["machines"] == ["test machine", "other machine"]
    from skiptune_search.bench.run import _header  # the table names both machines, not only the last

    assert _header(results).endswith("Measured in parts on 2 machines: test machine; other machine.")
    assert _header({"command": "cmd", "machine": "one"}).endswith("Machine: one.")  # files from before


def test_an_incomplete_grid_renders_what_it_has(tmp_path):
    from skiptune_search.bench.run import SIZES, write_markdown

    grid = {k: v for k, v in _bowl_grid(points=3).items() if k in ("1,1", "0.5,1")}
    BS.save_results(tmp_path / "grid.json", {"grid": grid, "command": "cmd", "machine": "m", "date": "d",
                                            "settings": {"points": 3, "placement": "input",
                                                         "task": {"rungs": [250, 1000], "seed": 0,
                                                                  "sampler": "heun", "nfe": 9}}})
    text = write_markdown(tmp_path / "B.md", tmp_path, SIZES[True]).read_text()
    assert "Grid incomplete: 2 of 9 points" in text and "baseline (1, 1): 110" in text
    assert "Best so far: FID 105 at (ρ_inner, ρ_outer) = (0.5,1)" in text
    assert text.count("Not measured yet") == 9  # tables 1, 2, 3, 5, 6, 7, 8 and 9, and table 4's every-family part


def _headline(rows, plan):
    return {"settings": {"model": "m", "trials": 16, "n": 1000, "rungs": [250, 1000], "truth_n": 10_000,
                         "held_out_seed": 2_000_000},
            "command": "skiptune-search bench --tables 5", "machine": "cpu box", "date": "2026-11-26", "nfe": rows,
            "plan": plan}


def test_headline_names_the_best_family_where_tuning_did_not_help_and_what_is_missing():
    from skiptune_search.bench.headline import render

    runs = lambda *fids: [{"seed": k, "held_out": f} for k, f in enumerate(fids)]  # noqa: E731
    rows = {"5": {"untuned": 100.0, "machines": ["cpu box"], "linear": runs(80.0, 90.0, 85.0),
                  "per_layer": runs(101.0, 110.0)},
            "9": {"untuned": 50.0, "machines": ["cpu box"], "linear": runs(49.0)}}
    text = "\n".join(render(_headline(rows, {"nfes": [5, 9, 19], "families": ["linear", "per_layer"], "seeds": 3})))
    # results from before the factor was recorded were pruned with 3
    assert "(N = 1000, rungs 250,1000, successive halving keeping the best third at 250, input placement" in text
    assert "| 5 | 100 | 85 ± 5 (-15.0%, 3 seeds) | 105.5 ± 6.36 (+5.5%, 2 seeds, one or more no better than untuned) |" in text
    assert "| 9 | 50 | 49 (-2.0%, 1 seed) | – |" in text
    assert "NFE 5: best family linear (-15.0% held-out FID); no gain from per_layer." in text
    assert "NFE 9: best family linear (-2.0% held-out FID); every family measured helped." in text
    assert ("Not measured yet: NFE 5 per_layer (2 of 3 search seeds); NFE 9 linear (1 of 3 search seeds); "
            "NFE 9 per_layer (0 of 3 search seeds); NFE 19.") in text
    assert "Machine: cpu box." in text


def test_headline_rows_measured_on_different_machines_say_which():
    from skiptune_search.bench.headline import render

    rows = {"5": {"untuned": 100.0, "machines": ["cpu box"], "linear": [{"seed": 0, "held_out": 90.0}]},
            "19": {"untuned": 60.0, "machines": ["gpu box"], "linear": [{"seed": 0, "held_out": 50.0}]}}
    text = "\n".join(render(_headline(rows, {"nfes": [5, 19], "families": ["linear"], "seeds": 1})))
    assert "Machines: NFE 5: cpu box; NFE 19: gpu box." in text
    assert "Not measured yet" not in text


def test_headline_says_what_a_search_and_a_held_out_score_took():
    from skiptune_search.bench.headline import render

    run = lambda seed, search, held=None: {"seed": seed, "held_out": 90.0,  # noqa: E731
                                           **({"search_seconds": search} if search else {}),
                                           **({"held_out_seconds": held} if held else {})}
    rows = {"5": {"untuned": 100.0, "machines": ["cpu box"], "linear": [run(0, 600.0), run(1, 1200.0), run(2, None)]},
            "9": {"untuned": 50.0, "untuned_seconds": 300.0, "machines": ["cpu box"],
                  "linear": [run(0, 900.0, 240.0), run(1, 1500.0, 360.0)]}}
    text = "\n".join(render(_headline(rows, {"nfes": [5, 9], "families": ["linear"], "seeds": 3})))
    assert ("Time each part took (medians of wall seconds on the row's machine, slower where other work shared it): "
            "NFE 5: a search 15.0 min (2 searches); "
            "NFE 9: a search 20.0 min (2 searches), 10,000 held-out samples scored 5.0 min (3 times).") in text
    rows["9"]["linear"] = [run(0, 900.0)]
    assert "NFE 9: a search 15.0 min (1 search), 10,000 held-out samples scored 5.0 min (1 time)." in \
        "\n".join(render(_headline(rows, {"nfes": [5, 9], "families": ["linear"], "seeds": 3})))


def test_freeu_table_compares_with_table_5_and_says_where_the_preset_hurt():
    from skiptune_search.bench.headline import render_freeu

    runs = lambda *fids: [{"seed": i, "held_out": f} for i, f in enumerate(fids)]  # noqa: E731
    calls = lambda *fids: [{**r, "window": "calls"} for r in runs(*fids)]  # noqa: E731  the window over model calls
    settings = _headline({}, {})["settings"]
    table5 = {"settings": settings, "plan": {"nfes": [5, 9], "families": ["linear", "per_noise"], "seeds": 2},
              "nfe": {"5": {"untuned": 100.0, "linear": runs(90.0, 92.0), "per_noise": runs(95.0, 95.0)},
                      "9": {"untuned": 50.0, "linear": runs(45.0, 47.0), "per_noise": runs(40.0, 42.0)}}}
    table8 = {**_headline({}, {}), "plan": {"nfes": [5, 9], "families": ["freeu_allsteps", "freeu", "linear_freeu"],
                                            "seeds": 2, "fixed": ["untuned", "freeu_preset"]},
              "freeu_preset": {"name": "SD1.5", "values": [1.5, 1.6, 0.9, 0.2], "why": "no published preset"},
              "nfe": {"5": {"untuned": 100.0, "freeu_preset": 120.0, "machines": ["cpu box"], "freeu_allsteps": runs(85.0, 87.0),
                            "taken_from": {"untuned": "headline.json"},
                            "freeu": calls(99.0, 101.0), "linear_freeu": calls(80.0, 82.0)},
                      "9": {"untuned": 50.0, "freeu_preset": 48.0, "machines": ["cpu box"], "freeu_allsteps": runs(49.0),
                            "freeu": runs(48.0, 49.0), "linear_freeu": calls(44.0, 46.0),
                            "linear_freeu@sigma_window": runs(47.0, 49.0)}}}
    text = "\n".join(render_freeu(table8, table5))
    # NFE 9's windowed FreeU still searched in σ (†); its linear ρ + FreeU re-measured over the calls, beside the old
    assert "| 48.5 ± 0.707 (-3.0%, 2 seeds) † | 45 ± 1.41 (-10.0%, 2 seeds) |" in text
    assert ("NFE 9 tuned linear ρ + FreeU: 45 ± 1.41 (-10.0%, 2 seeds) with the window over model calls, "
            "48 ± 1.41 (-4.0%, 2 seeds) with it searched in log σ.") in text
    assert "| 5 | 100 | 120 (+20.0%) | 86 ± 1.41 (-14.0%, 2 seeds) | 100 ± 1.41 (+0.0%, 2 seeds, one or more no " \
           "better than untuned) | 81 ± 1.41 (-19.0%, 2 seeds) | linear: 91 ± 1.41 (-9.0%, 2 seeds) |" in text
    assert "| 9 | 50 | 48 (-4.0%) | 49 (-2.0%, 1 seed) | " in text and "| per_noise: 41 ± 1.41 (-18.0%, 2 seeds) |" in text
    assert ("NFE 5: best tuned linear ρ + FreeU (-19.0% held-out FID), 5 FID ahead of tuned FreeU (every σ) "
            "(-14.0%), more than the larger std over search seeds (1.41); FreeU's preset hurt (+20.0%).") in text
    assert ("NFE 9: best tuned ρ (per_noise) (-18.0% held-out FID), 4 FID ahead of tuned linear ρ + FreeU (-10.0%), "
            "more than the larger std over search seeds (1.41); FreeU's preset helped (-4.0%).") in text
    table8["nfe"]["9"]["linear_freeu"] = runs(38.0, 46.0)  # mean 42 (-16.0%), 1 FID behind, std 5.66: not settled
    assert ("NFE 9: best tuned ρ (per_noise) (-18.0% held-out FID), 1 FID ahead of tuned linear ρ + FreeU (-16.0%), "
            "less than the larger std over search seeds (5.66)") in "\n".join(render_freeu(table8, table5))
    assert "Not measured yet: NFE 9 tuned FreeU (every σ) (1 of 2 search seeds)." in text
    assert "SD1.5's (b1, b2, s1, s2 = 1.5, 1.6, 0.9, 0.2) (no published preset)." in text
    assert "Untuned: table 5's numbers at NFE 5, scored here at the others; best ρ family: table 5's" in text
    # table 8 extended after the pruner joined its settings, table 5 not: the same protocol (3 before it was recorded)
    table8["settings"] = {**settings, "reduction_factor": 3}
    assert "| per_noise: 41 ± 1.41 (-18.0%, 2 seeds) |" in "\n".join(render_freeu(table8, table5))
    table8["settings"] = {**settings, "reduction_factor": 8}
    assert "best ρ family: not shown (table 5 was run with other settings" in "\n".join(render_freeu(table8, table5))
    table8["settings"] = settings
    table5["settings"] = {**settings, "trials": 8}  # table 5 of other settings: its numbers are not comparable
    other = "\n".join(render_freeu(table8, table5))
    assert other.count("| – |") == 2 and "best ρ family: not shown (table 5 was run with other settings" in other


TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
               cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_table_7_measures_an_architecture_and_lists_the_ones_without_a_checkout(monkeypatch):
    """Table 7's measurement on a small UNet2DConditionModel (the published sizes run in the
    benchmark and the slow tests): hooks timed, ρ = 1 exact, a σ-dependent schedule changes the
    output, the model's hooks all gone after; the table says which checkouts were not given."""
    from skiptune_search.bench import sizes

    built = []
    monkeypatch.setitem(sizes.ARCHITECTURES, "sd15", ("tiny SD", None, lambda ck, dev: built.append(
        sizes.build_sd(TINY_SD, "tiny", dev)) or built[-1]))
    r = sizes.measure("sd15", None, calls=2, device=torch.device("cpu"))
    assert (r["label"], r["skips"], r["arch"]) == ("tiny SD", 4, "UNet2DConditionModel")
    assert r["params"] == sum(p.numel() for p in built[0].model.parameters())
    assert r["rho1_exact"] and r["varying_changes"] and len(r["bare_s"]) == len(r["hooked_s"]) == 2
    assert r["hooks_rho1_s"] > 0 and r["hooks_varying_s"] > 0 and r["peak_bytes"] > 0
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in built[0].model.modules())
    text = "\n".join(sizes.render({"command": "c", "date": "d", "machine": "m", "calls": 2,
                                    "rows": {"sd15": r, "edm-adm64": {"label": "EDM", "missing": "NVlabs/edm"}}}))
    assert "| tiny SD | diffusers UNet2DConditionModel, tiny unet/config.json | 1x4x8x8 latent, 77x8 text | 4 | " in text
    assert "| yes | yes |" in text
    assert ("Not measured: SDXL base UNet (no result); EDM ADM ImageNet-64 (needs a checkout of NVlabs/edm); "
            "EDM2-img64-S (needs a checkout of NVlabs/edm2)") in text


def test_table_7_checkout_that_is_not_one_is_a_one_line_error(run, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("bench", "--tables", "7", "--uvit-path", tmp_path / "empty", "--work", tmp_path / "w")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: --uvit-path: {tmp_path / 'empty'} is not a checkout of baofff/U-ViT "
                                    "(no libs/uvit.py in it)"), result.output
    assert not (tmp_path / "w" / "sizes.json").exists()


def test_search_seconds_sums_the_trials_of_the_study(tmp_path):
    from skiptune_search.bench.headline import search_seconds

    storage = make_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=None)
    study = optuna.create_study(study_name="s", storage=storage)
    for seconds in (10.0, 2.5):
        trial = study.ask()
        trial.set_user_attr("wall_seconds", seconds)
        study.tell(trial, 1.0)
    assert search_seconds(study) == 12.5


def test_held_out_searches_run_seed_by_seed_across_nfes_and_resume_where_stopped(tmp_path, monkeypatch):
    """Searches go seed by seed (every NFE and method at seed 0 before any at seed 1), so a run
    stopped early leaves a whole picture at fewer seeds; a rerun starts at the search it lost."""
    from types import SimpleNamespace

    from skiptune_search.bench import headline as H

    searched, factors = [], []

    class Stop(Exception):
        pass

    class FakeEvaluator:
        def __init__(self, task, batch_size):
            self.task, self.controller = task, SimpleNamespace(unet=None)

        def score(self, schedule, rungs, seeds, progress, kid):
            yield SimpleNamespace(fid=float(len(searched)))

    def fake_search(evaluator, study, space, trials, progress):
        if len(searched) == stop_at:
            raise Stop
        searched.append(study)

    for name, value in {"Evaluator": FakeEvaluator, "weights_fingerprint": lambda unet: "w",
                        "make_storage": lambda url, heartbeat: None, "fixed_schedule": lambda ev, name: name,
                        "method_space": lambda ev, method: SimpleNamespace(searches_calls=False),
                        "run_search": fake_search,
                        "open_study": lambda storage, name, task, space, ctl, seed, warm_start, reduction_factor:
                        factors.append(reduction_factor) or name,
                        "export_best": lambda study, url: SimpleNamespace(metric={"value": 1.0, "baseline": 2.0},
                                                                          params={}),
                        "search_seconds": lambda study: 0.0}.items():
        monkeypatch.setattr(H, name, value)
    path = tmp_path / "h.json"

    def run_it():
        H.run_headline("m", (5, 9), path, "c", "box", seeds=2, trials=4, n=8, rungs=(8,), reduction_factor=3,
                       truth_n=8, batch=8, methods=("a", "b"), progress=False)

    stop_at = 5
    with pytest.raises(Stop):
        run_it()
    assert searched == ["headline-nfe5-a-seed0", "headline-nfe5-b-seed0", "headline-nfe9-a-seed0",
                        "headline-nfe9-b-seed0", "headline-nfe5-a-seed1"]
    saved = json.loads(path.read_text())["nfe"]
    assert [len(saved[nfe][m]) for nfe in ("5", "9") for m in ("a", "b")] == [2, 1, 1, 1]
    assert {nfe: row["untuned"] for nfe, row in saved.items()} == {"5": 0.0, "9": 0.0}  # fixed ones first
    stop_at = None
    run_it()
    assert searched[5:] == ["headline-nfe5-b-seed1", "headline-nfe9-a-seed1", "headline-nfe9-b-seed1"]
    saved = json.loads(path.read_text())["nfe"]
    assert [[r["seed"] for r in saved[nfe][m]] for nfe in ("5", "9") for m in ("a", "b")] == [[0, 1]] * 4
    assert set(factors) == {3} and json.loads(path.read_text())["settings"]["reduction_factor"] == 3  # as asked


def test_headline_names_searches_that_ran_without_their_baseline_trial():
    from skiptune_search.bench.headline import render

    rows = {"9": {"untuned": 50.0, "machines": ["cpu box"],
                  "linear": [{"seed": 0, "held_out": 40.0, "search_baseline": 55.0},
                             {"seed": 1, "held_out": 41.0, "search_baseline": None}]}}
    text = "\n".join(render(_headline(rows, {"nfes": [9], "families": ["linear"], "seeds": 2})))
    assert "Searches with no completed ρ = 1 trial: NFE 9 linear seed 1 (" in text


def test_a_trial_left_running_by_a_killed_run_is_failed_and_queued_again(tmp_path, tiny_unet):
    """A killed run (headline or search, no heartbeat) leaves its trial RUNNING; the next open of
    the study on this host sees its process is gone, fails it and queues the same parameters
    with the baseline mark. A trial of a live process is left alone."""
    import socket
    import subprocess

    from skiptune_search import SkipController
    from skiptune_search.scoring.task import Task
    from skiptune_search.search.space import Space
    from skiptune_search.search.study import open_study

    storage = make_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=None)
    space, task, controller = Space("per_level", "input", (0.5, 1.5)), Task(nfe=3, n=4), SkipController(tiny_unet)
    study = open_study(storage, "s", task, space, controller, 0)
    left_running = study.ask()  # the baseline, when the run was killed
    dead = subprocess.Popen(["true"])
    dead.wait()
    left_running.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    alive = subprocess.Popen(["sleep", "30"])
    try:
        other = study.ask()  # a trial of a process still running
        other.set_user_attr("worker", {"host": socket.gethostname(), "pid": alive.pid})
        study = open_study(storage, "s", task, space, controller, 0)
        states = [t.state for t in study.trials]
        assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING,
                          optuna.trial.TrialState.WAITING]
        assert study.trials[-1].user_attrs.get("baseline") and study.trials[-1].user_attrs["retry_of"] == 0
        assert study.trials[-1].params == study.trials[0].params
    finally:
        alive.kill()


def test_samples_saved_by_pruning_compare_each_search_seed_with_itself(tmp_path, monkeypatch):
    """A seed that reached the target only without pruning is left out of the comparison; each
    optimizer's own default pruning's rows (TPE's a third at N/8, CMA-ES's an eighth), then each
    variant the grid holds FID for, then no pruning."""
    from skiptune_search.bench import run as bench
    from skiptune_search.scoring.task import default_rungs
    from skiptune_search.search.optimizers import default_reduction_factor, pruning_text

    grid = {"grid": _bowl_grid(), "settings": {"points": 11, "placement": "input", "task": {
        "rungs": [250, 1000], "seed": 0, "sampler": "heun", "nfe": 9}}, "command": "c", "machine": "m", "date": "d"}
    default = BS.pruning_key(default_rungs(1000), default_reduction_factor("tpe"))  # TPE's for the grid's N
    row = {"optimizer": "tpe", "seeds": 3, "median_trials": 5, "median_best_at_default": 100,
           "median_samples_at_default": 1}
    rows = [{**row, "pruning": True, "pruner": default, "reached": 2, "median_samples": 600,
             "samples_to_target": [500, None, 700]},
            {**row, "pruning": True, "pruner": "250-1000,rf3", "reached": 3, "median_samples": 800,
             "samples_to_target": [900, 200, 800]},
            {**row, "pruning": False, "pruner": None, "reached": 3, "median_samples": 900,
             "samples_to_target": [1000, 200, 1000]},
            {**row, "optimizer": "gp", "pruning": True, "pruner": default, "reached": 1, "median_samples": 400,
             "samples_to_target": [400, None, None]},
            {**row, "optimizer": "gp", "pruning": False, "pruner": None, "reached": 3, "median_samples": 900,
             "samples_to_target": [1000, 200, 1000]}]
    asked = []
    monkeypatch.setattr(BS, "replays", lambda *a, **k: asked.append(a) or {})
    monkeypatch.setattr(BS, "search_efficiency", lambda *a, **k: rows)
    size = {"replay_seeds": 3, "trials": 60, "pruners": (((250, 1000), 3), ((63, 1000), 3))}
    for point in grid["grid"].values():
        point["fid"]["125"] = point["fid"]["1000"] + 20
    lines = bench._table4(grid, size, tmp_path)
    text = "\n".join(lines)
    # the grid holds no FID at 63: that variant is not replayed
    assert asked[-1][2] == 3 and asked[-1][5] == ((default_rungs(1000), 3), (default_rungs(1000), 8), ((250, 1000), 3))
    assert "tpe 40% (2 seeds)." in text  # seeds 0 and 2: 50% and 30% saved
    assert "| tpe | on | 2/3 |" in text and "| tpe | off | 3/3 |" in text and "250-1000" not in text
    assert (f"pruning on: rungs 125,1000, each optimizer's own pruning, the tool's default for N = 1000 (tpe, "
            f"random: {pruning_text((125, 1000), 3)}; cmaes: {pruning_text((125, 1000), 8)}; gp: no pruning)") in text
    variants = [line for line in lines if line.startswith("| tpe |")][2:]  # after the rows of the first table
    assert variants == [
        f"| tpe | {','.join(map(str, default_rungs(1000)))} | {pruning_text(default_rungs(1000), 3)} (default) | "
        f"2/3 | 5 | 600 | 40% |",
        "| tpe | 250,1000 | successive halving keeping the best third at 250 (the default before) | 3/3 | 5 | 800 | "
        "10% |",  # 10%, 0%, 20%
        "| tpe | 1000 | none | 3/3 | 5 | 900 | – |"]
    # GP's own pruning is none: its row comes first
    assert [line.split(" | ")[2] for line in lines if line.startswith("| gp |")][-2:] == [
        "none (default)", pruning_text(default_rungs(1000), 3)]
    for point in grid["grid"].values():
        del point["fid"]["125"]
    assert "pruning on not replayed yet: the grid lacks FID at 125 samples" in "\n".join(bench._table4(grid, size,
                                                                                                    tmp_path))
    assert asked[-1][5] == (((250, 1000), 3),)


def test_saved_results_of_other_weights_are_refused_and_older_files_without_them_extend():
    old = {"task": {"nfe": 9}, "points": 11}
    assert BS.settings_differences(old, {"task": {"nfe": 9}, "points": 11, "weights": "ab"}) == []  # not recorded then
    assert BS.settings_differences({**old, "weights": "ab"}, {"task": {"nfe": 9}, "points": 11, "weights": "cd"}) == [
        "weights: ab (now cd)"]


def test_table_3_of_truth_and_grid_from_different_tasks_is_not_rendered():
    from skiptune_search.bench import run as bench

    grid = {"settings": {"task": {"nfe": 9, "rungs": [250, 1000]}}, "grid": _bowl_grid()}
    truth = {"settings": {"task": {"nfe": 5, "rungs": [250, 1000]}}, "truth": {}, "command": "c", "machine": "m"}
    assert "different tasks (nfe: 9 (now 5))" in bench._table3(grid, truth, bench.SIZES[False])[-1]


def test_overhead_verdict_says_when_the_machine_is_too_noisy_to_tell():
    """Table 1's verdict: met or not met only when the 95% interval of the median ratio is on one
    side of 1.02; otherwise it says the noise hides a 2% difference."""
    from skiptune_search.bench.run import _overhead_verdict, _ratio_intervals, median_interval

    assert median_interval(list(range(15, 0, -1))) == (4, 12)  # k = 4: P(B(15, 1/2) ≤ 3) = 1.8%
    assert median_interval(list(range(1, 10))) == (2, 8)
    assert median_interval([1.0] * 5) is None  # 2 × 1/32 > 5%: no interval from 5 repeats

    def verdict(ratios):
        base = [10.0 + k for k in range(len(ratios))]
        rows = [{"variant": "no controller", "ratio": 1.0, "times": base},
                {"variant": "input, ρ = 1", "ratio": sorted(ratios)[len(ratios) // 2],
                 "times": [b * q for b, q in zip(base, ratios)]}]
        return _overhead_verdict(rows, _ratio_intervals(rows))[1]

    assert "target ≤ 1.02x: met)" in verdict([1.0 + 0.001 * k for k in range(15)])
    assert "target ≤ 1.02x: not met)" in verdict([1.05 + 0.001 * k for k in range(15)])
    assert "not resolved here, its interval 0.960-1.120x holds 1.02" in verdict([0.9 + 0.02 * k for k in range(15)])
    assert "met by the medians, though an interval reaches 1.050x" in verdict([0.94 + 0.01 * k for k in range(15)])


def test_hook_cost_finds_a_known_delay_in_the_hooks(tiny_model_dir, monkeypatch):
    """Hooks made 20 ms slower per model call show up as about 20 ms extra per call (timing noise
    on a busy machine is a few ms), and the controller is left attached, at ρ = 1."""
    import time

    from skiptune_search.bench.run import hook_cost
    from skiptune_search.scoring.evaluator import Evaluator
    from skiptune_search.scoring.task import Task
    from skiptune_search.core.controller import SkipController

    evaluator = Evaluator(Task(model=str(tiny_model_dir), nfe=3, n=2), batch_size=2, device="cpu")
    ctl = evaluator.controller
    skips = len(ctl.skips)
    plain = SkipController._input_hook

    def slow_input_hook(self, index):
        hook = plain(self, index)
        return lambda *a: (time.sleep(0.02 / skips), hook(*a))[1]

    monkeypatch.setattr(SkipController, "_input_hook", slow_input_hook)
    ctl.detach()
    result = hook_cost(evaluator, calls=3, repeats=4)
    assert result["calls"] == 3 and len(result["extra"]) == 4
    assert all(e > 0.01 for e in result["extra"]) and result["bare_s"] > 0
    assert 0.015 <= result["extra_s"] < 0.1
    assert ctl._handles and ctl.schedule.is_identity()


def test_per_call_verdict_scales_the_hook_cost_to_a_call_at_the_tables_batch():
    from skiptune_search.bench.run import _per_call_verdict

    def line(extra_s):  # 1 s for 250 images in one batch at NFE 10: 0.1 s per call
        return _per_call_verdict({
            "n": 250, "task": {"batch": 250, "nfe": 10},
            "rows": [{"variant": "no controller", "median_s": 1.0}],
            "per_call": {"calls": 50, "repeats": 9, "bare_s": 0.02, "extra_s": statistics.median(extra_s),
                         "extra": extra_s}})[0]

    met = line([1e-4 * (1 + k / 10) for k in range(9)])  # 0.1-0.18 ms on a 100 ms call
    assert "adds 140 µs (95% interval 110 to 170 µs)" in met and "adds 0.14% of it, at most 0.17%" in met
    assert "a call takes 0.100 s (1.00 s over 10 calls)" in met and met.endswith("(target ≤ 2%: met).")
    assert line([3e-3] * 9).endswith("not met).")  # 3% of a call, however tight
    assert line([1e-3 * k for k in range(9)]).endswith("not resolved here).")  # 0-8 ms: 0.1%-8%
    assert "too few pairs for an interval" in line([1e-4] * 3)


def test_gpu_table_states_each_speedup_and_survives_out_of_memory():
    from skiptune_search.bench.gpu import render

    def row(batch, precision, layout, rate):
        return {"batch": batch, "precision": precision, "memory_format": layout, "images_per_s": rate,
                "trial_s": None if rate is None else 1000 / rate}

    r = {"command": "c", "date": "d", "machine": "m", "quick": False, "params": 2e8, "nfe": 9, "n": 1000,
         "scoring_s": 1.0, "tf32": {"convolutions": True, "matmuls": False},
         "rows": [row(256, "fp32", "contiguous", 50.0), row(256, "bf16 autocast", "contiguous", 90.0),
                  row(1024, "fp32", "contiguous", 60.0), row(1024, "bf16 autocast", "contiguous", None),
                  row(256, "fp32", "channels_last", 40.0)]}
    text = "\n".join(render(r))
    assert "| 1024 | bf16 autocast | contiguous | out of memory | – |" in text
    assert "bf16 autocast contiguous / fp32 at batch 256: 1.80x" in text
    assert "fp32 channels_last / contiguous at batch 256: 0.80x" in text
    assert "at batch 1024" not in text  # no ratio with a row that ran out of memory
    old = dict(r, rows=[{k: v for k, v in x.items() if k != "memory_format"} for x in r["rows"][:2]])
    assert "| 256 | fp32 | contiguous | 50.0 | 20.0 |" in "\n".join(render(old))  # gpu.json before memory formats


def test_a_queued_trial_killed_before_it_suggested_anything_keeps_its_parameters(tmp_path, tiny_unet):
    """The baseline killed right after it started (its ρ still only queued, not suggested) is queued
    again with ρ = 1, not as an empty trial that the optimizer would fill with its own values."""
    import socket
    import subprocess

    from skiptune_search import SkipController
    from skiptune_search.scoring.task import Task
    from skiptune_search.search.space import Space
    from skiptune_search.search.study import open_study

    storage = make_storage(f"sqlite:///{tmp_path}/h.db", heartbeat=None)
    space, task, controller = Space("linear", "input", (0.5, 1.5)), Task(nfe=3, n=4), SkipController(tiny_unet)
    study = open_study(storage, "s", task, space, controller, 0)
    started = study.ask()  # the baseline: RUNNING, its parameters not suggested yet
    assert started.params == {}
    dead = subprocess.Popen(["true"])
    dead.wait()
    started.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    study = open_study(storage, "s", task, space, controller, 0)
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == started.number)
    assert retry.user_attrs["baseline"] and retry.system_attrs["fixed_params"] == {"rho_inner": 1.0, "rho_outer": 1.0}


def test_search_cost_runs_every_search_once_sampling_each_schedule_once(tmp_path, tiny_model_dir, monkeypatch):
    """Table 4's per-family part: real searches per method, optimizer and pruning, then a method's
    pruning variants; a schedule any of them scored before (the untuned model first of all) is not
    sampled again, and a rerun of a finished plan samples nothing; the table renders every row with
    its target."""
    from skiptune_search.bench import cost as C
    from skiptune_search.scoring import evaluator as E
    from skiptune_search.scoring.evaluator import Evaluator

    sampled, labels = [], []
    score = Evaluator.score

    def counting(self, schedule, *args, **kwargs):
        sampled.append((schedule.rho, schedule.freeu))
        labels.append(kwargs.get("progress"))
        yield from score(self, schedule, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "score", counting)
    # what is tested is which searches run and what is sampled: a cheap stand-in for FID's 1280-d matrix root
    monkeypatch.setattr(E, "fid_from_features", lambda features, reference: float(features.double().mean().abs()))
    path = tmp_path / "cost.json"

    def run_it(progress=False):
        return C.run_cost(str(tiny_model_dir), path, "c", "box", nfe=3, methods=("linear", "freeu"),
                          optimizers=("random",), seeds=1, trials=3, n=8, rungs=(4, 8), reduction_factor=3, blocks=2,
                          batch=8, variants=(((2, 8), 3, None, ("random",)),), progress=progress)

    results = run_it(progress=True)
    # each trial's bar says which search of the plan it belongs to
    assert labels[0] == "search 1/4 (linear, random, pruning on, seed 0), trial 1/3"
    assert "search 4/4 (freeu, random, pruning off, seed 0), trial 3/3" in labels
    # method by method, each followed by its spread (the untuned model's first): its rows final at once;
    # then its pruning variants
    firsts = [label.split(",")[0].split(" block")[0] for label in labels]  # what sampled, in order
    assert [f for i, f in enumerate(firsts) if f not in firsts[:i]] == [
        "search 1/4 (linear", "search 2/4 (linear", "spread untuned", "spread linear", "variant 1/2 (linear",
        "search 3/4 (freeu", "search 4/4 (freeu", "spread freeu", "variant 2/2 (freeu"]
    assert "variant 1/2 (linear, random, rungs 2,8 rf3, seed 0), trial 1/3" in labels
    assert sorted(results["runs"]) == ["freeu,random,off", "freeu,random,on", "linear,random,off", "linear,random,on"]
    assert sorted(results["variants"]) == ["freeu,random,2-8,rf3", "linear,random,2-8,rf3"]
    assert all(t["samples"] in (0, 2, 8) for logs in results["variants"].values() for t in logs[0]["trials"])
    assert any(t["samples"] == 2 for logs in results["variants"].values() for t in logs[0]["trials"])  # pruned at 2
    logs = {k: v[0]["trials"] for k, v in results["runs"].items()}
    assert all(len(log) == 3 for log in logs.values())
    assert all(t["samples"] in (0, 4, 8) for log in logs.values() for t in log)
    untuned = [r for r, f in sampled if f is None and all(v == 1.0 for row in r for v in row)]
    # the untuned model: once in the searches (every search's first trial), 2 held-out blocks for its
    # spread, and once more for the variants, whose first rung (2) no search scored
    assert len(untuned) == 1 + 2 + 1
    assert set(results["spread"]) == {"untuned", "linear", "freeu"}
    assert all(len(s["fids"]) == 2 for s in results["spread"].values())
    before = len(sampled)
    assert run_it()["runs"] == results["runs"] and len(sampled) == before  # a finished plan: nothing sampled
    # a variant for some methods only is searched on those alone
    more = C.run_cost(str(tiny_model_dir), path, "c", "box", nfe=3, methods=("linear", "freeu"), optimizers=("random",),
                      seeds=1, trials=3, n=8, rungs=(4, 8), reduction_factor=3, blocks=2, batch=8,
                      variants=(((2, 8), 3, None, ("random",)), ((4, 8), 8, ("linear", "per_level"), ("random",))),
                      progress=False)  # per_level: not a method of this run, so not planned either
    assert sorted(more["variants"]) == ["freeu,random,2-8,rf3", "linear,random,2-8,rf3", "linear,random,4-8,rf8"]
    assert more["plan"]["variants"] == {"2-8,rf3": {"methods": ["linear", "freeu"], "optimizers": ["random"]},
                                        "4-8,rf8": {"methods": ["linear"], "optimizers": ["random"]}}
    C.save_results(path, results)  # back to the first plan for what follows
    # a method's pick beside the search before issue 27 (TPE, rungs N/4 and N keeping a third): the
    # medians of samples to the same target, and whether the pick spends fewer
    before = json.loads(path.read_text())
    assert C.before_key(8) == "2-8,rf3"
    before["variants"]["linear,tpe,2-8,rf3"] = before["variants"]["linear,random,2-8,rf3"]
    first = before["variants"]["linear,tpe,2-8,rf3"][0]["trials"][0]["samples"]  # the untuned model, never pruned
    pick = {"method": "linear", "target": float("inf"), "median_samples": first - 1, "reached": 1, "seeds": 1}
    assert C.versus_before(before, pick) == (f"{first - 1:,} (1/1 seeds) against {first:,} (1/1): fewer", "fewer")
    assert C.versus_before(before, pick | {"median_samples": first})[1] == "not fewer"
    assert C.versus_before(before, pick | {"reached": 0})[1] == "at fewer search seeds"  # whatever its samples
    assert C.versus_before(before, pick | {"target": float("-inf")}) == (
        f"{first - 1:,} (1/1 seeds); the search before issue 27 reached the target at no search seed", None)
    assert C.versus_before(before | {"plan": before["plan"] | {"seeds": 2}}, pick) == (f"{first - 1:,} (1/1 seeds)",
                                                                                       None)  # not every seed yet
    assert C.versus_before(results, pick) == (f"{first - 1:,} (1/1 seeds)", None)  # never searched
    text = "\n".join(C.render(json.loads(path.read_text())))
    assert "| linear | random |" in text and "| freeu | random |" in text and "Not measured yet" not in text
    assert "The searches took " in text and "so far" not in text
    assert "Pruning variants" in text
    # rungs N/4 and N keeping a third: how every search pruned before issue 27, and the row says so
    assert "| linear | random | 2,8: successive halving keeping the best third at 2 (the search before issue 27) |" in text
    assert "Issue 27's targets per method. The pick:" in text
    # random's own pruning is the protocol's; the tool searches linear with CMA-ES, freeu (windowed) with GP
    assert "| linear | random, successive halving keeping the best third at 4 | 1/1 | " in text
    assert text.count(" | cmaes |\n") == 1 and "| freeu | random, successive" in text and " | gp |\n" in text
    # an optimizer whose own pruning is not the protocol's is picked from the variant row with it, once it has one
    other = json.loads(path.read_text())
    other["settings"]["reduction_factor"] = 8
    text = "\n".join(C.render(other))  # no search with random's own pruning (a third at 4): no candidate, no pick
    assert "| linear | random," not in text and "| linear | none" not in text
    other["plan"]["variants"]["4-8,rf3"] = {"methods": ["linear"], "optimizers": ["random"]}
    assert "| linear | random," not in "\n".join(C.render(other))  # planned, not searched yet: undecided
    other["variants"]["linear,random,4-8,rf3"] = other["runs"]["linear,random,on"]
    text = "\n".join(C.render(other))
    assert "| linear | random, successive halving keeping the best third at 4 |" in text and "Not a candidate" not in text
    # a method under way (its search running, no spread yet) renders no row, only what is missing
    under_way = json.loads(path.read_text())
    under_way["plan"]["methods"].append("per_level")
    under_way["plan"]["variants"]["2-8,rf3"]["methods"].append("per_level")
    under_way["runs"] |= {"per_level,random,on": under_way["runs"]["linear,random,on"], "per_level,random,off": []}
    text = "\n".join(C.render(under_way))
    assert "| per_level |" not in text and "per_level random pruning off (0 of 1 seeds)" in text
    assert "Searches so far took " in text
    assert "per_level random successive halving keeping the best third at 2 (0 of 1 seeds)" in text
    assert "without pruning (successive" not in text  # a variant of every method names none
    # a variant searched on some methods only: the others are not missing it, and the table says so
    under_way["plan"]["variants"]["2-8,rf3"]["methods"] = ["linear"]
    text = "\n".join(C.render(under_way))
    assert "freeu random successive" not in text and "per_level random successive" not in text
    assert "without pruning (successive halving keeping the best third at 2 on linear only)." in text
    under_way["plan"]["seeds"] = 2  # a variant with a seed to go renders no row yet
    text = "\n".join(C.render(under_way))
    assert ("| linear | random | 2,8:" not in text
            and "linear random successive halving keeping the best third at 2 (1 of 2 seeds)" in text)
    # a method whose every optimizer missed its target at every seed (pruning on) has no pick, and says so
    missed = json.loads(path.read_text())
    best = min(t["value"] for logs in missed["runs"].values() for log in logs for t in log["trials"]
               if t["value"] is not None)
    for key in ("linear,random,on", "freeu,random,on"):
        for t in missed["runs"][key][0]["trials"]:
            t["value"] = None if t["value"] is None else best + 10 ** 6  # far above any target
    text = "\n".join(C.render(missed))
    assert ("| linear | none: no optimizer, with its own pruning, reached it at any search seed | – | – | – | – | cmaes |" in text
            and "| linear | random |" in text)
    assert ("N = 8 (rungs 4,8, successive halving keeping the best third at 4, CMA-ES counting a pruned trial "
            "toward its generation at its rung's FID; pruning off: N only)") in text
    from skiptune_search.core.errors import InputError

    saved = json.loads(path.read_text())
    del saved["settings"]["reduction_factor"]  # results from before the factor was recorded: pruned with 3
    BS.save_results(path, saved)
    with pytest.raises(InputError, match=r"of other settings \(reduction_factor: 3 \(now 8\)\)"):
        C.run_cost(str(tiny_model_dir), path, "c", "box", nfe=3, methods=("linear", "freeu"), optimizers=("random",),
                   seeds=1, trials=3, n=8, rungs=(4, 8), reduction_factor=8, blocks=2, batch=8, progress=False)


def test_a_method_s_pick_meets_more_of_issue_27_s_targets_then_needs_fewest_trials(monkeypatch):
    """Of the optimizers reaching a method's target at every seed: the one meeting more of its
    trial target and fewer samples than the search before issue 27, then the fewest trials."""
    from skiptune_search.bench import cost as C

    tpe = {"method": "linear", "optimizer": "tpe", "median_trials": 12, "median_samples": 4248}
    cmaes = {"method": "linear", "optimizer": "cmaes", "median_trials": 18, "median_samples": 3306}
    fewer = {"cmaes"}
    monkeypatch.setattr(C, "versus_before", lambda results, row: ("", "fewer" if row["optimizer"] in fewer
                                                                   else "not fewer"))
    assert C.pick_of({}, [tpe, cmaes]) is cmaes  # fewer samples than before: one target met against none
    fewer = {"cmaes", "tpe"}
    assert C.pick_of({}, [cmaes, tpe]) is tpe  # as many targets met: the fewest trials
    fewer = {"cmaes"}
    assert C.pick_of({}, [cmaes, tpe | {"median_trials": 10}])["optimizer"] == "tpe"  # ≤ 10 trials: one target each
    assert C.pick_of({}, [cmaes | {"median_trials": 12}, tpe])["optimizer"] == "cmaes"  # one target against none


def test_where_no_optimizer_reached_a_target_at_every_seed_the_pick_is_the_one_reaching_it_at_most(monkeypatch):
    """The pick is among the optimizers reaching the target at the most search seeds; none where no
    optimizer reached it at any; undecided while an optimizer's row is still to come."""
    from skiptune_search.bench import cost as C

    rows = {"tpe": {"method": "freeu", "optimizer": "tpe", "reached": 1, "seeds": 3, "median_trials": 5,
                    "median_samples": 1000},
            "gp": {"method": "freeu", "optimizer": "gp", "reached": 2, "seeds": 3, "median_trials": 24,
                   "median_samples": 12000},
            "cmaes": {"method": "freeu", "optimizer": "cmaes", "reached": 0, "seeds": 3, "median_trials": None,
                      "median_samples": None}}
    results = {"plan": {"optimizers": ["tpe", "gp", "cmaes"]}}
    monkeypatch.setattr(C, "own_pruning_planned", lambda results, method, optimizer: True)
    monkeypatch.setattr(C, "default_pruning_row", lambda results, method, optimizer, by_key: rows[optimizer])
    monkeypatch.setattr(C, "versus_before", lambda results, row: ("", "fewer"))
    assert C.pick_row(results, "freeu", {}) == ("pick", rows["gp"])  # 2 seeds against 1, in more trials
    rows["tpe"]["reached"] = 2
    assert C.pick_row(results, "freeu", {}) == ("pick", rows["tpe"])  # as many seeds: the fewest trials
    rows["tpe"] |= {"reached": 3, "seeds": 4}  # results holding a seed more than the plan: the share counts
    rows["gp"] |= {"reached": 3}
    assert C.pick_row(results, "freeu", {}) == ("pick", rows["gp"])  # every seed against 3 of 4
    rows["tpe"]["seeds"] = 3
    rows["tpe"]["reached"] = rows["gp"]["reached"] = 0
    assert C.pick_row(results, "freeu", {}) == ("none", None)
    rows["gp"] = None
    assert C.pick_row(results, "freeu", {}) is None
    assert C.trials_text(rows["tpe"] | {"reached": 1}) == "5, at 1 of 3 search seeds (≤ 25: not at every seed)"
    assert C.trials_text(rows["tpe"] | {"reached": 3, "median_trials": 26}) == "26 (≤ 25: missed by 1)"
    # each search's best FID, which the nearest-to-target table shows where no row reached it at every seed
    logs = [{"trials": [{"value": 3100.0, "samples": 500}, {"value": None, "samples": 62},
                        {"value": 3000.0, "samples": 500}]}, {"trials": [{"value": None, "samples": 62}]}]
    summary = C.reach_summary(logs, 3050.0)
    assert summary["bests"] == [3000.0, None] and summary["reached"] == 1 and summary["median_trials"] == 3


def test_table_4_says_how_near_issue_27_s_targets_any_search_came(monkeypatch):
    """Beside each method's pick: how many of random's proposals reached the target, the fewest median
    trials of any optimizer and pruning reaching it at every seed, and the most any pruning saved at
    every seed in no more trials than without."""
    from skiptune_search.bench import cost as C

    def row(optimizer, pruning, trials, samples, reached=3, seeds=3):
        return {"method": "linear", "optimizer": optimizer, "pruning": pruning, "median_trials": trials,
                "median_samples": samples, "reached": reached, "seeds": seeds, "samples_to_target": [samples] * seeds,
                "best": 3033.3, "target": 3054.2}

    cmaes, tpe, gp = row("cmaes", True, 18, 3000), row("tpe", True, 12, 3000), row("gp", True, 9, 1000, reached=2)
    by_key = {(r["method"], r["optimizer"], r["pruning"]): r
              for r in (cmaes, row("cmaes", False, 25, 12000), tpe, row("tpe", False, 11, 6000), gp,
                        row("gp", False, 20, 10000))}
    queued = [{"params": {"rho": 1.0}, "value": 3000.0}]  # the same at every seed: not random's proposal
    runs = {"linear,random,off": [{"trials": queued + [{"params": {"rho": r}, "value": v} for r, v in trial_values]}
                                  for trial_values in ([(0.6, 3054.2), (0.7, 3100.0)], [(0.8, 3200.0), (0.9, None)],
                                                       [(1.1, 3000.0), (1.2, 3300.0)])]}
    results = {"plan": {"methods": ["linear"], "seeds": 3}, "settings": {"rungs": [62, 500], "reduction_factor": 8},
               "variants": {}, "runs": runs}
    pick = cmaes
    monkeypatch.setattr(C, "pick_row", lambda results, method, by_key: ("pick", pick))
    # gp pruned reached 9 trials at 2 seeds only; tpe pruned saved 50% but in more trials than without
    assert C.nearest_lines(results, by_key)[-1] == (
        "| linear | 2 of 5 | 18 (≤ 10: missed by 8) | 11: tpe, no pruning | 75% (≥ 50%: met); 18 trials against 25 "
        "without | 75%: cmaes, successive halving keeping the best eighth at 62 |")
    pick = tpe
    assert "| 50% (≥ 50%: in more trials); 12 trials against 11 without |" in C.nearest_lines(results, by_key)[-1]
    # a variant row counts as the main rows do: here the fewest trials, and short of half in as many as without
    trials = [{"params": {"rho": 1.0}, "value": 3000.0, "samples": 4000}]
    results["variants"] = {"linear,tpe,62-500,rf3": [{"trials": trials}] * 3}
    monkeypatch.setattr(C, "summary_row", lambda results, method, optimizer, pruning, logs: row(
        optimizer, pruning, 1, 4000))
    last = C.nearest_lines(results, by_key)[-1]
    assert "| 1: tpe, successive halving keeping the best third at 62 |" in last and "| 75%: cmaes," in last
    pick = row("tpe", True, 11, 4000)
    assert "| 33% (≥ 50%: short by 17 points); 11 trials against 11 without |" in C.nearest_lines(results, by_key)[-1]
    results["variants"] = {}
    by_key[("other", "cmaes", True)] = by_key.pop(("linear", "cmaes", True)) | {"method": "other"}  # the only saving
    pick = by_key[("linear", "gp", False)]
    assert C.nearest_lines(results, by_key)[-1].endswith(
        "| none: gp searches without pruning | none: no pruning here reached the target at every seed in no more "
        "trials than without |")
    # results holding more search seeds than the plan (a rerun with fewer): every seed held must reach the target
    by_key[("linear", "tpe", False)] = row("tpe", False, 11, 6000, reached=3, seeds=4)
    by_key[("linear", "tpe", True)] = row("tpe", True, 9, 3000, reached=4, seeds=4)
    results["plan"]["seeds"] = 2
    assert "| 9: tpe, successive halving keeping the best eighth at 62 |" in C.nearest_lines(results, by_key)[-1]
    # no row reaching the target at every seed: the one whose searches' best FIDs have the lowest median
    for key in [k for k in by_key if k[0] == "linear"]:
        by_key[key] = by_key[key] | {"reached": 1, "bests": [3100.0, 3060.0, None]}
    by_key[("linear", "gp", False)]["bests"] = [3200.0, 3050.0, 3070.0]
    pick = by_key[("linear", "gp", False)]
    assert C.nearest_lines(results, by_key)[-1].startswith(
        "| linear | 2 of 5 | 20, at 1 of 3 search seeds (≤ 10: not at every seed) | none; lowest: gp, no pruning, "
        "its searches' best 3050, 3070, 3200 against 3054 (median 16 above) | none: gp searches without pruning |")
    by_key[("linear", "tpe", True)]["bests"] = [3000.0, 3040.0, 3300.0]  # the lowest median, below the target
    assert "| none; lowest: tpe, successive halving keeping the best eighth at 62, its searches' best 3000, 3040, " \
           "3300 against 3054 (median 14 below) |" in C.nearest_lines(results, by_key)[-1]
    monkeypatch.setattr(C, "pick_row", lambda results, method, by_key: ("none", None))
    assert "| linear | 2 of 5 | none reached it | none; lowest: tpe," in C.nearest_lines(results, by_key)[-1]
    for key in [k for k in by_key if k[0] == "linear"]:
        by_key[key]["bests"] = [None, None, None]  # no search completed a trial
    assert "| linear | 2 of 5 | none reached it | none | – |" in C.nearest_lines(results, by_key)[-1]
    monkeypatch.setattr(C, "pick_row", lambda results, method, by_key: None)
    assert C.nearest_lines(results, by_key) == []  # undecided, nothing to set beside it


def test_a_wilcoxon_variant_pairs_each_block_s_own_fid_with_the_best_trial_s(tmp_path, tiny_model_dir, monkeypatch):
    """Table 4's WilcoxonPruner variant: each rung before the last reports the FID of its block of
    samples alone (cached under the block's name), the last the trial's FID at N; a trial is pruned
    only from the 4th block on (a one-sided signed-rank test over 3 blocks cannot reach p < 0.1),
    where successive halving would prune at the first."""
    from skiptune_search.bench import cost as C
    from skiptune_search.scoring import evaluator as E
    from skiptune_search.scoring.evaluator import Evaluator

    stand_in = lambda features, reference: float(features.double().mean().abs())  # noqa: E731
    monkeypatch.setattr(E, "fid_from_features", stand_in)
    monkeypatch.setattr(C, "fid_from_features", stand_in)
    features, score = [], Evaluator.score

    def keeping(self, schedule, *args, **kwargs):  # the features of every schedule's 16 samples
        for rung in score(self, schedule, *args, **kwargs):
            if rung.n == 16:
                features.append(rung.features)
            yield rung

    monkeypatch.setattr(Evaluator, "score", keeping)
    path, rungs = tmp_path / "cost.json", C.blocks(16, 8)
    assert rungs == (2, 4, 6, 8, 10, 12, 14, 16)
    results = C.run_cost(str(tiny_model_dir), path, "c", "box", nfe=3, methods=("linear",), optimizers=("random",),
                         seeds=1, trials=12, n=16, rungs=(16,), reduction_factor=8, blocks=2, batch=16,
                         variants=((rungs, C.WILCOXON, None, ("random",)),), progress=False)
    key = C.variant_key(rungs, C.WILCOXON)
    assert key == "2-4-6-8-10-12-14-16,wilcoxon" and C.variant_pruning(key) == (list(rungs), C.WILCOXON)
    study = optuna.load_study(study_name=C.study_name(3, "linear", "random", True, 0, key),
                              storage=f"sqlite:///{tmp_path / 'cost.db'}")
    assert study.user_attrs["pruner"] == "wilcoxon" and study.user_attrs["reduction_factor"] == 0  # no halving
    trials = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and "same_as" not in t.user_attrs]
    cache = [v for v in results["cache"].values() if "0-2" in v]  # the variant's schedules
    for t in trials:  # each rung reports its block's FID, the last FID at N, the trial's value
        scored = next(v for v in cache if v["0-2"] == t.intermediate_values[2])
        assert all(t.intermediate_values[b] == scored[f"{a}-{b}" if b < 16 else "16"]
                   for a, b in zip((0, *rungs), rungs) if b in t.intermediate_values)
        if t.state.name == "COMPLETE":
            assert t.value == scored["16"]
    # a block's value is the FID of its own samples alone, not of all samples so far
    entry = next(v for v in cache if v["16"] == stand_in(features[-1], None))
    assert all(entry[f"{a}-{b}"] == stand_in(features[-1][a:b], None) for a, b in zip((0, *rungs), rungs[:-1]))
    assert any(entry[f"{a}-{b}"] != entry[str(b)] for a, b in zip((0, *rungs), rungs[:-1]))
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and all(t.last_step >= 8 for t in pruned)  # the 4th block's rung, not before
    assert [t["samples"] for t in results["variants"][f"linear,random,{key}"][0]["trials"] if t["value"] is None] == [
        t.last_step for t in pruned]
    text = "\n".join(C.render(json.loads(path.read_text())))
    assert ("| linear | random | Optuna's WilcoxonPruner (p < 0.1) on the FID of each of 8 blocks of 2 samples, "
            "against the best trial's |") in text


def test_an_interrupted_search_s_process_time_is_counted_when_it_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """Table 4's CPU-hours: the process time a search spent before an interruption (up to its last
    saved score) is kept and added to what it spends once resumed."""
    import types

    from skiptune_search.bench import cost as C
    from skiptune_search.scoring import evaluator as E
    from skiptune_search.scoring.evaluator import Evaluator

    now, labels, stop_at = [0.0], [], [3]
    score = Evaluator.score

    def costly(self, schedule, *args, **kwargs):  # each schedule sampled costs 5 s of process time
        now[0] += 5
        labels.append(kwargs.get("progress"))
        if len(labels) == stop_at[0]:
            raise KeyboardInterrupt
        yield from score(self, schedule, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "score", costly)
    monkeypatch.setattr(E, "fid_from_features", lambda features, reference: float(features.double().mean().abs()))
    monkeypatch.setattr(C, "time", types.SimpleNamespace(process_time=lambda: now[0]))
    path = tmp_path / "cost.json"
    run = lambda: C.run_cost(str(tiny_model_dir), path, "c", "box", nfe=3, methods=("linear",),  # noqa: E731
                             optimizers=("random",), seeds=1, trials=3, n=8, rungs=(8,), reduction_factor=3,
                             blocks=2, batch=8, progress=True)
    with pytest.raises(KeyboardInterrupt):
        run()  # in its first search's third schedule: two were scored and saved
    assert json.loads(path.read_text())["partial"] == {C.study_name(3, "linear", "random", True, 0): 10.0}
    labels.clear()
    stop_at[0] = 0
    results = run()
    resumed = sum(label.startswith("search 1/2") for label in labels)  # what it sampled once resumed
    assert resumed >= 1 and results["runs"]["linear,random,on"][0]["cpu_seconds"] == 10 + 5 * resumed
    assert results["partial"] == {}


def test_transfer_scores_each_tuned_schedule_at_every_nfe_taking_table_5_s_own_cells(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """Table 9: a schedule tuned at one NFE, applied unchanged at another, scored on table 5's
    held-out seeds; the cells table 5 measured (its own NFE, the untuned model there) are taken, not
    sampled; a rerun samples nothing."""
    from skiptune_search.bench import transfer as T
    from skiptune_search.scoring.evaluator import Evaluator

    sampled = []
    score = Evaluator.score

    def counting(self, schedule, *args, **kwargs):
        sampled.append((self.task.nfe, schedule.rho))
        yield from score(self, schedule, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "score", counting)
    headline = {"settings": {"model": str(tiny_model_dir), "trials": 2, "n": 4, "rungs": [4], "truth_n": 4,
                             "held_out_seed": BS.HELD_OUT_SEED, "weights": "w"},
                "nfe": {"3": {"untuned": 50.0, "linear": [{"seed": 0, "params": {"rho_inner": 0.7, "rho_outer": 1.2},
                                                            "held_out": 40.0}]}}}
    path = tmp_path / "transfer.json"

    def run_it():
        return T.run_transfer(str(tiny_model_dir), headline, path, "c", "box", families=("linear",), tuned_at=(3,),
                              nfes=(3, 5), seed=0, batch=4, progress=False)

    results = run_it()
    assert results["scores"]["untuned,0,3"] == {"fid": 50.0, "from": "table 5"}
    assert results["scores"]["linear,3,3"] == {"fid": 40.0, "from": "table 5"}
    assert [nfe for nfe, _ in sampled] == [5, 5]  # the untuned model and the tuned schedule, at NFE 5 only
    assert all(v == 1.0 for row in sampled[0][1] for v in row)  # untuned first, then the tuned ρ
    assert (min(map(min, sampled[1][1])), max(map(max, sampled[1][1]))) == (pytest.approx(0.7), pytest.approx(1.2))
    run_it()
    assert len(sampled) == 2
    text = "\n".join(T.render(json.loads(path.read_text())))
    assert "| linear tuned at NFE 3 | 40 (-20.0%)* |" in text and "Not measured yet" not in text


def _fake_fid(monkeypatch, calls):
    """Every score without sampling: a bowl in ρ around 0.8 (the untuned model is never the best
    once a trial moves ρ towards it), a little higher on fewer samples; each call recorded."""
    from skiptune_search.scoring.evaluator import Evaluator, Rung

    def score(self, schedule, rungs=None, seeds=None, progress=False, kid=True):
        calls.append((self.task.nfe, schedule.rho))
        off = sum((v - 0.8) ** 2 for row in schedule.rho for v in row)
        for n in rungs or self.task.rungs:
            yield Rung(n, 10 + off + 1 / n)

    monkeypatch.setattr(Evaluator, "score", score)


def _table5(tmp_path, model, seeds):
    """Table 5's results and studies at NFE 3 and 5 (linear, ``seeds`` search seeds), as its own code writes them."""
    from skiptune_search.bench import headline as H

    path = tmp_path / "headline.json"
    H.run_headline(str(model), (3, 5), path, "c", "box", seeds=seeds, trials=4, n=8, rungs=(4, 8), reduction_factor=3,
                   truth_n=8, batch=8,
                   methods=("linear",), progress=False)
    return path


def _studies(url):
    storage = make_storage(url, heartbeat=None)
    return {name: optuna.load_study(study_name=name, storage=storage) for name in optuna.get_all_study_names(storage)}


def test_a_warm_search_starts_from_its_own_seed_s_nfe_9_best_and_a_rerun_searches_nothing_again(
        tmp_path, tiny_model_dir, monkeypatch):
    """Table 4's warm starts: the NFE 5 search (here 3, from 5) queues, after the baseline, the best
    of table 5's search of the same family and seed at the other NFE (not another seed's, even one
    a killed run left copied), pruned as table 5 was; table 5's study file is only read; a finished
    search is not run again; the part renders each search beside the cold one."""
    from skiptune_search.bench import cost as C
    from skiptune_search.bench import warm as W
    from skiptune_search.search.study import baseline_trial

    calls, searched = [], []
    _fake_fid(monkeypatch, calls)
    headline = _table5(tmp_path, tiny_model_dir, seeds=2)
    table5_url = f"sqlite:///{tmp_path / 'headline.db'}"
    with contextlib.closing(sqlite3.connect(tmp_path / "headline.db")) as db, db:  # as the real table 5's
        db.execute("DELETE FROM study_user_attributes WHERE key = 'weights'")  # studies, made before weights were recorded
    before = {n: [(t.state, t.value, t.params) for t in s.trials] for n, s in _studies(table5_url).items()}
    search = W.run_search

    def spy(evaluator, study, space, trials, progress):
        searched.append((study.study_name, study.pruner))
        return search(evaluator, study, space, trials, progress=progress)

    monkeypatch.setattr(W, "run_search", spy)
    path = tmp_path / "warm.json"

    def run_it(seeds):
        return W.run_warm(headline, path, "c", "box", seeds=seeds, batch=8, source=5, target=3, progress=False)

    run_it(1)
    # a copy of seed 0's source, as a run killed while creating a warm study leaves it: dropped before
    # seed 1's study is made, whose source's copy is then the only NFE 5 study in warm.db
    optuna.copy_study(from_study_name="headline-nfe5-linear-seed0", from_storage=table5_url,
                      to_storage=f"sqlite:///{tmp_path / 'warm.db'}")
    results = run_it(2)
    assert [name for name, _ in searched] == ["warm-nfe3-from5-linear-seed0", "warm-nfe3-from5-linear-seed1"]
    for _, pruner in searched:  # table 5's successive halving, from its first rung
        assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
        assert (pruner._reduction_factor, pruner._min_resource) == (3, 4)
    warm, table5 = _studies(f"sqlite:///{tmp_path / 'warm.db'}"), _studies(table5_url)
    assert sorted(warm) == ["warm-nfe3-from5-linear-seed0", "warm-nfe3-from5-linear-seed1"]  # no copy left
    for seed in (0, 1):
        trials = warm[f"warm-nfe3-from5-linear-seed{seed}"].trials
        source = table5[f"headline-nfe5-linear-seed{seed}"]
        best = min((t for t in source.trials if t.value is not None), key=lambda t: t.value)
        assert best.number != baseline_trial(source).number
        assert trials[0].user_attrs.get("baseline") and [t.number for t in trials if t.user_attrs.get("warm_start")] == [1]
        assert trials[1].user_attrs["warm_start"]["study"] == source.study_name and trials[1].params == best.params
        run = results["runs"]["linear"][seed]
        assert run["seed"] == seed and run["cold"] == C.trial_log(table5[f"headline-nfe3-linear-seed{seed}"])
        assert run["trials"] == C.trial_log(warm[f"warm-nfe3-from5-linear-seed{seed}"])
    assert {n: [(t.state, t.value, t.params) for t in s.trials] for n, s in table5.items()} == before
    sampled = len(calls)
    assert run_it(2)["runs"] == results["runs"] and len(calls) == sampled and len(searched) == 2

    text = "\n".join(W.render(json.loads(path.read_text())))
    assert "warm-started from the best trial of table 5's NFE 5 search" in text and "Not measured yet" not in text
    for seed, run in enumerate(results["runs"]["linear"]):
        cold = min(t["value"] for t in run["cold"] if t["value"] is not None)
        warm_best = min(t["value"] for t in run["trials"] if t["value"] is not None)
        assert f"| linear | {seed} | {BS.fmt(cold)} / {BS.fmt(warm_best)} |" in text
        start = run["trials"][1]
        assert f"trial 2: {BS.fmt(start['value']) if start['value'] is not None else 'pruned'}" in text
    assert "| linear | median of 2 |" in text

    # a search table 5's results list but its study file lost (the real headline.db was restored from
    # an older commit once) is not run, and the part says why rather than 'not measured yet'; one
    # measured before its study went missing keeps its row and is not called lost
    optuna.delete_study(study_name="headline-nfe3-linear-seed1", storage=table5_url)
    optuna.delete_study(study_name="headline-nfe3-linear-seed0", storage=table5_url)
    saved = json.loads(path.read_text())
    saved["runs"]["linear"] = saved["runs"]["linear"][:1]
    path.write_text(json.dumps(saved))
    again = run_it(2)
    assert len(searched) == 2 and [r["seed"] for r in again["runs"]["linear"]] == [0]
    assert again["lost"] == [{"family": "linear", "seed": 1, "study": "headline-nfe3-linear-seed1"}]
    text = "\n".join(W.render(json.loads(path.read_text())))
    assert "Not measurable: linear seed 1." in text and "no longer holds headline-nfe3-linear-seed1" in text
    assert "Not measured yet" not in text


def test_the_warm_part_says_what_it_needs_and_runs_only_once_table_5_has_it(tmp_path, monkeypatch):
    """Without table 5's studies at both NFEs, table 4 measures no warm search and its part says why;
    with them, it is measured after the grid and before the per-family searches."""
    from skiptune_search.bench import cost as C
    from skiptune_search.bench import run as bench
    from skiptune_search.bench import warm as W
    from skiptune_search.bench.tables import Context

    steps = []
    monkeypatch.setattr(bench, "_grid", lambda ctx, low_rungs=(): steps.append("grid"))
    monkeypatch.setattr(C, "run_cost", lambda *a, **k: steps.append("cost"))
    monkeypatch.setattr(W, "run_warm", lambda *a, **k: steps.append("warm"))
    ctx = Context(quick=True, size=bench.SIZES[True], work=tmp_path, stamp={"machine": "m"}, progress=False)
    bench._measure_table4(ctx)
    assert steps == ["grid", "cost"]
    assert bench._render_table4(ctx) is None  # nothing of table 4 measured: the table's own 'not measured'
    (tmp_path / "cost.json").write_text("{}")
    monkeypatch.setattr(bench, "_table4", lambda grid, size, work: ["the grid"])
    (tmp_path / "grid.json").write_text(json.dumps({"grid": {"1,1": {}}}))
    text = "\n".join(bench._render_table4(ctx))
    assert "### Warm starts" in text and "(table 5 is not measured here): run --tables 5 first" in text

    run = {"seed": 0, "held_out": 1.0}
    headline = {"settings": {"trials": 16, "n": 1000, "rungs": [250, 1000]}, "plan": {"families": ["linear"]},
                "nfe": {"5": {"linear": [run]}}}
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    assert "(table 5 here has NFE 5): run --tables 5 first" in "\n".join(bench._render_table4(ctx))
    headline["nfe"]["9"] = {"linear": [run]}
    (tmp_path / "headline.json").write_text(json.dumps(headline))
    text = "\n".join(bench._render_table4(ctx))
    assert "Not measured yet: rerun `--tables 4`" in text and "N = 1000 (rungs 250,1000" in text
    steps.clear()
    bench._measure_table4(ctx)
    assert steps == ["grid", "warm", "cost"]


def test_the_warm_part_renders_a_search_that_never_reached_and_lists_the_missing_ones():
    from skiptune_search.bench import warm as W

    cold = [{"value": 20.0, "samples": 8}, {"value": None, "samples": 4}, {"value": 15.0, "samples": 8}]
    warm = [{"value": 20.0, "samples": 8}, {"value": 16.0, "samples": 8, "warm_start": {"study": "s", "nfe": 9,
                                                                                         "trial": 3, "value": 12.0}},
            {"value": None, "samples": 4}]
    results = {"settings": {"source_nfe": 9, "target_nfe": 5, "reduction_factor": 3,
                            "table5": {"trials": 3, "n": 8, "rungs": [4, 8]}},
               "plan": {"families": ["linear", "per_layer"], "seeds": 2}, "command": "c", "date": "d",
               "machines": ["m"], "runs": {"linear": [{"seed": 0, "trials": warm, "cold": cold}]}}
    text = "\n".join(W.render(results))
    assert "| linear | 0 | 15 / 16 | 3 / not in 3 | 20 / – | – | trial 2: 16, the best |" in text
    assert "Not measured yet: linear seed 1, per_layer seed 0, per_layer seed 1 (" in text


def test_each_method_s_default_optimizer_is_the_pick_of_the_committed_table_4():
    """A search naming no optimizer uses the one table 4 picked for its method (``DEFAULT_OPTIMIZERS``),
    and TPE where table 4 picked none or has not decided yet, as the committed results stand."""
    from pathlib import Path

    from skiptune_search.bench import cost as C
    from skiptune_search.search import FALLBACK_OPTIMIZER, default_optimizer

    results = C.load_results(Path(__file__).parents[1] / "studies" / "bench" / "cost.json")
    by_key = {(r["method"], r["optimizer"], r["pruning"]): r for r in C.cost_rows(results)}
    picks = {m: C.pick_row(results, m, by_key) for m in results["plan"]["methods"]}
    assert all(found is not None and found[0] == "pick" for found in picks.values())  # every method decided
    for method, found in picks.items():
        family, window = (method.removesuffix("_allsteps"), False) if method.endswith("_allsteps") else (method, True)
        wanted = found[1]["optimizer"] if found and found[0] == "pick" else FALLBACK_OPTIMIZER
        assert default_optimizer(family, freeu_window=window) == wanted, method
