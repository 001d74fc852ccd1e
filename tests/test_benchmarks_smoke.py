"""Smoke tests of the benchmark scripts: the smallest configuration of each, and the statistics by hand.

Timings are never asserted; the structure of the result files is, and so are the numbers that do not depend on
the machine (vectorised regions equal to their loop references, statistics, resident memory accounting).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"bench_{name}"
    if key not in sys.modules:  # dataclasses need their module registered while it executes
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _check_meta(m: dict) -> None:
    assert set(m) >= {"machine", "commit", "date", "wall_time_s", "command"}
    assert m["machine"]["cpu"] and m["machine"]["torch"] and m["machine"]["cores"] >= 1
    assert m["commit"] and m["wall_time_s"] >= 0


# ------------------------------------------------------------------------------------------------ micro


def test_micro_tiny_writes_every_loss_and_exact_regions(tmp_path):
    micro = _load("micro")
    micro.main(["--quick", "--batch", "2", "--image", "128", "--channels", "16", "--repeats", "1", "--warmup", "0",
                "--loop-repeats", "1", "--out-dir", str(tmp_path), "--tag", "_t"])
    data = json.loads((tmp_path / "micro_cpu_t.json").read_text())
    _check_meta(data["meta"])
    expected = {"cwd", "fgd", "hint", "ld (Main LD)", "kd (Main KD)", "vlr_ld (region + KL)", "chen (RPN + RCN)",
                "chen_dense (GFL)", "lgd distill term", "lgd pyramid (teacher modules)"}
    assert set(data["losses"]) == expected
    for name, modes in data["losses"].items():
        assert set(modes) == {"fwd", "fwd+bwd"}, name
        assert modes["fwd"]["n"] == 1 and modes["fwd+bwd"]["median_ms"] > 0
    # 128 px: maps 16², 8², 4², 2², 1² -> 341 locations per image; boxes drawn 3..8 per image
    assert data["counts"]["locations"] == 256 + 64 + 16 + 4 + 1
    assert all(3 <= b <= 8 for b in data["counts"]["boxes_per_image"])
    for region in ("fgd_masks", "vlr"):
        r = data["regions"][region]
        assert r["max_abs_diff"] < 1e-5, region  # the vectorised code reproduces the loop reference
        # rounded to 0.1 (a relative tolerance failed when a tiny-shape speed-up was below 1)
        assert r["speedup"] == pytest.approx(r["loop"]["median_ms"] / r["vectorised"]["median_ms"], abs=0.051)
        assert r["speedup_min"] == pytest.approx(r["loop"]["min_ms"] / r["vectorised"]["min_ms"], abs=0.051)
    md = (tmp_path / "micro_cpu_t.md").read_text()
    assert "| loss module | forward ms |" in md and "speed-up" in md and "commit" in md


def test_micro_inputs_have_positives_and_grad_leaves():
    inputs = _load("micro_inputs")
    inp = inputs.build_inputs(inputs.Shapes(batch=2, image=256, channels=8, classes=5, min_boxes=2, max_boxes=4,
                                            rpn_samples=8, rois=8), inputs.torch.device("cpu"))
    st = inp.student
    assert st.head["cls_logits"].shape == (2, 1024 + 256 + 64 + 16 + 4, 5)
    assert st.head["bbox_dist"].shape[-1] == 68
    # anchors of side 8 * stride centred on the stride grid: the first p3 anchor is (-32, -32, 32, 32)
    assert st.anchors[0].tolist() == [-32.0, -32.0, 32.0, 32.0]
    assert int(st.assignment.positive_mask.sum()) > 0
    labels = st.assignment.labels[st.assignment.positive_mask]
    assert labels.min() >= 1 and labels.max() <= 5
    assert all(t.requires_grad for t in inp.leaves)
    assert not any(t.requires_grad for t in inp.teacher.features.values())


# ------------------------------------------------------------------------------------------------ cost


def test_cost_tiny_structure_and_memory_accounting(tmp_path):
    cost = _load("cost")
    cost.main(["--size", "128", "--batch", "1", "--boxes", "2", "--repeats", "1", "--warmup", "0",
               "--methods", "fgd,lgd", "--options-method", "", "--out-dir", str(tmp_path), "--tag", "_t"])
    data = json.loads((tmp_path / "cost_cpu_t.json").read_text())
    _check_meta(data["meta"])
    assert set(data["methods"]) == {"fgd", "lgd"}
    fgd, lgd = data["methods"]["fgd"], data["methods"]["lgd"]
    assert fgd["teacher_stage"] == "features" and lgd["teacher_stage"] is None
    for r in (fgd, lgd):
        assert set(r["step_ms"]) == {"plain", "a", "b", "c"}
        ms = {v: r["step_ms"][v]["median_ms"] for v in r["step_ms"]}
        assert r["machinery_overhead"] == pytest.approx((ms["c"] - ms["b"]) / ms["b"])
        assert r["teacher_share"] == pytest.approx((ms["b"] - ms["a"]) / ms["a"])
        assert r["losses_share"] == pytest.approx(r["losses_only_ms"]["median_ms"] / ms["b"], rel=1e-3)
        assert set(r["paired"]) == {"teacher_share", "machinery_overhead", "adapter_overhead"}
        res = r["resident_mib"]
        assert res["a"] == res["plain"] and res["c"] >= res["b"] >= res["a"]
        assert r["distill_params"] > 0  # FGD's GcBlocks, LGD's adapter and label-guided modules
    # the teacher's weights are resident only when there is a teacher
    assert fgd["resident_mib"]["b"] > fgd["resident_mib"]["a"]
    assert lgd["resident_mib"]["b"] == lgd["resident_mib"]["a"]
    assert data["teacher_options"] is None
    assert set(data["target_machinery_met"]) == set(data["target_losses_share_met"]) == {"fgd", "lgd"}
    assert "machinery (c-b)/b" in (tmp_path / "cost_cpu_t.md").read_text()


def test_cost_resident_mib_by_hand():
    memory = _load("memory")
    torch = memory.torch
    trained = [torch.nn.Parameter(torch.zeros(256, 1024))]  # 1 MiB of fp32
    frozen = [torch.nn.Parameter(torch.zeros(512, 1024))]  # 2 MiB
    # weights + AdamW's two moments of the trained ones (3 MiB) + the frozen weights (2 MiB)
    assert memory.resident_mib(trained, frozen) == pytest.approx(5.0)


def test_cost_paired_ratio_by_hand():
    cost = _load("cost")
    # rounds: 2/1, 3/1, 4/2 -> ratios - 1 = 1, 2, 1; with fewer than 4 rounds the "quartiles" are min and max
    assert cost.paired_ratio([2.0, 3.0, 4.0], [1.0, 1.0, 2.0]) == {"median": 1.0, "q1": 1.0, "q3": 2.0}
    # a slow drift that doubles both steps of a round leaves the paired ratio untouched: 10% every round
    r = cost.paired_ratio([1.1, 2.2, 4.4, 8.8], [1.0, 2.0, 4.0, 8.0])
    assert r["median"] == pytest.approx(0.1) and r["q1"] == pytest.approx(0.1) and r["q3"] == pytest.approx(0.1)


def test_cost_lgd_steady_state_params():
    cost = _load("cost")
    from detkd.config import DistillConfig, LossConfig

    dc = DistillConfig(losses=[LossConfig(method="lgd", params={"add_context": True}), LossConfig(method="fgd")])
    out = cost.steady_state(dc)
    assert out.losses[0].params == {"add_context": True, "pre_nondistill_steps": 0, "freeze_backbone_steps": 0}
    assert out.losses[1].params == {} and out.check_first_step is False
    assert dc.losses[0].params == {"add_context": True}  # the input config is not mutated


def test_cost_teacher_options_structure(tmp_path):
    cost = _load("cost")
    cost.main(["--size", "128", "--batch", "1", "--boxes", "2", "--repeats", "1", "--warmup", "0", "--methods", "",
               "--options-method", "fgd", "--no-memory", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "cost_cpu.json").read_text())
    keys = set(data["teacher_options"]["results"])
    assert keys == {f"{k}|{p}|{r}" for k in ("step", "teacher") for p in ("fp32", "bf16") for r in ("features", "full")}


# ------------------------------------------------------------------------------------------------ accuracy


def test_paired_delta_and_gap_by_hand():
    stats = _load("stats")
    d = stats.paired_delta([31.0, 33.0, 32.0], [30.0, 31.0, 32.0])
    # diffs 1, 2, 0: mean 1, sd 1, half width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7321 = 2.4843
    assert d["diffs"] == [1.0, 2.0, 0.0] and d["mean"] == pytest.approx(1.0)
    assert d["ci95"] == pytest.approx([1 - 2.48434, 1 + 2.48434], abs=1e-4)
    assert stats.paired_delta([31.0], [30.0])["ci95"] is None  # one seed: no interval
    assert stats.gap_closed(35.0, 30.0, 40.0) == pytest.approx(0.5)
    assert stats.gap_closed(29.0, 30.0, 40.0) == pytest.approx(-0.1)
    assert stats.gap_closed(35.0, 30.0, 29.0) is None  # the teacher is not better: no gap to close
    s = stats.mean_std([1.0, 2.0, 6.0])
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt(7.0))


def test_epochs_replace_the_reduced_schedules_epochs():
    """--epochs with --cpu-reduced: one train.epochs override (the report lists the overrides as applied)."""
    acc = _load("accuracy")
    longer = acc.parse_args(["--dataset", "synth", "--cpu-reduced", "--epochs", "60"]).overrides
    assert [o for o in longer if o.startswith("train.epochs=")] == ["train.epochs=60"]
    reduced = acc.parse_args(["--dataset", "synth", "--cpu-reduced"]).overrides
    assert [o for o in reduced if o.startswith("train.epochs=")] == ["train.epochs=20"]


def test_seed_range_starts_at_first_seed_and_rejects_empty_ranges(capsys):
    """A confirmation study on fresh seeds: --first-seed 10 --seeds 3 trains and reports seeds 10, 11, 12."""
    acc = _load("accuracy")
    assert acc.parse_args(["--seeds", "3"]).seed_list == [0, 1, 2]
    assert acc.parse_args(["--first-seed", "10", "--seeds", "3"]).seed_list == [10, 11, 12]
    assert acc.parse_args(["--first-seed", "10", "--only-seeds", "11,13"]).seed_list == [11, 13]
    for bad in (["--seeds", "0"], ["--first-seed", "-1"]):
        with pytest.raises(SystemExit):
            acc.parse_args(bad)
        assert "--first-seed" in capsys.readouterr().err


def test_a_gpu_run_and_a_cpu_run_of_one_config_are_cached_apart(monkeypatch):
    """train.device=auto trains in bf16 on a GPU and in fp32 on a CPU: their runs must not share a cache entry. A CPU
    run keeps the hash it had (the studies' cached runs stay valid); every spelling of the GPU hashes alike."""
    import torch

    acc = _load("accuracy")

    def hash_on(device: str, gpu: bool) -> str:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        cfg = acc.student_config(None, "fcos", acc.parse_args(["--device", device]), None, 0)
        return acc.config_hash(cfg)

    cpu = hash_on("auto", gpu=False)
    assert hash_on("cpu", gpu=False) == hash_on("cpu", gpu=True) == cpu
    gpu = hash_on("auto", gpu=True)
    assert gpu != cpu and hash_on("cuda", gpu=True) == hash_on("cuda:0", gpu=True) == gpu


def test_scale_losses_touches_only_the_named_method():
    acc = _load("accuracy")
    from detkd.config import load_config

    cfg = load_config(acc.recipe_path("ld_fgd", "gfl", "synth"))
    before = {lc.method: lc.weight for lc in cfg.distill.losses}
    scaled = acc.scale_losses(cfg, {"fgd": 0.01})
    after = {lc.method: lc.weight for lc in scaled.distill.losses}
    assert after["fgd"] == pytest.approx(0.01 * before["fgd"])
    assert {m: w for m, w in after.items() if m != "fgd"} == {m: w for m, w in before.items() if m != "fgd"}
    assert acc.scale_losses(cfg, {}) is cfg
    args = acc.parse_args(["--scale", "fgd=0.01", "--scale", "cwd=2"])
    assert args.scales == {"fgd": 0.01, "cwd": 2.0} and args.teacher_epochs is None
    assert acc.parse_args(["--teacher-epochs", "24"]).teacher_epochs == 24
    with pytest.raises(SystemExit):
        acc.parse_args(["--scale", "fgd"])



def test_method_variants_carry_their_own_term_scales():
    acc = _load("accuracy")
    assert acc.parse_variant("ld@kd=0.1:vlr_ld=0") == ("ld@kd=0.1:vlr_ld=0", "ld", {"kd": 0.1, "vlr_ld": 0.0}, {})
    assert acc.parse_variant("cwd+lgd") == ("cwd+lgd", "cwd+lgd", {}, {})
    assert acc.parse_variant("ld@ld.normalize=positives").params == {"ld": {"normalize": "positives"}}
    for bad in ("ld@kd", "ld@kd=x", "ld@=1", "fgd@fgd.=0", "fgd@.alpha_fgd=0", "ld@ld.normalize=a b"):
        with pytest.raises(ValueError, match="METHOD@TERM=FACTOR"):
            acc.parse_variant(bad)
    with pytest.raises(SystemExit):
        acc.parse_args(["--methods", "ld@kd"])
    args = acc.parse_args(["--dataset", "synth", "--scale", "kd=0.5", "--scale", "fgd=0.01"])
    teacher = {"run_dir": "/nowhere"}
    plain = acc.student_config("ld", "gfl", args, teacher, 0)
    variant = acc.student_config("ld", "gfl", args, teacher, 0, acc.parse_variant("ld@kd=0:vlr_ld=2"))
    w_plain = {lc.method: lc.weight for lc in plain.distill.losses}
    w_var = {lc.method: lc.weight for lc in variant.distill.losses}
    assert w_plain["kd"] == pytest.approx(5.0)  # --scale applies when the variant is silent
    assert w_var == {"ld": w_plain["ld"], "kd": 0.0, "vlr_ld": pytest.approx(2 * w_plain["vlr_ld"])}
    assert acc.config_hash(plain) != acc.config_hash(variant)
    with pytest.raises(ValueError, match="no 'vlr' loss"):  # a typo is not silently a copy of the recipe
        acc.student_config("ld", "gfl", args, teacher, 0, acc.parse_variant("ld@vlr=0"))
    # a parameter the recipe leaves at its default but the loss takes by name (a word here) can be set, and builds
    positives = acc.student_config("ld", "gfl", args, teacher, 0, acc.parse_variant("ld@ld.normalize=positives"))
    (ld,) = [lc for lc in positives.distill.losses if lc.method == "ld"]
    assert "normalize" not in [lc for lc in plain.distill.losses if lc.method == "ld"][0].params
    assert ld.params["normalize"] == "positives" and acc.config_hash(positives) != acc.config_hash(plain)
    from detkd.losses import LOSSES
    assert LOSSES["ld"](["p3"], {}, {}, **ld.params).normalize == "positives"
    with pytest.raises(ValueError, match="no parameter 'normalise'"):
        acc.student_config("ld", "gfl", args, teacher, 0, acc.parse_variant("ld@ld.normalise=positives"))
    # the same for a loss that takes its parameters through **params (their names are its extra_params)
    cwd_params = LOSSES["cwd"].param_names()
    assert {"tau", "form", "source", "align"} <= cwd_params and "levels" not in cwd_params
    cwd_args = acc.parse_args(["--dataset", "synth", "--family", "fcos"])
    form = acc.student_config("cwd", "fcos", cwd_args, teacher, 0, acc.parse_variant("cwd@cwd.form=kl"))
    assert [lc.params["form"] for lc in form.distill.losses] == ["kl"]


def test_a_variant_sets_a_loss_parameter_for_an_ablation(tmp_path):
    acc = _load("accuracy")
    args = acc.parse_args(["--dataset", "thermal", "--family", "fcos", "--scale", "fgd=0.01"])
    teacher = {"run_dir": "/nowhere"}
    plain = acc.student_config("fgd", "fcos", args, teacher, 0)
    no_fg = acc.student_config("fgd", "fcos", args, teacher, 0,
                               acc.parse_variant("fgd@fgd.alpha_fgd=0:fgd.lambda_fgd=0"))
    (p,), (v,) = plain.distill.losses, no_fg.distill.losses
    assert v.params == {**p.params, "alpha_fgd": 0.0, "lambda_fgd": 0.0}  # set, the others as the recipe's
    assert v.weight == p.weight == pytest.approx(0.01)  # --scale still applies to the loss's weight
    assert acc.config_hash(plain) != acc.config_hash(no_fg)
    for bad, match in (("fgd@fgd.alpha=0", "no parameter 'alpha'"), ("fgd@cwd.tau=1", "no 'cwd' loss")):
        with pytest.raises(ValueError, match=match):
            acc.student_config("fgd", "fcos", args, teacher, 0, acc.parse_variant(bad))
    bad_args = acc.parse_args(["--dataset", "thermal", "--family", "fcos", "--methods", "fgd@fgd.alpha=0",
                               "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(ValueError, match="no parameter 'alpha'"):  # before any teacher is trained
        acc.study(bad_args)
    assert not (tmp_path / "runs").exists()


def _fake_meta() -> dict:
    """A result file's ``meta`` as ``common.meta`` writes it, for the report tests."""
    return {"machine": {"cpu": "c", "cores": 2, "cores_usable": 2, "torch_threads": 2, "load_avg_1m": 0.0,
                        "python": "3", "torch": "t", "torchvision": "v", "gpu": None, "device": "cpu"},
            "commit": "abc", "date": "d", "wall_time_s": 1.0, "command": "python benchmarks/accuracy.py"}


def _record(label: str, seed: int, ap: float) -> dict:
    return {"label": label, "seed": seed, "metrics": {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.05},
            "steps": 10, "wall_time_s": 1.0, "date": "2026-01-01T00:00:00+00:00", "run_dir": "x"}


def test_summary_markdown_and_plot(tmp_path):
    acc = _load("accuracy")
    records = {"retinanet": {
        "teacher": _record("teacher", 0, 0.40),
        "baseline": {0: _record("b", 0, 0.30), 1: _record("b", 1, 0.32)},
        "methods": {"fgd": {0: _record("f", 0, 0.34), 1: _record("f", 1, 0.34)},
                    "fgd@fgd=0.1": {0: _record("f", 0, 0.31), 1: _record("f", 1, 0.33)}},  # same run label
    }}
    summary = _load("stats").summarize(records, [0, 1])
    fgd = summary["retinanet"]["methods"]["fgd"]
    assert fgd["AP"]["mean"] == pytest.approx(34.0)
    assert fgd["delta"]["AP"]["diffs"] == pytest.approx([4.0, 2.0])
    assert fgd["gap_closed"] == pytest.approx((34.0 - 31.0) / (40.0 - 31.0))
    png = acc.accuracy_plot(summary, tmp_path / "a.png", "test")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    meta = _fake_meta()
    md = acc.accuracy_markdown({"meta": meta, "settings": {"dataset": "synth", "seeds": [0, 1], "overrides": []},
                          "summary": summary, "runs": records, "plot": "a.png"})
    assert "| fgd (retinanet) | 34.0 ± 0.0 |" in md and "33%" in md and "![AP per method](a.png)" in md
    # the runs table names each run by its report entry, so that two variants of one method stay apart
    assert "| fgd_retinanet_s1 | 1 | 34.0 |" in md and "| fgd@fgd=0.1_retinanet_s1 | 1 | 33.0 |" in md


def test_recipes_combination_thermal_hash_and_lgd_schedule():
    acc = _load("accuracy")
    combo = acc.load_recipe("ld+fgd", "gfl", "synth")
    assert [lc.method for lc in combo.distill.losses] == ["ld", "kd", "vlr_ld", "fgd"]
    thermal = acc.load_recipe("fgd", "retinanet", "thermal")
    assert thermal.data.format == "coco" and thermal.data.root.endswith("thermal/coco")
    assert thermal.name == "fgd_retinanet_r50_r18_thermal"
    base = acc.load_recipe(None, "retinanet", "synth")
    renamed = dataclasses.replace(base, name="other", output_dir="elsewhere")
    assert acc.config_hash(base) == acc.config_hash(renamed)
    assert acc.config_hash(base) != acc.config_hash(dataclasses.replace(base, seed=1))
    lgd = acc.load_recipe("lgd", "retinanet", "synth")
    lgd = dataclasses.replace(lgd, train=dataclasses.replace(lgd.train, max_steps=90))
    params = acc.scale_lgd_schedule(lgd).distill.losses[0].params
    assert params["pre_nondistill_steps"] == 15 and params["freeze_backbone_steps"] == 10
    # the recipe's own counts (fractions of the recipe's 480 steps) are rescaled to the steps actually run
    assert lgd.distill.losses[0].params["pre_nondistill_steps"] == 80
    longer = dataclasses.replace(lgd, train=dataclasses.replace(lgd.train, max_steps=180))
    assert acc.scale_lgd_schedule(longer).distill.losses[0].params["freeze_backbone_steps"] == 20
    # teacher overrides do not create a teacher section for runs without one
    assert acc.with_overrides(base, ["teacher.min_size=64"]).teacher is None


def test_a_method_that_widens_the_student_is_compared_with_that_student_alone(monkeypatch):
    acc = _load("accuracy")
    trained = []

    def fake_run(cfg, label, runs_dir, dataset, keep_weights=False):  # AP from the width and whether it distils
        assert keep_weights == label.startswith("teacher")  # only the teachers' weights are needed afterwards
        trained.append((label, cfg))
        ap = {"teacher": 0.40}.get(label.split("_")[0], 0.30 + 0.02 * (cfg.model.fpn_channels == 128))
        ap += 0.01 * (cfg.distill is not None) + 0.001 * cfg.seed
        return {**_record(label, cfg.seed, ap), "run_dir": "/nowhere"}

    monkeypatch.setattr(acc, "run_cached", fake_run)
    args = acc.parse_args(["--dataset", "synth", "--family", "fcos", "--methods", "fgd,fgd_inherit", "--seeds", "2"])
    records = acc.study(args)
    wide = "R18-FPN128, 4 head convs"
    assert records["fcos"]["students"] == {"fgd_inherit": wide}
    wide_runs = [cfg for label, cfg in trained if label.startswith("baseline") and cfg.model.fpn_channels == 128]
    assert len(wide_runs) == 2 and all(cfg.distill is None and cfg.model.head_convs == 4 for cfg in wide_runs)
    # the same run as a baseline widened with --set, so that such a study's cached runs are found again
    by_hand = acc.parse_args(["--dataset", "synth", "--family", "fcos", "--set", "model.fpn_channels=128",
                              "--set", "model.head_convs=4"])
    assert acc.config_hash(wide_runs[0]) == acc.config_hash(acc.student_config(None, "fcos", by_hand, None, 0))
    summary = _load("stats").summarize(records, [0, 1])["fcos"]
    assert summary["baselines"][wide]["AP"]["mean"] == pytest.approx(32.05)
    inherit, plain = summary["methods"]["fgd_inherit"], summary["methods"]["fgd"]
    assert inherit["student"] == wide and plain["student"] is None
    assert inherit["delta"]["AP"]["diffs"] == pytest.approx([1.0, 1.0])  # against the wide student, not the R18
    assert plain["delta"]["AP"]["diffs"] == pytest.approx([1.0, 1.0])
    assert inherit["gap_closed"] == pytest.approx(1.0 / (40.0 - 32.05))
    meta = _fake_meta()
    md = acc.accuracy_markdown({"meta": meta, "settings": {"dataset": "synth", "seeds": [0, 1], "overrides": []},
                                "summary": {"fcos": summary}, "runs": records})
    assert f"| baseline {wide} (fcos) | 32.0 ± 0.1 |" in md and f"| fgd_inherit (fcos; student {wide}) |" in md
    assert "| teacher R50-FPN128, 4 head convs (fcos) | 40.0 |" in md  # the rows name their models
    assert "| baseline R18-FPN64, 2 head convs (fcos) | 30.0 ± 0.1 |" in md
    assert md.count("| baseline_fcos_s") == 4  # both students' baseline runs are listed


def test_a_finished_run_is_found_by_its_config_hash_under_another_label(tmp_path, monkeypatch):
    acc = _load("accuracy")
    cfg = acc.load_recipe("fgd_inherit", "fcos", "synth")
    key = acc.config_hash(cfg)
    old = tmp_path / f"synth_fgd_fcos_s0_{key}"  # e.g. the same run built by a study with --set overrides
    old.mkdir()
    (old / "bench.json").write_text(json.dumps(_record("fgd_fcos_s0", 0, 0.33)))

    def no_training(cfg):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr("detkd.runner.train_from_config", no_training)
    record = acc.run_cached(cfg, "fgd_inherit_fcos_s0", tmp_path, "synth")  # a student: its record is enough
    assert record["metrics"]["AP"] == 0.33 and record["label"] == "fgd_inherit_fcos_s0"
    with pytest.raises(AssertionError, match="trained again"):  # a teacher must still have the weights to distil
        acc.run_cached(cfg, "fgd_inherit_fcos_s0", tmp_path, "synth", keep_weights=True)
    (old / "last.pt").write_bytes(b"")
    assert acc.run_cached(cfg, "fgd_inherit_fcos_s0", tmp_path, "synth", keep_weights=True)["metrics"]["AP"] == 0.33
    with pytest.raises(AssertionError, match="trained again"):  # another dataset's run is not this one
        acc.run_cached(cfg, "fgd_inherit_fcos_s0", tmp_path, "bccd")


@pytest.mark.parametrize("keep_weights", [False, True])
def test_a_recorded_run_drops_its_resume_state_and_keeps_weights_only_if_asked(tmp_path, monkeypatch, keep_weights):
    acc = _load("accuracy")
    cfg = acc.load_recipe(None, "fcos", "synth")

    def fake_training(cfg):  # what a finished run leaves in its folder
        run_dir = Path(cfg.output_dir) / cfg.name
        run_dir.mkdir(parents=True)
        for file in ("state.pt", "last.pt", "best.pt", "metrics.jsonl"):
            (run_dir / file).write_bytes(b"x")
        return SimpleNamespace(run_dir=run_dir, metrics={"AP": 0.3}, steps=5, wall_time=1.0, skipped_steps=0,
                               stopped=False)

    monkeypatch.setattr("detkd.runner.train_from_config", fake_training)
    record = acc.run_cached(cfg, "baseline_fcos_s0", tmp_path, "synth", keep_weights=keep_weights)
    left = sorted(p.name for p in Path(record["run_dir"]).iterdir())
    weights = ["best.pt", "last.pt"] if keep_weights else []
    assert left == sorted(["bench.json", "metrics.jsonl", *weights])  # state.pt is gone either way


@pytest.mark.slow
def test_accuracy_end_to_end_tiny_and_cached(tmp_path, monkeypatch):
    acc = _load("accuracy")
    argv = ["--dataset", "synth", "--methods", "fgd", "--seeds", "1", "--epochs", "1", "--cpu-reduced", "--device",
            "cpu", "--set", "data.synthetic.num_train=8", "--set", "data.synthetic.num_val=4",
            "--set", f"data.root={tmp_path / 'synth'}", "--runs-dir", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "res")]
    payload = acc.main(argv)
    for suffix in ("json", "md", "png"):
        assert (tmp_path / "res" / f"accuracy_synth.{suffix}").is_file()
    assert set(payload["summary"]["retinanet"]["methods"]) == {"fgd"}

    def no_training(cfg):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr("detkd.runner.train_from_config", no_training)
    again = acc.main(argv)
    assert again["summary"] == payload["summary"]


# ------------------------------------------------------------------------------------------------ fgd_attention


def test_fgd_attention_level_stats_on_a_known_map():
    fa = _load("fgd_attention")
    t = torch.zeros(1, 4, 5, 5)
    t[0, 1, 2, 2] = 1000.0  # one activation: attention one-hot on that cell and channel
    fg = torch.zeros(1, 5, 5)
    fg[0, 1:4, 1:4] = 1 / 9  # a 3x3 box around it
    s = {k: float(v) for k, v in fa.level_stats(t, fg, 0.8).items()}
    assert s["spatial_support"] == pytest.approx(1 / 25, abs=1e-4)
    assert s["channel_support"] == pytest.approx(1 / 4, abs=1e-4)
    assert s["peak_spatial"] == pytest.approx(25.0, rel=1e-4)
    assert s["attention_in_fg"] == pytest.approx(1.0, rel=1e-4) and s["fg_area"] == pytest.approx(9 / 25)
    assert s["mean_abs"] == pytest.approx(1000.0 / 100)
    fg_elsewhere = torch.zeros(1, 5, 5)
    fg_elsewhere[0, 0, 0] = 1.0  # the box misses the peak: no attention inside it
    assert float(fa.level_stats(t, fg_elsewhere, 0.8)["attention_in_fg"]) == pytest.approx(0.0, abs=1e-4)


def test_fgd_attention_end_to_end_on_a_cached_teacher(tmp_path):
    fa = _load("fgd_attention")
    from detkd.build import build_model
    from detkd.data import build_dataset

    argv = ["--datasets", "synth", "--family", "fcos", "--cpu-reduced", "--images", "4", "--temps", "0.8,8",
            "--set", "data.synthetic.num_train=4", "--set", "data.synthetic.num_val=4",
            "--set", f"data.root={tmp_path / 'synth'}", "--runs-dir", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "res")]
    with pytest.raises(SystemExit, match="no finished teacher run"):
        fa.main(argv)
    args = fa.parse_args(argv)
    s_args = fa.study_args("synth", args)
    cfg = fa.acc.teacher_config("fcos", s_args)
    run_dir = fa.acc.cached_run_dir(cfg, "teacher_fcos", s_args)  # where accuracy.py would have trained it
    run_dir.mkdir(parents=True)
    classes = build_dataset(cfg.data, cfg.data.val_split, train=False).num_classes
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, classes).state_dict(), run_dir / "last.pt")
    (run_dir / "bench.json").write_text(json.dumps({"metrics": {"AP": 0.25}}))
    payload = fa.main(argv)
    _check_meta(payload["meta"])
    teacher = payload["teachers"]["synth"]
    assert teacher["AP"] == pytest.approx(25.0) and set(teacher["levels"]) == {"p3", "p4", "p5", "p6", "p7"}
    for per_temp in teacher["levels"].values():
        assert set(per_temp) == {"0.8", "8.0"}
        cold, warm = per_temp["0.8"], per_temp["8.0"]
        assert 0 < cold["spatial_support"] <= warm["spatial_support"] <= 1 + 1e-6  # a larger temp spreads it
        assert cold["mean_abs"] == warm["mean_abs"] > 0
    md = (tmp_path / "res" / "fgd_attention.md").read_text()
    assert "## synth: teacher AP 25.0" in md and md.count("| p3 |") == 2


