from pathlib import Path

import pytest
import yaml

from detkd.config import Config, ConfigError, apply_override, dump_config, load_config


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_load_nested_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {
        "name": "x",
        "model": {"family": "fcos", "backbone": "resnet18", "fpn_channels": 32},
        "teacher": {"family": "fcos", "backbone": "resnet50", "weights": "t.pt"},
        "distill": {"losses": [{"method": "cwd", "weight": 10, "params": {"tau": 1.0}, "levels": ["p3", "p4"]}]},
        "train": {"lr": 0.02, "milestones": [0.5]},
    }))
    assert cfg.model.family == "fcos" and cfg.model.fpn_channels == 32
    assert cfg.teacher.backbone == "resnet50" and cfg.teacher.fpn_channels == 256
    assert cfg.distill.losses[0].weight == 10.0 and isinstance(cfg.distill.losses[0].weight, float)
    assert cfg.distill.losses[0].levels == ["p3", "p4"]
    assert cfg.train.lr == 0.02 and cfg.train.epochs == 12
    assert cfg.run_dir == Path("runs/x")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr"):
        load_config(_write(tmp_path, {"train": {"lrr": 0.1}}))
    with pytest.raises(ConfigError, match=r"unknown key distill\.losses\[0\]\.wieght"):
        load_config(_write(tmp_path, {"distill": {"losses": [{"method": "fgd", "wieght": 1}]}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(_write(tmp_path, {"train": {"epochs": "twelve"}}))
    with pytest.raises(ConfigError, match=r"data\.hflip: expected a number"):
        load_config(_write(tmp_path, {"data": {"hflip": True}}))
    with pytest.raises(ConfigError, match=r"model\.weights"):
        load_config(_write(tmp_path, {"model": {"weights": 3}}))


def test_overrides_are_typed():
    cfg = apply_override(Config(), "train.epochs=3")
    assert cfg.train.epochs == 3
    cfg = apply_override(cfg, "model.options.representation_size=64")
    assert cfg.model.options == {"representation_size": 64}
    cfg = apply_override(cfg, "teacher.backbone=resnet50")
    assert cfg.teacher.backbone == "resnet50" and cfg.teacher.family == "retinanet"
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        apply_override(cfg, "train.epochs=abc")
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        apply_override(cfg, "train.nope=1")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(cfg, "train.epochs")


def test_an_override_names_a_list_entry_by_its_index():
    """``distill.losses.1.params.tau=2`` sets one loss's parameter (the LD recipes hold three losses)."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "ld_gfl_r50_r18_synth.yaml")
    methods = [lc.method for lc in cfg.distill.losses]
    assert methods == ["ld", "kd", "vlr_ld"]
    out = apply_override(cfg, "distill.losses.2.params.tau=2")
    assert out.distill.losses[2].params["tau"] == 2
    assert [lc.params for lc in out.distill.losses[:2]] == [lc.params for lc in cfg.distill.losses[:2]]
    out = apply_override(out, "distill.losses.1.weight=0.25")
    assert out.distill.losses[1].weight == 0.25 and out.distill.losses[0].weight == cfg.distill.losses[0].weight
    whole = apply_override(cfg, "distill.losses.0={method: ld, weight: 0.5}")  # an entry, type-checked
    assert whole.distill.losses[0].method == "ld" and whole.distill.losses[0].params == {}
    with pytest.raises(ConfigError, match=r"distill\.losses\[0\]\.weight: expected a number"):
        apply_override(cfg, "distill.losses.0.weight=big")
    with pytest.raises(ConfigError, match=r"unknown key distill\.losses\.0\.nope"):
        apply_override(cfg, "distill.losses.0.nope=1")
    for bad in ("distill.losses.3.weight=1", "distill.losses.kd.weight=1", "distill.losses.-1.weight=1"):
        with pytest.raises(ConfigError, match=r"distill\.losses has 3 entries, named by their index 0\.\.2"):
            apply_override(cfg, bad)
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.levels is not a section"):  # a list of values
        apply_override(cfg, "distill.losses.0.levels.0=p3")
    empty = apply_override(Config(), "distill.inherit=true")  # a recipe without losses: no entry to name
    with pytest.raises(ConfigError, match="has 0 entries"):
        apply_override(empty, "distill.losses.0.weight=1")


def test_dump_roundtrip(tmp_path):
    cfg = apply_override(Config(), "train.epochs=5")
    dump_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_key_given_twice_and_an_empty_recipe_are_errors(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train: {epochs: 2, lr: 0.1}\nmodel: {family: fcos}\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"(?s)dup\.yaml.*'train' a second time \(first on line 1\)"):
        load_config(p)
    p.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")  # nested too
    with pytest.raises(ConfigError, match="'lr' a second time"):
        load_config(p)
    p.write_text("")
    with pytest.raises(ConfigError, match=r"dup\.yaml: empty recipe"):
        load_config(p)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", r"train\.epochs must be at least 1, got 0"),
    ("train.max_steps=0", r"train\.max_steps must be at least 1"),
    ("train.lr=-0.1", r"train\.lr must be positive"),
    ("data.batch_size=0", r"data\.batch_size must be at least 1"),
    ("data.hflip=2.0", r"data\.hflip is a probability"),
    ("eval.batch_size=0", r"eval\.batch_size must be at least 1"),
    ("distill.losses.0.stop_step=0", r"distill\.losses\[0\] \(cwd\): stop_step \(0\) must be after start_step"),
])
def test_values_without_meaning_are_errors_naming_the_key(tmp_path, override, message):
    p = _write(tmp_path, {"train": {"epochs": 2}, "distill": {"losses": [{"method": "cwd"}]}})
    assert load_config(p).train.epochs == 2
    with pytest.raises(ConfigError, match=message):
        load_config(p, [override])


def test_max_steps_replaces_epochs_only_when_set(tmp_path):
    from detkd.engine.optim import total_steps

    cfg = load_config(_write(tmp_path, {"train": {"epochs": 0, "max_steps": 7}}))  # epochs unused: no error
    assert total_steps(cfg.train, 10) == 7
    cfg = load_config(_write(tmp_path, {"train": {"epochs": 3}}))
    assert total_steps(cfg.train, 10) == 30


def test_off_and_yes_are_words_not_booleans(tmp_path):
    """YAML 1.2 booleans: ``train.amp: off`` is the string it looks like (PyYAML's YAML 1.1 made it False, and the
    config refused it as not a string); a bool field takes only true/false and names the key otherwise."""
    p = tmp_path / "c.yaml"
    p.write_text("train: {amp: off}\ndistill: {losses: [{method: cwd}], check_first_step: false}\n")
    cfg = load_config(p)
    assert cfg.train.amp == "off" and cfg.distill.check_first_step is False
    assert load_config(p, ["train.amp=off"]).train.amp == "off"
    assert load_config(p, ["distill.check_first_step=true"]).distill.check_first_step is True
    with pytest.raises(ConfigError, match="distill.check_first_step: expected true or false, got 'yes'"):
        load_config(p, ["distill.check_first_step=yes"])


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; a float field takes it as the number everyone means."""
    p = tmp_path / "c.yaml"
    p.write_text("train: {lr: 1e-3, weight_decay: 5E-4}\n")
    cfg = load_config(p, ["distill.losses=[{method: cwd, weight: 2e1}]"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005 and cfg.distill.losses[0].weight == 20.0
    for bad in ("train.lr=1e", "train.lr=e3", "train.lr=one"):
        with pytest.raises(ConfigError, match="train.lr: expected a number"):
            load_config(p, [bad])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):  # ints stay strict
        load_config(p, ["train.epochs=1e1"])
