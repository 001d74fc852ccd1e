"""The command line as a user runs it: data stats/synth, train, eval, inspect, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from detkd.cli import main


def _flat(text: str) -> str:
    """``text`` without whitespace: rich wraps long lines wherever the terminal width puts the break."""
    return "".join(text.split())


def _recipe(tmp_path: Path, **extra) -> Path:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {"format": "synthetic", "root": str(tmp_path / "synth"), "batch_size": 2,
                 "synthetic": {"num_train": 4, "num_val": 2, "image_size": 64, "max_objects": 3, "seed": 1}},
        "model": {"family": "fcos", "backbone": "resnet18", "fpn_channels": 16, "head_convs": 1,
                  "min_size": 64, "max_size": 64},
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 1e-3, "warmup_steps": 0, "progress": False},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_data_stats_json_on_shared_bccd(shared_data, capsys):
    assert main(["data", "stats", str(shared_data / "bccd" / "voc"), "--split", "test", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    expected = json.loads((shared_data / "bccd" / "coco" / "stats.json").read_text())
    assert stats["images"] == 72
    assert set(stats["classes"]) == {"RBC", "WBC", "Platelets"}
    assert sum(stats["boxes_per_class"].values()) == stats["boxes"]
    assert "test" in json.dumps(expected)


def test_data_synth_writes_coco(tmp_path):
    out = tmp_path / "s"
    assert main(["data", "synth", str(out), "--num-train", "3", "--num-val", "2", "--image-size", "64"]) == 0
    ann = json.loads((out / "annotations_train.json").read_text())
    assert len(ann["images"]) == 3 and len(ann["categories"]) >= 5


def test_train_eval_inspect_roundtrip(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--set", "train.max_steps=2"]) == 0
    run = tmp_path / "runs" / "tiny"
    for name in ("last.pt", "state.pt", "config.yaml", "metrics.jsonl", "result.json"):
        assert (run / name).is_file(), name
    state = torch.load(run / "last.pt", weights_only=True)
    assert any(k.startswith("backbone.body.") for k in state)
    capsys.readouterr()
    assert main(["eval", str(recipe), "--checkpoint", str(run / "last.pt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "p3" in out and "p7" in out
    assert main(["viz-curves", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000
    assert main(["viz", str(recipe), "--student", str(run / "last.pt"), "--out", str(tmp_path / "viz"),
                 "--images", "1"]) == 0
    assert (tmp_path / "viz" / "img000_detections.png").is_file() and (tmp_path / "viz" / "index.md").is_file()


def test_inspect_shows_distillation_wiring(tmp_path, capsys):
    recipe = _recipe(tmp_path, teacher={"family": "fcos", "backbone": "resnet18", "fpn_channels": 32,
                                        "head_convs": 1, "min_size": 64, "max_size": 64, "weights": "unused.pt"},
                     distill={"losses": [{"method": "fgd", "levels": ["p3", "p4"]}]})
    assert main(["inspect", str(recipe)]) == 0
    assert "fgd" in capsys.readouterr().out
    from detkd.config import load_config
    from detkd.inspect import inspect_config

    report = inspect_config(load_config(recipe))
    assert report["levels"]["p3"] == [2, 16, 8, 8]
    (fgd,) = report["losses"]
    assert fgd["levels"] == ["p3", "p4"] and fgd["teacher_stage"] == "features"
    assert fgd["connectors"] == 2  # 16 -> 32 channel align convs, one per level


def test_errors_name_the_problem(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--set", "train.epochz=1"]) == 2
    assert "unknown key train.epochz" in capsys.readouterr().out
    assert main(["eval", str(recipe), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick(tmp_path):
    from detkd.demo import run_demo

    report = run_demo(quick=True, out_dir=tmp_path)
    assert [r["model"] for r in report["rows"]][0].startswith("teacher")
    assert len(report["rows"]) == 3


def test_a_run_stopped_by_a_signal_is_not_taken_for_a_finished_one(tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM end a run early with its resume state: `train` says so (exit 130), result.json records it,
    the demo neither reuses such a teacher nor goes on to the next model."""
    import detkd.demo as demo
    import detkd.runner as runner
    from detkd.engine.loop import FitResult

    def stopped_fit(trainable, loader, train_cfg, run_dir, **kwargs):
        run_dir.mkdir(parents=True, exist_ok=True)
        return FitResult(steps=1, epochs=0, last_metrics={"AP": 0.1}, best_metric=0.1, wall_time=0.0,
                         skipped_steps=0, stopped=True)

    monkeypatch.setattr(runner, "fit", stopped_fit)
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--set", "train.lr=0.002"]) == 130
    out = capsys.readouterr().out
    assert _flat(f"detkd train {recipe} --set=train.lr=0.002 --resume") in _flat(out)  # the overrides kept
    result_file = tmp_path / "runs" / "tiny" / "result.json"
    assert json.loads(result_file.read_text())["stopped"] is True

    teacher, _, _ = demo._configs(demo.QUICK, "fgd", tmp_path / "demo")
    teacher.run_dir.mkdir(parents=True)
    (teacher.run_dir / "last.pt").write_bytes(b"")
    (teacher.run_dir / "result.json").write_text(json.dumps({"metrics": {}, "steps": 1, "wall_time": 0.0,
                                                              "stopped": True}))
    assert demo._cached(teacher) is None  # trained again, not reused
    (teacher.run_dir / "result.json").write_text(json.dumps({"metrics": {}, "steps": 1, "wall_time": 0.0}))
    assert demo._cached(teacher) is not None  # a finished run (older files have no "stopped" key) is reused
    monkeypatch.setattr(demo, "train_from_config", lambda cfg: runner.RunResult(cfg.run_dir, {}, 1, 0.0, stopped=True))
    (teacher.run_dir / "result.json").unlink()
    with pytest.raises(SystemExit, match="interrupted during teacher"):
        demo.run_demo(quick=True, out_dir=tmp_path / "demo")