def test_fgd_attention_inspects_the_teacher_of_a_teacher_set_study(tmp_path):
    """`--teacher-set` finds the teacher that `accuracy.py --teacher-set` trained (another config hash); the
    missing-run error names that run folder."""
    fa = _load("fgd_attention")
    base = ["--datasets", "bccd", "--family", "fcos", "--cpu-reduced", "--teacher-epochs", "bccd=36",
            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "res"), "--tag", "_jitter"]
    plain, jitter = fa.parse_args(base), fa.parse_args([*base, "--teacher-set", "data.scale_jitter=[0.6,1.4]"])
    cfgs = [fa.acc.teacher_config("fcos", fa.study_args("bccd", a)) for a in (plain, jitter)]
    assert cfgs[1].data.scale_jitter == [0.6, 1.4] and cfgs[0].data.scale_jitter is None
    assert cfgs[1].train.epochs == 36
    dirs = [fa.acc.cached_run_dir(c, "teacher_fcos", fa.study_args("bccd", a)) for c, a in zip(cfgs, (plain, jitter))]
    assert dirs[0] != dirs[1]
    acc_args = fa.acc.parse_args(["--dataset", "bccd", "--family", "fcos", "--cpu-reduced", "--teacher-epochs", "36",
                                  "--teacher-set", "data.scale_jitter=[0.6,1.4]", "--runs-dir", str(tmp_path / "runs")])
    assert fa.acc.cached_run_dir(fa.acc.teacher_config("fcos", acc_args), "teacher_fcos", acc_args) == dirs[1]
    with pytest.raises(SystemExit, match=dirs[1].name):
        fa.main([*base, "--teacher-set", "data.scale_jitter=[0.6,1.4]"])


