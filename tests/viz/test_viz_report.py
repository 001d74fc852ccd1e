"""render_report end to end on synthetic data with tiny models: files, PNGs, weights and loss-module state."""

from __future__ import annotations

import pytest
import torch
from matplotlib.image import imread

from detkd.config import Config, DataConfig, DistillConfig, LossConfig, ModelConfig, SynthConfig
from detkd.data import build_dataset
from detkd.viz import build_viz_models, render_report


def _model_cfg(family: str, fpn: int) -> ModelConfig:
    return ModelConfig(family=family, backbone="resnet18", fpn_channels=fpn, head_convs=1, min_size=64, max_size=64)


def _num_classes(data_cfg: DataConfig) -> int:
    return build_dataset(data_cfg, "val", train=False).num_classes


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("synth")
    return DataConfig(format="synthetic", root=str(root), synthetic=SynthConfig(num_train=4, num_val=2, image_size=64))


def test_report_for_fgd_ld_cwd_writes_readable_pngs(data_cfg, tmp_path, png_ok):
    losses = [LossConfig("fgd", levels=["p3", "p4"]), LossConfig("ld"), LossConfig("kd"), LossConfig("vlr_ld"),
              LossConfig("cwd", levels=["p4"]), LossConfig("hint", levels=["p3"])]
    cfg = Config(name="viz", data=data_cfg, model=_model_cfg("gfl", 16), teacher=_model_cfg("gfl", 32),
                 distill=DistillConfig(losses=losses))
    with pytest.warns(UserWarning, match="the teacher has no weights"):
        paths = render_report(cfg, tmp_path / "out", num_images=1)
    names = [p.name for p in paths]
    assert names == ["img000_detections.png", "img000_fgd.png", "img000_cwd.png", "img000_ld_regions.png",
                     "img000_ld_edges.png"]
    for p in paths:
        png_ok(p)
    index = (tmp_path / "out" / "index.md").read_text()
    assert "No pictures for: hint" in index and "FRESH INIT" in index
    assert all(f"[{n}]({n})" in index for n in names)


def test_weights_and_loss_state_are_loaded_and_detections_drawn(data_cfg, tmp_path, png_ok):
    cfg = Config(name="lgd", data=data_cfg, model=_model_cfg("retinanet", 16),
                 distill=DistillConfig(losses=[LossConfig("lgd", params={"num_heads": 2})]))
    fresh = build_viz_models(cfg, _num_classes(data_cfg))
    assert fresh.student_source is None and fresh.loss_source is None
    # a run folder: last.pt (plain student) + state.pt whose trainable holds the Distiller's loss modules
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(123)
    student_state = {k: v + torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in fresh.student.state_dict().items()}
    lgd_state = {k: torch.randn_like(v) for k, v in fresh.losses[0][1].state_dict().items()}
    torch.save(student_state, run / "last.pt")
    torch.save({"trainable": {**{f"student.{k}": v for k, v in student_state.items()},
                              **{f"losses.0.module.{k}": v for k, v in lgd_state.items()}}}, run / "state.pt")
    loaded = build_viz_models(cfg, _num_classes(data_cfg), student_weights=run / "last.pt")
    assert loaded.student_source == str(run / "last.pt") and loaded.loss_source == str(run / "state.pt")
    for k, v in loaded.student.state_dict().items():
        assert torch.equal(v, student_state[k]), k
    for k, v in loaded.losses[0][1].state_dict().items():
        assert torch.equal(v, lgd_state[k]), k

    with_w = render_report(cfg, tmp_path / "w", student_weights=run / "last.pt", num_images=1)
    without = render_report(cfg, tmp_path / "fresh", num_images=1)
    assert [p.name for p in with_w] == ["img000_detections.png", "img000_lgd.png"]
    for p in with_w:
        png_ok(p)
    # GT alone without weights; GT + the student's detections side by side with them
    assert imread(with_w[0]).shape[1] > 1.5 * imread(without[0]).shape[1]


def test_loss_state_that_does_not_fit_is_an_error(data_cfg, tmp_path):
    cfg = Config(name="lgd", data=data_cfg, model=_model_cfg("retinanet", 16),
                 distill=DistillConfig(losses=[LossConfig("lgd", params={"num_heads": 2})]))
    fresh = build_viz_models(cfg, _num_classes(data_cfg))
    torch.save(fresh.student.state_dict(), tmp_path / "last.pt")
    torch.save({"trainable": {"losses.0.module.adapter.convs.0.weight": torch.zeros(1)}}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: the state of loss 0 \(lgd\)"):
        build_viz_models(cfg, _num_classes(data_cfg), student_weights=tmp_path / "last.pt")