def test_the_demo_parser_offers_the_demos_methods_with_its_default_first():
    import detkd.demo as demo
    from detkd.cli import DEMO_METHODS, build_parser

    assert set(DEMO_METHODS) == set(demo.METHODS) and DEMO_METHODS[0] == demo.DEFAULT_METHOD == "cwd"
    assert build_parser().parse_args(["demo"]).method == "cwd"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--method", "kd"])


def test_demo_teacher_cache_is_keyed_by_config_and_cache_version(tmp_path, monkeypatch):
    """A teacher cached before a change that alters training (the version) or under another config is not reused."""
    import detkd.demo as demo

    name = demo._configs(demo.QUICK, "cwd", tmp_path)[0].name
    assert name == demo._configs(demo.QUICK, "cwd", tmp_path)[0].name  # stable: the same config finds its cache
    assert name != demo._configs(demo.FULL, "cwd", tmp_path)[0].name
    monkeypatch.setattr(demo, "TEACHER_CACHE_VERSION", demo.TEACHER_CACHE_VERSION + 1)
    assert name != demo._configs(demo.QUICK, "cwd", tmp_path)[0].name


def test_a_run_folder_is_not_overwritten_or_resumed_with_another_recipe(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    run = tmp_path / "runs" / "tiny"
    assert main(["train", str(recipe), "--set", "train.max_steps=2"]) == 0
    first = (run / "result.json").read_text()
    capsys.readouterr()
    # again without --resume / --overwrite: refused, nothing touched
    assert main(["train", str(recipe), "--set", "train.max_steps=2"]) == 2
    assert "alreadyholdsarun" in _flat(capsys.readouterr().out) and (run / "result.json").read_text() == first
    # resuming a finished run: refused (it used to write an empty result.json over the metrics)
    assert main(["train", str(recipe), "--set", "train.max_steps=2", "--resume"]) == 2
    assert "alreadyfinished(2of2steps)" in _flat(capsys.readouterr().out)
    assert (run / "result.json").read_text() == first
    # resuming with another recipe: refused, naming what changed (the old schedule would go on silently)
    assert main(["train", str(recipe), "--set", "train.max_steps=4", "--set", "train.lr=0.1", "--resume"]) == 2
    out = _flat(capsys.readouterr().out)
    assert all(_flat(m) in out for m in ("config differs", "train.lr: 0.001 -> 0.1", "train.max_steps: 2 -> 4"))
    # --overwrite: a new run whose logs do not mix with the old one's
    assert main(["train", str(recipe), "--set", "train.max_steps=3", "--overwrite"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 3 and len(list((run / "tb").glob("events.*"))) == 1


def test_checkpoints_of_another_model_or_corrupt_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    other = _recipe(tmp_path / "o")
    recipe = _recipe(tmp_path)
    assert main(["train", str(other), "--set", "train.max_steps=1", "--set", "model.fpn_channels=32"]) == 0
    wide = tmp_path / "o" / "runs" / "tiny" / "last.pt"
    capsys.readouterr()
    assert main(["eval", str(recipe), "--checkpoint", str(wide)]) == 2
    out = _flat(capsys.readouterr().out)
    assert "hasshape" in out and "last.pt" in out and "Traceback" not in out
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(wide.read_bytes()[:5000])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, empty):
        assert main(["eval", str(recipe), "--checkpoint", str(bad)]) == 2
        assert _flat(f"{bad}: not a readable PyTorch checkpoint") in _flat(capsys.readouterr().out)
    state = tmp_path / "o" / "runs" / "tiny" / "state.pt"  # a resume state is not a student checkpoint
    assert main(["eval", str(recipe), "--checkpoint", str(state)]) == 2
    assert "expectedastate_dict" in _flat(capsys.readouterr().out)


def test_a_device_this_machine_lacks_and_paths_that_are_files_are_one_line_errors(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", str(recipe), "--set", "train.device=cuda"]) == 2
    assert "seesnoCUDAGPU" in _flat(capsys.readouterr().out)
    assert main(["train", str(recipe), "--set", "train.device=gpu"]) == 2
    assert "'gpu'isnotadevice" in _flat(capsys.readouterr().out)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "synth", str(afile), "--num-train", "1", "--num-val", "1", "--image-size", "64"]) == 2
    out = _flat(capsys.readouterr().out)
    assert "afile" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()  # nothing was trained