# ------------------------------------------------------------------------------------------------ common


def test_git_commit_is_dirty_for_code_changes_but_not_for_the_scripts_own_results(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    common = _load("common")
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, env={**os.environ, **env})

    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "code.py")
    git("commit", "-q", "-m", "c")
    clean = common.git_commit()
    assert clean and "+dirty" not in clean
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "accuracy_x.png").write_bytes(b"png")  # the script's own output
    assert common.git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")  # the measured code changed
    assert common.git_commit() == f"{clean}+dirty"


def test_student_set_changes_the_students_and_not_the_teacher_run():
    """`--set model.X` reaches the teacher's run too (its model is `model`); `--student-set` only the students."""
    acc = _load("accuracy")
    teacher = {"run_dir": "/nowhere"}
    base_args = acc.parse_args(["--dataset", "bccd", "--family", "fcos"])
    args = acc.parse_args(["--dataset", "bccd", "--family", "fcos",
                           "--student-set", "model.backbone=mobilenet_v3_large"])
    assert acc.teacher_config("fcos", args) == acc.teacher_config("fcos", base_args)  # same cached teacher
    assert acc.teacher_config("fcos", args).model.backbone == "resnet50"
    for method in (None, "cwd"):
        student = acc.student_config(method, "fcos", args, teacher, 0)
        assert student.model.backbone == "mobilenet_v3_large"
        assert acc.config_hash(student) != acc.config_hash(acc.student_config(method, "fcos", base_args, teacher, 0))
    assert acc.student_config("cwd", "fcos", args, teacher, 0).teacher.backbone == "resnet50"
    everywhere = acc.parse_args(["--dataset", "bccd", "--family", "fcos", "--set", "model.backbone=resnet34"])
    assert acc.teacher_config("fcos", everywhere).model.backbone == "resnet34"  # what --set does, documented
    # the reports name the students by backbone, FPN width and head convs
    assert acc.model_label(acc.student_config(None, "fcos", args, None, 0).model) == "MobileNetV3-L-FPN64, 2 head convs"
    assert acc.model_label(acc.teacher_config("fcos", args).model) == "R50-FPN128, 4 head convs"


