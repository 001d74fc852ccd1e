"""Distiller + FrozenTeacher end to end on tiny detectors: every method trains 2 iterations through the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from detkd.build import build_distiller
from detkd.config import DistillConfig, LossConfig, TrainConfig
from detkd.distill.distiller import WiringError
from detkd.distill.teacher import FrozenTeacher
from detkd.engine.loop import fit
from detkd.models import build
from detkd.models.adapters import build_adapter

SIZE = 64


def _model(family: str, backbone: str = "resnet18", fpn: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    opts = {"representation_size": 32} if family == "faster_rcnn" else {}
    return build(family, backbone=backbone, num_classes=3, fpn_channels=fpn, head_convs=1, min_size=SIZE,
                 max_size=SIZE, **opts)


def _batch():
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without boxes
    ]
    return images, targets


def _distiller(family: str, losses: list[LossConfig], *, teacher: bool = True, t_fpn: int = 32, **dc):
    student = _model(family)
    frozen = FrozenTeacher(_model(family, fpn=t_fpn, seed=1)) if teacher else None
    return build_distiller(student, frozen, DistillConfig(losses=losses, **dc), num_classes=3, max_steps=2)


CASES = {
    "cwd": ("retinanet", [LossConfig("cwd", weight=10.0)]),
    "fgd": ("fcos", [LossConfig("fgd", params={"alpha_fgd": 1e-3, "beta_fgd": 5e-4, "gamma_fgd": 5e-4,
                                               "lambda_fgd": 5e-6})]),
    "hint": ("faster_rcnn", [LossConfig("hint", levels=["p3", "p4"], weight=0.5)]),
    "ld": ("gfl", [LossConfig("ld", weight=0.25), LossConfig("kd", weight=10.0), LossConfig("vlr_ld", weight=0.25)]),
    "chen": ("faster_rcnn", [LossConfig("chen"), LossConfig("hint", levels=["p3"], weight=0.5)]),
    "kd_dense": ("retinanet", [LossConfig("kd", weight=1.0)]),
    "chen_dense_retinanet": ("retinanet", [LossConfig("chen_dense")]),
    "chen_dense_fcos": ("fcos", [LossConfig("chen_dense")]),
    "chen_dense_gfl": ("gfl", [LossConfig("chen_dense")]),
    "cwd_gfl_logits": ("gfl", [LossConfig("cwd", params={"source": "cls_logits"})]),
    "fgd_faster_rcnn": ("faster_rcnn", [LossConfig("fgd", levels=["p2", "p3", "p4", "p5"])]),
    "fgd_gfl": ("gfl", [LossConfig("fgd")]),
    "hint_retinanet": ("retinanet", [LossConfig("hint", levels=["p3"])]),
    "cwd_fcos": ("fcos", [LossConfig("cwd")]),
}
SAME_HEAD = ("ld", "chen", "kd_dense", "chen_dense_retinanet", "chen_dense_fcos", "chen_dense_gfl", "cwd_gfl_logits")


class _Loader(list):
    """A two-batch loader for the engine."""


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_iterations_each_method(name, tmp_path):
    family, losses = CASES[name]
    same_width = name in SAME_HEAD  # logit methods need the same head
    d = _distiller(family, losses, t_fpn=16 if same_width else 32)
    teacher_before = copy.deepcopy(d.teacher.model.state_dict())
    cfg = TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", warmup_steps=0, progress=False, log_every=1)
    result = fit(d, _Loader([_batch(), _batch()]), cfg, tmp_path / name, seed=0)
    assert result.steps == 2 and result.skipped_steps == 0
    # the teacher is a constant: unchanged weights, still in eval mode, no grads
    for k, v in d.teacher.model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not d.teacher.model.training
    assert all(p.grad is None for p in d.teacher.model.parameters())
    # the saved student is a plain detector state_dict
    plain = _model(family)
    plain.load_state_dict(torch.load(tmp_path / name / "last.pt", weights_only=True), strict=True)


@pytest.mark.parametrize("name,amp", [("chen", "bf16"), ("ld", "bf16"), ("chen_dense_fcos", "bf16"),
                                      ("fgd_faster_rcnn", "bf16"), ("cwd", "bf16"), ("chen", "fp16"), ("ld", "fp16")])
def test_two_iterations_under_autocast(name, amp, tmp_path):
    """train.amp=bf16 / fp16 (CUDA's defaults, here on CPU): Chen's fp32 teacher reads the student's proposals in
    roi_align (a dtype mismatch when they came out bf16); every family's geometry stays fp32
    (tests/models/test_precision.py)."""
    family, losses = CASES[name]
    d = _distiller(family, losses, t_fpn=16 if name in SAME_HEAD else 32)
    cfg = TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", warmup_steps=0, progress=False, log_every=1, amp=amp,
                      device="cpu")
    result = fit(d, _Loader([_batch(), _batch()]), cfg, tmp_path / name, seed=0)
    assert result.steps == 2 and result.skipped_steps == 0
    assert all(p.dtype == torch.float32 for p in d.parameters())


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_dense_regression_targets_decode_to_the_matched_boxes(family):
    model = _model(family)
    adapter = build_adapter(model)
    images, targets = _batch()
    out = adapter.run(adapter.preprocess(images, targets), stage="loss")
    enc = out.extras["regression_targets"]
    pos = out.assignment.positive_mask
    assert pos[0].any() and not pos[1].any() and enc[1].abs().sum() == 0
    anchors = out.anchors[pos[0]]
    if family == "retinanet":
        decoded = model.head.regression_head.box_coder.decode_single(enc[0][pos[0]], anchors)
    else:
        decoded = model.head.box_coder.decode(enc[0][pos[0]], anchors)
    boxes = out.targets[0]["boxes"][out.assignment.matched_idxs[0][pos[0]]]
    assert torch.allclose(decoded, boxes, atol=1e-3)


def test_loss_dict_keys_weights_and_gradients():
    d = _distiller("retinanet", [LossConfig("cwd", weight=10.0, levels=["p3", "p4"])])
    d.train()
    out = d(*_batch())
    assert set(k for k in out if k.startswith("distill/")) == {"distill/cwd/p3", "distill/cwd/p4"}
    for lv in ("p3", "p4"):
        assert torch.allclose(out[f"distill/cwd/{lv}"], 10.0 * out[f"raw/cwd/{lv}"])
    expected = sum(v for k, v in out.items() if k.startswith(("task/", "distill/")))
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.model.parameters())
    # connectors (32 -> 16 channels) train with the distiller, and are not part of the student
    conn = [n for n, _ in d.named_parameters() if "conv" in n and n.startswith("losses.")]
    assert conn and not any(n.startswith("losses.") for n, _ in d.student.named_parameters())


def test_teacher_stays_in_eval_mode_and_out_of_state_dict():
    d = _distiller("fcos", [LossConfig("cwd")])
    d.train()
    assert d.student.training and not d.teacher.model.training
    assert not any(k.startswith("_teacher") or "teacher.model" in k for k in d.state_dict())
    assert not any(p is q for p in d.parameters() for q in d.teacher.model.parameters())


def test_teacher_runs_only_as_far_as_needed():
    feats = _distiller("retinanet", [LossConfig("cwd")])
    head = _distiller("retinanet", [LossConfig("kd")], t_fpn=16)
    assert feats._teacher_stage(list(feats.losses)) == "features"
    assert head._teacher_stage(list(head.losses)) == "head"
    calls = []
    original = feats.teacher.adapter.run

    def spy(batch, stage="loss"):
        calls.append(stage)
        return original(batch, stage=stage)

    feats.teacher.adapter.run = spy
    feats.train()
    feats(*_batch())
    assert calls == ["features"]


def test_schedule_start_stop_steps():
    d = _distiller("retinanet", [LossConfig("cwd", start_step=1, stop_step=2)])
    d.train()
    d.set_step(0)
    assert not any(k.startswith("distill/") for k in d(*_batch()))
    d.set_step(1)
    assert any(k.startswith("distill/") for k in d(*_batch()))
    d.set_step(2)
    assert not any(k.startswith("distill/") for k in d(*_batch()))


def test_ddp_is_told_when_steps_leave_parameters_unused():
    """fit turns on DDP's find_unused_parameters when the Distiller says so: LGD's frozen-backbone warm-up, or a loss
    with its own parameters (a connector, hint's adaptation layer) active only in a step window."""
    assert not _distiller("retinanet", [LossConfig("cwd")]).leaves_parameters_unused()
    assert not _distiller("retinanet", [LossConfig("cwd", start_step=5)], t_fpn=16).leaves_parameters_unused()
    assert _distiller("retinanet", [LossConfig("cwd", start_step=5)], t_fpn=32).leaves_parameters_unused()  # connector
    assert not _distiller("retinanet", [LossConfig("hint", levels=["p3"])]).leaves_parameters_unused()
    assert _distiller("retinanet", [LossConfig("hint", levels=["p3"], stop_step=5)]).leaves_parameters_unused()

    def lgd(freeze):
        params = {"pre_nondistill_steps": 1, "freeze_backbone_steps": freeze}
        return _distiller("retinanet", [LossConfig("lgd", params=params)], teacher=False)

    assert lgd(1).leaves_parameters_unused() and not lgd(0).leaves_parameters_unused()


def test_wiring_check_fires_on_a_zero_term():
    # hint from a level to itself with a student identical to the teacher is not zero (adaptation layer), but CWD
    # between identical maps is exactly zero: the classic silent failure of distilling a model into itself
    student = build("retinanet", backbone="resnet18", num_classes=3, fpn_channels=16, head_convs=1, min_size=SIZE,
                    max_size=SIZE, backbone_norm="frozen_bn")  # no batch statistics: train == eval features
    teacher = FrozenTeacher(copy.deepcopy(student))
    d = build_distiller(student, teacher, DistillConfig(losses=[LossConfig("cwd")]), num_classes=3)
    d.train()
    out = d(*_batch())
    with pytest.raises(WiringError, match="'cwd' is exactly zero"):
        d.step_check(out)


def test_wiring_check_fires_without_gradient_path():
    d = _distiller("retinanet", [LossConfig("cwd")])
    d.train()
    out = d(*_batch())
    out = {k: (v.detach() if k.startswith("distill/") else v) for k, v in out.items()}
    with pytest.raises(WiringError, match="no gradient path"):
        d.step_check(out)


def test_missing_teacher_and_unknown_method_are_clear():
    from detkd.config import ConfigError

    with pytest.raises(ConfigError, match="needs a teacher"):
        _distiller("retinanet", [LossConfig("fgd")], teacher=False)
    with pytest.raises(ConfigError, match="unknown distillation method 'fdg'"):
        _distiller("retinanet", [LossConfig("fdg")])


def test_logit_method_rejects_a_different_head():
    from detkd.models.pairs import PairError

    student = _model("retinanet")
    teacher = FrozenTeacher(_model("fcos"))
    with pytest.raises(PairError, match="kd"):
        build_distiller(student, teacher, DistillConfig(losses=[LossConfig("kd")]), num_classes=3)


def test_distillation_resume_matches_uninterrupted(tmp_path):
    def run(stop_at, resume, folder):
        torch.manual_seed(0)
        d = _distiller("fcos", [LossConfig("fgd")])
        cfg = TrainConfig(epochs=2, lr=1e-3, optimizer="adamw", warmup_steps=0, progress=False, log_every=1)
        return fit(d, _Loader([_batch(), _batch()]), cfg, folder, seed=0, stop_at_step=stop_at, resume=resume), d

    _, full = run(None, None, tmp_path / "full")
    first, _ = run(2, None, tmp_path / "split")
    assert first.stopped
    _, resumed = run(None, True, tmp_path / "split")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


@pytest.mark.parametrize("family", ["retinanet", "fcos", "gfl", "faster_rcnn"])
def test_lgd_two_iterations_without_teacher(family, tmp_path):
    torch.manual_seed(0)
    student = build(family, backbone="resnet18", num_classes=3, fpn_channels=32, head_convs=1, min_size=SIZE,
                    max_size=SIZE, **({"representation_size": 32} if family == "faster_rcnn" else {}))
    params = {"pre_nondistill_steps": 1, "freeze_backbone_steps": 1, "num_heads": 8}
    d = build_distiller(student, None, DistillConfig(losses=[LossConfig("lgd", params=params)]), num_classes=3,
                        max_steps=2)
    cfg = TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", warmup_steps=0, progress=False, log_every=1)
    body_before = copy.deepcopy(student.backbone.body.state_dict())
    result = fit(d, _Loader([_batch(), _batch()]), cfg, tmp_path / family, seed=0)
    assert result.steps == 2 and result.skipped_steps == 0
    # step 0 froze the backbone body; step 1 trained it
    changed = [k for k, v in student.backbone.body.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, body_before[k])]
    assert changed
    lines = (tmp_path / family / "metrics.jsonl").read_text()
    assert "distill/lgd" in lines and "tea/" in lines


def test_lgd_warm_up_keeps_the_users_frozen_layers_and_releases_the_backbone_at_the_end(tmp_path):
    """The warm-up freezes the body for its steps, then releases what it froze only: a layer the user froze stays
    frozen (and unchanged); a warm-up that outlasts the run does not leave the body frozen after it."""
    torch.manual_seed(0)
    student = build("fcos", backbone="resnet18", num_classes=3, fpn_channels=32, head_convs=1, min_size=SIZE,
                    max_size=SIZE)
    body = student.backbone.body
    body.layer1.requires_grad_(False)
    layer1_before = {k: v.detach().clone() for k, v in body.layer1.named_parameters()}
    params = {"pre_nondistill_steps": 1, "freeze_backbone_steps": 1, "num_heads": 8}
    d = build_distiller(student, None, DistillConfig(losses=[LossConfig("lgd", params=params)]), num_classes=3,
                        max_steps=2)
    cfg = TrainConfig(epochs=1, lr=1e-3, optimizer="adamw", warmup_steps=0, progress=False, log_every=1)
    fit(d, _Loader([_batch(), _batch()]), cfg, tmp_path / "a", seed=0)
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(torch.equal(v, layer1_before[k]) for k, v in body.layer1.named_parameters())  # (BN stats move)
    assert all(p.requires_grad for p in body.layer2.parameters())
    # a warm-up longer than the run: frozen during it, released when fit returns
    long = {**params, "freeze_backbone_steps": 100}
    d = build_distiller(student, None, DistillConfig(losses=[LossConfig("lgd", params=long)]), num_classes=3,
                        max_steps=2)
    d.set_step(0)
    assert not any(p.requires_grad for p in body.layer2.parameters())
    fit(d, _Loader([_batch(), _batch()]), cfg, tmp_path / "b", seed=0)
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())