def test_teacher_set_changes_the_teacher_run_and_not_the_students():
    """`--teacher-set` reaches the teacher's run only (after `--set` and `--teacher-epochs`), so the students'
    cached runs are the ones of the same study without it; the report names it."""
    acc = _load("accuracy")
    teacher = {"run_dir": "/nowhere"}
    plain = ["--dataset", "bccd", "--family", "fcos", "--teacher-epochs", "24"]
    base_args = acc.parse_args(plain)
    args = acc.parse_args([*plain, "--teacher-set", "data.scale_jitter=[0.6,1.4]", "--teacher-set", "train.epochs=36"])
    t = acc.teacher_config("fcos", args)
    assert t.data.scale_jitter == [0.6, 1.4] and t.train.epochs == 36  # after --teacher-epochs
    assert acc.teacher_config("fcos", base_args).data.scale_jitter is None
    assert acc.config_hash(t) != acc.config_hash(acc.teacher_config("fcos", base_args))
    for method in (None, "cwd"):
        student, same = (acc.student_config(method, "fcos", a, teacher, 0) for a in (args, base_args))
        assert student.data.scale_jitter is None and acc.config_hash(student) == acc.config_hash(same)
    settings = {"dataset": "bccd", "seeds": [0], "overrides": [], "teacher_overrides": args.teacher_overrides}
    meta = _fake_meta()
    md = acc.accuracy_markdown({"meta": meta, "settings": settings, "summary": {}, "runs": {}, "plot": None})
    assert "to the teachers only: `data.scale_jitter=[0.6,1.4] train.epochs=36`" in md


def test_the_report_lists_lgd_label_guided_branch_against_its_student():
    acc = _load("accuracy")
    lgd0, lgd1 = _record("l", 0, 0.30), _record("l", 1, 0.32)
    lgd0["metrics"].update({"lgd_branch/AP": 0.36, "lgd_branch/AP50": 0.60, "lgd_branch/AP75": 0.40})
    lgd1["metrics"].update({"lgd_branch/AP": 0.35, "lgd_branch/AP50": 0.58, "lgd_branch/AP75": 0.39})
    records = {"fcos": {"teacher": _record("teacher", 0, 0.40),
                        "baseline": {0: _record("b", 0, 0.30), 1: _record("b", 1, 0.31)},
                        "methods": {"lgd@lgd.eval_teacher=true": {0: lgd0, 1: lgd1}, "cwd": {0: _record("c", 0, 0.33),
                                                                                          1: _record("c", 1, 0.33)}}}}
    self0, self1 = _record("s", 0, 0.30), _record("s", 1, 0.30)
    self0["metrics"].update({"lgd_branch/AP": 0.40, "lgd_branch/AP50": 0.7, "lgd_branch/AP75": 0.5})
    self1["metrics"].update({"lgd_branch/AP": 0.42, "lgd_branch/AP50": 0.7, "lgd_branch/AP75": 0.5})
    records["fcos"]["methods"]["lgd@lgd.relation=self"] = {0: self0, 1: self1}
    summary = _load("stats").summarize(records, [0, 1])
    settings = {"dataset": "bccd", "seeds": [0, 1], "overrides": []}
    md = acc.accuracy_markdown({"meta": _fake_meta(), "settings": settings, "summary": summary, "runs": records})
    section = md.split("## LGD's label-guided branch")[1].split("## Runs")[0]
    assert "; lgd@lgd.relation=self (fcos) +11.0 AP" in section  # a mean per entry, not over all runs
    assert "| lgd@lgd.eval_teacher=true (fcos) | 0 | 30.0 | 36.0 | 60.0 | 40.0 | +6.0 |" in section
    assert "| lgd@lgd.eval_teacher=true (fcos) | 1 | 32.0 | 35.0 | 58.0 | 39.0 | +3.0 |" in section
    assert "each entry: lgd@lgd.eval_teacher=true (fcos) +4.5; lgd@" in section
    assert "cwd" not in section  # only runs that evaluated it
    plain = {"fcos": {**records["fcos"], "methods": {"cwd": records["fcos"]["methods"]["cwd"]}}}  # no branch
    md = acc.accuracy_markdown({"meta": _fake_meta(), "settings": settings,
                                "summary": _load("stats").summarize(plain, [0, 1]), "runs": plain})
    assert "label-guided branch" not in md