def test_bf16_teacher_returns_float32_close_to_fp32():
    model = _model("fcos", fpn=32, seed=1)
    fp32, bf16 = FrozenTeacher(model), FrozenTeacher(copy.deepcopy(model), bf16=True)
    images, targets = _batch()
    batch = build_adapter(model).preprocess(images, targets)
    a = fp32.run(batch, "head")
    b = bf16.run(batch, "head")
    for level in a.features:
        assert b.features[level].dtype == torch.float32
        rel = (a.features[level] - b.features[level]).norm() / a.features[level].norm()
        assert rel < 0.05, level  # bf16 keeps ~3 significant digits
    assert b.head["cls_logits"].dtype == torch.float32


def test_detect_from_own_features_equals_detect():
    for family in ("fcos", "faster_rcnn"):
        model = _model(family).eval()
        adapter = build_adapter(model)
        images, _ = _batch()
        batch = adapter.preprocess(images)
        feats = adapter.run(batch, stage="features").features
        with torch.no_grad():
            a, b = adapter.detect(images), adapter.detect_from_features(batch, feats)
        for x, y in zip(a, b):
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])


def test_lgd_label_guided_branch_is_evaluated(tmp_path):
    from detkd.config import DataConfig, SynthConfig
    from detkd.data import build_dataset
    from detkd.distill.lgd_eval import LabelGuidedDetector, evaluate_label_guided, label_guided_modules

    data = DataConfig(format="synthetic", root=str(tmp_path / "s"),
                      synthetic=SynthConfig(num_train=2, num_val=3, image_size=64, max_objects=3, seed=3))
    val = build_dataset(data, "val", train=False)
    student = build("retinanet", backbone="resnet18", num_classes=val.num_classes, fpn_channels=32, head_convs=1,
                    min_size=SIZE, max_size=SIZE)
    params = {"eval_teacher": True, "pre_nondistill_steps": 0, "freeze_backbone_steps": 0}
    d = build_distiller(student, None, DistillConfig(losses=[LossConfig("lgd", params=params)]),
                        num_classes=val.num_classes)
    (lgd,) = label_guided_modules(d)
    metrics = evaluate_label_guided(d, lgd, val, batch_size=2, device="cpu")
    assert {"AP", "AP50", "AP75"} <= set(metrics)
    # the branch really reads the labels: different boxes give a different pyramid and different detections
    images, targets = [val[0][0]], [val[0][1]]
    moved = [{**targets[0], "boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]).expand_as(targets[0]["boxes"])}]
    student.score_thresh = 0.0  # an untrained head scores below torchvision's 0.05: keep every candidate
    with torch.no_grad():
        det = LabelGuidedDetector(d, lgd).eval()
        a, b = det(images, targets), det(images, moved)
    assert not torch.equal(a[0]["scores"], b[0]["scores"])


def test_fp32_teacher_stays_fp32_inside_a_bf16_training_autocast():
    model = _model("fcos", fpn=32, seed=1)
    images, targets = _batch()
    batch = build_adapter(model).preprocess(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FrozenTeacher(model).run(batch, "features")
    assert all(f.dtype == torch.float32 for f in out.features.values())


def test_a_term_that_drowns_the_task_loss_is_reported_at_the_first_step():
    import warnings

    def first_step(weight):
        d = _distiller("retinanet", [LossConfig("cwd", weight=weight)])
        d.train()
        out = d(*_batch())
        task = sum(float(v) for k, v in out.items() if k.startswith("task/"))
        cwd = sum(float(v.detach()) for k, v in out.items() if k.startswith("distill/cwd/"))  # one term per level
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d.step_check(out)
        return task, cwd, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    task, cwd, quiet = first_step(1.0)
    assert quiet == [] and 0 < cwd < 100 * task
    loud_weight = 1000 * task / cwd  # 1000x the task loss
    _, _, loud = first_step(loud_weight)
    assert len(loud) == 1 and "'cwd' is 1000x the task loss at the first step" in loud[0]


def test_a_loss_can_add_its_own_notes_at_the_first_step(monkeypatch):
    import warnings

    d = _distiller("retinanet", [LossConfig("fgd")])
    d.train()
    out = d(*_batch())
    (sl,) = d.losses
    # FGD records its teacher's attention support while it computes its terms (the tiny random teacher is not peaked)
    assert set(sl.module.teacher_support) == set(sl.module.levels) and sl.module.first_step_notes() == []
    monkeypatch.setattr(sl.module, "first_step_notes", lambda: ["the teacher's attention is near one-hot"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.step_check(out)
    notes = [str(w.message) for w in caught if "one-hot" in str(w.message)]
    assert notes == [f"distillation method {sl.key!r}: the teacher's attention is near one-hot"]