def _tiny_synth_args(acc, tmp_path):
    """A study's arguments on a synthetic set of 16 images written under ``tmp_path`` (LGD's scaled warm-up counts
    the training images: no test here may need ../shared/data)."""
    return acc.parse_args(["--dataset", "synth", "--family", "fcos", "--set", f"data.root={tmp_path / 'synth'}",
                           "--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_val=4",
                           "--set", "data.synthetic.image_size=64"])


def test_a_variant_sets_a_flag_as_a_bool_and_leaves_other_words_alone(tmp_path):
    acc = _load("accuracy")
    args = _tiny_synth_args(acc, tmp_path)

    def lgd_params(entry: str) -> dict:
        return acc.student_config("lgd", "fcos", args, None, 0, acc.parse_variant(entry)).distill.losses[0].params

    # flags are booleans: the word "false" reaching a loss as a string would be truthy
    assert lgd_params("lgd@lgd.eval_teacher=false")["eval_teacher"] is False
    assert lgd_params("lgd@lgd.eval_teacher=True")["eval_teacher"] is True
    for bad in ("lgd@lgd.eval_teacher=1", "lgd@lgd.eval_teacher=yes"):
        with pytest.raises(ValueError, match="lgd.eval_teacher is a flag"):
            lgd_params(bad)
    # a string parameter whose value is the word "true" stays that word (VLR's DIoU variant)
    ld = acc.student_config("ld", "gfl", args, {"run_dir": "/nowhere"}, 0, acc.parse_variant("ld@vlr_ld.diou=true"))
    assert [lc.params["diou"] for lc in ld.distill.losses if lc.method == "vlr_ld"] == ["true"]


def test_a_variant_parameter_is_not_undone_by_the_scaled_lgd_warm_up(tmp_path):
    acc = _load("accuracy")
    args = _tiny_synth_args(acc, tmp_path)
    plain = acc.student_config("lgd", "fcos", args, None, 0)
    steps = acc.planned_steps(plain.data, plain.train)
    assert plain.distill.losses[0].params["freeze_backbone_steps"] == round(steps / 9) > 0
    unfrozen = acc.student_config("lgd", "fcos", args, None, 0, acc.parse_variant("lgd@lgd.freeze_backbone_steps=0"))
    params = unfrozen.distill.losses[0].params
    assert params["freeze_backbone_steps"] == 0  # the variant's, not the scaled warm-up's
    assert params["pre_nondistill_steps"] == plain.distill.losses[0].params["pre_nondistill_steps"] == round(steps / 6)


def test_ld_positives_on_tiny_runs(tmp_path):
    lp = _load("ld_positives")
    from detkd.build import build_model
    from detkd.config import apply_override, dump_config, load_config
    from detkd.data import build_dataset

    cfg = load_config(BENCH.parent / "configs" / "baseline_gfl_r18_synth.yaml")
    for ov in ("data.synthetic.num_train=4", "data.synthetic.num_val=4", "data.synthetic.image_size=64",
               f"data.root={tmp_path / 'synth'}", "model.min_size=64", "model.max_size=64"):
        cfg = apply_override(cfg, ov)
    classes = build_dataset(cfg.data, cfg.data.val_split, train=False).num_classes
    torch.manual_seed(0)
    state = build_model(cfg.model, classes).state_dict()
    dirs = {}
    for name in ("teacher", "a", "b"):  # three copies of one model: every statistic must agree, nobody beats "a"
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        dump_config(cfg, dirs[name] / "config.yaml")
        torch.save(state, dirs[name] / "last.pt")
    argv = ["--teacher", str(dirs["teacher"]), "--student", f"a={dirs['a']}", "--student", f"b={dirs['b']}",
            "--out-dir", str(tmp_path / "res")]
    payload = lp.main(argv)
    _check_meta(payload["meta"])
    assert payload["positives"] > 0 and payload["settings"]["reference"] == "a"
    models = payload["models"]
    assert set(models) == {"teacher", "a", "b"}
    for r in models.values():
        assert 0.0 <= r["iou_mean"] <= 1.0 and r["beats_reference"] == 0.0  # ties are not wins
        assert 0.0 < r["entropy_tau1"] <= r["entropy_tau10"] <= math.log(17) + 1e-6
        for key in lp.STATS:
            assert r[key] == pytest.approx(models["a"][key])
    assert (tmp_path / "res" / "ld_positives.md").is_file()
    dump_config(apply_override(cfg, "model.family=fcos"), dirs["teacher"] / "config.yaml")
    with pytest.raises(SystemExit, match="a fcos run; the statistics read GFL's edge distributions"):
        lp.main(argv)
    dump_config(cfg, dirs["teacher"] / "config.yaml")
    (dirs["b"] / "last.pt").unlink()
    with pytest.raises(SystemExit, match="no last.pt"):
        lp.main(argv)
    with pytest.raises(SystemExit):
        lp.parse_args(["--teacher", "t", "--student", "a=x", "--reference", "c"])


# ------------------------------------------------------------------------------------------------ lgd_masks


def test_lgd_masks_counts_grid_points_by_hand():
    lm = _load("lgd_masks")
    # padded batch 64x64; p3 is 8x8 (a grid point every 8 px), p5 2x2 (every 32 px, at 0 and 32 in input pixels)
    levels = {"p3": (8, 8), "p5": (2, 2)}
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 24.0, 24.0],    # p3: x,y in 0..3 -> 4x4; p5: 0..0.75 -> (0,0)
                                       [42.0, 42.0, 46.0, 46.0]]),  # p3: 5.25..5.75 -> none; p5: 1.31..1.44 -> none
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # no rows for it
    points, labels = lm.box_points(targets, (64, 64), levels, num_classes=2)
    assert points.tolist() == [[16, 1], [0, 0]] and labels.tolist() == [1, 2]
    s = lm.summarise(points, labels, list(levels), ["a", "b"])
    assert s["all"]["boxes"] == 2 and s["all"]["empty"] == {"p3": 0.5, "p5": 0.5}
    assert s["all"]["empty_all_levels"] == 0.5 and s["b"]["empty_all_levels"] == 1.0
    assert s["a"]["points"] == {"p3": 16.0, "p5": 1.0}


def test_lgd_masks_end_to_end_tiny(tmp_path):
    lm = _load("lgd_masks")
    argv = ["--datasets", "synth", "--cpu-reduced", "--set", "data.synthetic.num_train=4",
            "--set", "data.synthetic.num_val=4", "--set", f"data.root={tmp_path / 'synth'}",
            "--out-dir", str(tmp_path / "res")]
    payload = lm.main(argv)
    _check_meta(payload["meta"])
    entry = payload["datasets"]["synth"]
    assert entry["images"] == 4 and entry["input_size"] == "96/96" and entry["batch_shapes"] == [(96, 96)]
    assert entry["level_hw"] == {"p3": [12, 12], "p4": [6, 6], "p5": [3, 3], "p6": [2, 2], "p7": [1, 1]}
    cov = entry["coverage"]["all"]
    assert cov["boxes"] > 0 and cov["empty"]["p3"] <= cov["empty"]["p5"] <= cov["empty"]["p7"]
    md = (tmp_path / "res" / "lgd_masks.md").read_text()
    assert "## synth: train split, 4 images, input 96/96" in md and "| every level |" in md


# ------------------------------------------------------------------------------------------------ lgd_relations


def test_lgd_relations_box_shares_by_hand():
    lr = _load("lgd_relations")
    # image 0: boxes of class 1, 1, 2 and a context row; image 1: one box (left out: alone in its image)
    labels = torch.tensor([1, 1, 2, 0, 3])
    image_index = torch.tensor([0, 0, 0, 0, 1])
    w = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0],
                      [0.6, 0.1, 0.3, 0.0, 0.0],   # box 1 attends mostly to box 0 (same class)
                      [0.1, 0.1, 0.4, 0.4, 0.0],   # its largest weight is the context row: still "own" among boxes
                      [0.2, 0.2, 0.2, 0.4, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 1.0]])
    s = {k: v.tolist() for k, v in lr.box_shares(w, labels, image_index).items()}
    assert s["own"] == pytest.approx([0.5, 0.1, 0.4]) and s["uniform"] == pytest.approx([1 / 3] * 3)
    assert s["argmax_own"] == [1.0, 0.0, 1.0]
    assert s["same_class"] == pytest.approx([0.2, 0.6, 0.0])
    assert s["other_class"] == pytest.approx([0.2, 0.3, 0.2])
    assert s["class_mass"] == pytest.approx([0.7, 0.7, 0.4])
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [5.0, 5.0], [1.0, 0.0]])
    cos = lr.label_cosine(emb, labels, image_index)  # pairs among rows 0-2 (row 3 is context, row 4 alone)
    h = 2 ** -0.5
    assert sorted(cos.tolist()) == pytest.approx(sorted([h, h, 0.0, 0.0, h, h]))


def test_lgd_relations_end_to_end_on_a_saved_state(tmp_path):
    lr = _load("lgd_relations")
    from detkd.build import build_distiller, build_model
    from detkd.config import apply_override, dump_config, load_config
    from detkd.data import build_dataset

    cfg = load_config(BENCH.parent / "configs" / "lgd_fcos_r18_synth.yaml")
    for o in ["data.synthetic.num_train=4", "data.synthetic.num_val=4", f"data.root={tmp_path / 'synth'}",
              "model.min_size=96", "model.max_size=96"]:
        cfg = apply_override(cfg, o)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match="no state.pt"):
        lr.main([str(run_dir), "--out-dir", str(tmp_path / "res")])
    with pytest.raises(SystemExit):  # no images: an argument error, not a failure after loading the run
        lr.parse_args([str(run_dir), "--images", "0"])
    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    torch.manual_seed(0)
    distiller = build_distiller(build_model(cfg.model, val.num_classes), None, cfg.distill,
                                num_classes=val.num_classes)
    run_dir.mkdir()
    dump_config(cfg, run_dir / "config.yaml")
    torch.save({"trainable": distiller.state_dict()}, run_dir / "state.pt")
    (run_dir / "result.json").write_text(json.dumps({"metrics": {"AP": 0.2, "lgd_branch/AP": 0.1}}))
    payload = lr.main([str(run_dir), "--out-dir", str(tmp_path / "res"), "--tag", "_t"])
    _check_meta(payload["meta"])
    (run,) = payload["runs"]
    assert run["images"] == 4 and run["AP"] == pytest.approx(20.0) and run["branch_AP"] == pytest.approx(10.0)
    assert set(run["levels"]) == {"p3", "p4", "p5", "p6", "p7"}
    assert run["images_with_2plus_boxes"] >= 1 and run["boxes_counted"] >= 2
    for s in run["levels"].values():
        assert 0 <= s["own"] <= s["class_mass"] <= 1 + 1e-6 and 0 <= s["argmax_own"] <= 1
        assert s["class_mass"] + s["other_class"] <= 1 + 1e-6  # the rest is the context row's
    assert run["relation"] == "image" and -1 <= run["label_embedding_cosine"] <= 1
    md = (tmp_path / "res" / "lgd_relations_t.md").read_text()
    assert "## `run`" in md and "student AP 20.0, branch AP 10.0" in md
