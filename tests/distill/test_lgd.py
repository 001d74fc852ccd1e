import math

import pytest
import torch
from torch import nn

from detkd.distill.lgd import LGDTeacher
from detkd.distill.lgd_modules import (
    KnowledgeMapper,
    LabelEncoder,
    cross_image_mask,
    label_descriptors,
    mask_pool,
    segment_max,
)
from detkd.losses.lgd import LGDLoss, SequentialConvs, lgd_distill_loss
from detkd.structures import DetOutputs, FeatureSpec

C = 16  # 8 heads x 2 dims
BATCH = (64, 96)  # padded (h, w): non-square


def _targets():
    """Image 0: two off-centre boxes; image 1: no boxes."""
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def _features(n=2, requires_grad=False):
    # stride 8, 16, 32, 64: (8, 12), (4, 6), (2, 3), (1, 2), plus a 1x1 level
    sizes = {"p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2), "p7": (1, 1)}
    return {k: torch.randn(n, C, *hw, requires_grad=requires_grad) for k, hw in sizes.items()}


# ----------------------------------------------------------------------------------------- label descriptors


def test_descriptors_hand_case_with_context_and_empty_image():
    # (h, w) = (50, 100), K = 3. Box 0 [10, 5, 60, 45] / (100, 50) = [.1, .1, .6, .9] -> 2x - 1 = [-.8, -.8, .2, .8]
    # box 1 [90, 40, 120, 70] clamps to [90, 40, 99, 49] -> [.9, .8, .99, .98] -> [.8, .6, .98, .96]
    # context [0, 0, 100, 50] clamps to [0, 0, 99, 49] -> [0, 0, .99, .98] -> [-1, -1, .98, .96], one-hot all -1
    # image 1 (no boxes): dummy [0, 0, 1, 1] -> [0, 0, .01, .02] -> [-1, -1, -.98, -.96], no context row
    targets = [
        {"boxes": torch.tensor([[10.0, 5.0, 60.0, 45.0], [90.0, 40.0, 120.0, 70.0]]), "labels": torch.tensor([2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    desc, image_index, is_context = label_descriptors(targets, (50, 100), 3)
    expected = torch.tensor(
        [
            [-0.8, -0.8, 0.2, 0.8, -1, 1, -1],
            [0.8, 0.6, 0.98, 0.96, -1, -1, 1],
            [-1, -1, 0.98, 0.96, -1, -1, -1],
            [-1, -1, -0.98, -0.96, -1, -1, -1],
        ]
    )
    torch.testing.assert_close(desc, expected)
    assert image_index.tolist() == [0, 0, 0, 1]
    assert is_context.tolist() == [False, False, True, False]

    desc, image_index, is_context = label_descriptors(targets, (50, 100), 3, add_context=False)
    torch.testing.assert_close(desc, expected[[0, 1, 3]])
    assert image_index.tolist() == [0, 0, 1] and not is_context.any()


def test_descriptors_no_grad_and_label_checks():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    desc, _, _ = label_descriptors([{"boxes": boxes, "labels": torch.tensor([1])}], (8, 8), 2)
    assert not desc.requires_grad
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"targets\[1\].*label"):
            label_descriptors(
                [{"boxes": boxes, "labels": torch.tensor([1])}, {"boxes": boxes, "labels": torch.tensor([bad])}],
                (8, 8),
                2,
            )


# ----------------------------------------------------------------------------------------- label encoder


def test_segment_max_hand_case():
    x = torch.tensor([[1.0, 5.0], [3.0, -2.0], [-4.0, -1.0]])
    assert segment_max(x, torch.tensor([0, 0, 1]), 2).tolist() == [[3.0, 5.0], [-4.0, -1.0]]


def test_label_encoder_images_independent_and_order_equivariant():
    enc = LabelEncoder(7, out=C)
    desc = torch.rand(5, 7) * 2 - 1
    idx = torch.tensor([0, 0, 0, 1, 1])
    out = enc(desc, idx, 2)
    assert out.shape == (5, C)
    other = desc.clone()
    other[3:] = torch.rand(2, 7) * 2 - 1  # image 1 changes
    out2 = enc(other, idx, 2)
    torch.testing.assert_close(out2[:3], out[:3])
    assert not torch.allclose(out2[3:], out[3:])
    # the per-image max pool is symmetric: permuting boxes inside an image permutes their embeddings
    perm = torch.tensor([2, 0, 1, 4, 3])
    torch.testing.assert_close(enc(desc[perm], idx, 2), out[perm])
    # a box's embedding depends on the other boxes of its image (global feature)
    alone = enc(desc[:1], torch.tensor([0]), 1)
    assert not torch.allclose(alone[0], out[0])


def test_input_stn_has_no_identity_shortcut():
    # with the input STN's last layer zeroed, its matrix is 0; without an identity shortcut the descriptor is then
    # wiped out, so every box of every image gets the same embedding
    enc = LabelEncoder(7, out=C)
    nn.init.zeros_(enc.stn_input.head[-1].weight)
    nn.init.zeros_(enc.stn_input.head[-1].bias)
    out = enc(torch.rand(4, 7) * 2 - 1, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(out, out[:1].expand(4, -1))


# ----------------------------------------------------------------------------------------- pooling and mapping


def test_mask_pool_hand_case():
    feats = torch.tensor(
        [
            [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[0.0, 10.0, 0.0], [0.0, 0.0, 20.0]]],
            [[[1.0, 1.0, 1.0], [1.0, 1.0, 7.0]], [[-6.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
        ]
    )  # (B=2, C=2, H=2, W=3)
    masks = torch.zeros(4, 2, 3, dtype=torch.bool)
    masks[0, 0, :2] = True  # image 0, points (0,0), (0,1): ch0 (1+2)/2 = 1.5, ch1 (0+10)/2 = 5
    # masks[1]: a box with no grid point -> zero vector
    masks[2] = True  # image 1, all 6 points: ch0 12/6 = 2, ch1 -6/6 = -1
    masks[3, 1, 2] = True  # image 0, point (1,2): (6, 20)
    pooled = mask_pool(feats, masks, torch.tensor([0, 0, 1, 0]))
    assert pooled.tolist() == [[1.5, 5.0], [0.0, 0.0], [2.0, -1.0], [6.0, 20.0]]
    # image 1 without any box row: nothing to pool there, image 0's rows unchanged
    assert mask_pool(feats, masks[[0, 3]], torch.tensor([0, 0])).tolist() == [[1.5, 5.0], [6.0, 20.0]]


def test_knowledge_mapper_hand_case_before_refinement():
    mapper = KnowledgeMapper(2, add_context=True)
    with torch.no_grad():
        mapper.instance_proj.weight.copy_(torch.eye(2))
        mapper.instance_proj.bias.zero_()
        mapper.instance_conv.weight.zero_()
        mapper.instance_conv.weight[0, 0, 1, 1] = mapper.instance_conv.weight[1, 1, 1, 1] = 1.0  # identity 3x3
        mapper.instance_conv.bias.zero_()
        mapper.context_proj.weight.zero_()
        mapper.context_proj.bias.copy_(torch.tensor([0.5, -0.5]))
    mapper.refine = nn.Identity()
    rows = torch.tensor([[1.0, 2.0], [3.0, -1.0], [5.0, 5.0], [9.0, 9.0]])
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 0, 1] = True  # instance a = (1, 2)
    masks[1, 0, 1] = masks[1, 1, 1] = True  # instance b = (3, -1)
    masks[2] = True  # image 0's context row: a bias, never painted
    masks[3, 0, 0] = True  # image 1's only (bias) row: never painted
    out = mapper(rows, masks, torch.tensor([0, 0, 0, 1]), torch.tensor([False, False, True, True]), 2)
    # image 0 before ReLU, + bias (0.5, -0.5): (0,0) = a; (0,1) = a + b = (4, 1); (1,1) = b = (3, -1); (1,0) = 0
    ch0 = [[1.5, 4.5], [0.5, 3.5]]
    ch1 = [[1.5, 0.5], [0.0, 0.0]]  # -0.5 and -1.5 clip to 0
    torch.testing.assert_close(out[0], torch.tensor([ch0, ch1]))
    torch.testing.assert_close(out[1], torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]))


def test_cross_image_mask_hand_case():
    assert cross_image_mask(torch.tensor([0, 0, 1])).tolist() == [
        [False, False, True],
        [False, False, True],
        [True, True, False],
    ]


# ----------------------------------------------------------------------------------------- teacher


def test_teacher_pyramid_shapes_and_empty_image():
    teacher = LGDTeacher(C, 3)
    feats = _features()
    out = teacher(feats, _targets(), BATCH)
    assert list(out) == list(feats)
    for k in feats:
        assert out[k].shape == feats[k].shape and torch.isfinite(out[k]).all()


def test_other_image_labels_do_not_leak():
    teacher = LGDTeacher(C, 3)
    feats = _features()
    targets = _targets()
    targets[1] = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}
    base = teacher(feats, targets, BATCH)
    moved_boxes = torch.tensor([[0.0, 30.0, 30.0, 60.0], [40.0, 0.0, 96.0, 40.0]])
    targets[1] = {"boxes": moved_boxes, "labels": torch.tensor([3, 1])}  # other boxes, classes and count
    moved = teacher(feats, targets, BATCH)
    for k in feats:
        torch.testing.assert_close(moved[k][0], base[k][0])
    assert not torch.allclose(moved["p3"][1], base["p3"][1])


def test_attention_mask_is_what_blocks_the_leak():
    # the same query/key setup without the mask would mix image 1's label embeddings into image 0's rows
    attn = nn.MultiheadAttention(C, 8)
    idx = torch.tensor([0, 0, 1])
    q, kv = torch.randn(3, C), torch.randn(3, C)
    kv2 = kv.clone()
    kv2[2] += 1.0
    masked = [attn(q, k, k, attn_mask=cross_image_mask(idx), need_weights=False)[0] for k in (kv, kv2)]
    torch.testing.assert_close(masked[0][:2], masked[1][:2])
    free = [attn(q, k, k, need_weights=False)[0] for k in (kv, kv2)]
    assert not torch.allclose(free[0][:2], free[1][:2])


@pytest.mark.parametrize("detach", [False, True])
def test_detach_appearance(detach):
    feats = _features(requires_grad=True)
    out = LGDTeacher(C, 3, detach_appearance=detach)(feats, _targets(), BATCH)
    sum(v.sum() for v in out.values()).backward()
    assert (feats["p3"].grad is None) == detach


def _two_image_targets():
    targets = _targets()
    targets[1] = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}
    return targets


def test_relations_rows_and_weights():
    torch.manual_seed(0)
    teacher = LGDTeacher(C, 3)
    feats = _features()
    rel = teacher.relations(feats, _two_image_targets(), BATCH)
    # rows: image 0's two boxes + its context, image 1's box + its context
    assert rel["labels"].tolist() == [1, 3, 0, 2, 0] and rel["image_index"].tolist() == [0, 0, 0, 1, 1]
    assert rel["is_context"].tolist() == [False, False, True, False, True]
    rows = teacher._rows(feats, _two_image_targets(), BATCH)
    for name, feat in feats.items():
        w = rel[f"weights/{name}"]
        assert w.shape == (5, 5)
        torch.testing.assert_close(w.sum(1), torch.ones(5))
        assert w[:3, 3:].abs().max() == 0 and w[3:, :3].abs().max() == 0  # no weight across images
        masks, _, _ = teacher._relate(feat, rows, BATCH, need_weights=False)
        assert rel[f"points/{name}"].tolist() == masks.flatten(1).sum(1).tolist()


def test_relations_weights_are_the_ones_the_pyramid_is_rendered_from():
    # with one head, the adapter's output is out_proj(weights @ values): the reported weights are the used ones
    torch.manual_seed(0)
    teacher = LGDTeacher(C, 3, num_heads=1)
    feats, targets = _features(), _two_image_targets()
    rel = teacher.relations(feats, targets, BATCH)
    rows = teacher._rows(feats, targets, BATCH)
    attn = teacher.attention
    values = nn.functional.linear(rows["labels_emb"], attn.in_proj_weight[2 * C:], attn.in_proj_bias[2 * C:])
    for name in ("p3", "p5"):
        _, related, _ = teacher._relate(feats[name], rows, BATCH, need_weights=False)
        torch.testing.assert_close(related, attn.out_proj(rel[f"weights/{name}"] @ values))


def test_relation_self_renders_each_box_from_its_own_label_only():
    torch.manual_seed(0)
    teacher = LGDTeacher(C, 3, relation="self")
    feats, targets = _features(), _two_image_targets()
    rel = teacher.relations(feats, targets, BATCH)
    for name in feats:
        torch.testing.assert_close(rel[f"weights/{name}"], torch.eye(5))
    rows = teacher._rows(feats, targets, BATCH)
    attn = teacher.attention
    values = nn.functional.linear(rows["labels_emb"], attn.in_proj_weight[2 * C:], attn.in_proj_bias[2 * C:])
    _, related, _ = teacher._relate(feats["p3"], rows, BATCH, need_weights=False)
    torch.testing.assert_close(related, attn.out_proj(values))  # independent of the appearance query
    official = LGDTeacher(C, 3)
    official.load_state_dict(teacher.state_dict())
    assert not torch.allclose(official(feats, targets, BATCH)["p3"], teacher(feats, targets, BATCH)["p3"])
    with pytest.raises(ValueError, match="relation must be 'image' or 'self'"):
        LGDTeacher(C, 3, relation="box")


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="num_heads"):
        LGDTeacher(12, 3, num_heads=8)


# ----------------------------------------------------------------------------------------- distillation term


def test_distill_loss_hand_case_single_mean_and_1x1_skip():
    eps = 1e-5
    # level A (1,1,1,2): s [0, 2] -> IN [-1, 1]/sqrt(1+eps); t [3, 1] -> [1, -1]/sqrt(1+eps); squares sum 8/(1+eps)
    # level B (1,1,1,3): s [1, 1, 4] (mean 2, var 2) -> [-1, -1, 2]/sqrt(2+eps); t [4, 1, 1] -> [2, -1, -1]/sqrt(2+eps)
    #   diff [-3, 0, 3]/sqrt(2+eps): squares sum 18/(2+eps)
    # single mean over the 5 elements (a per-level mean of means would give (4/(1+eps) + 6/(2+eps)) / 2 instead)
    s = [torch.tensor([[[[0.0, 2.0]]]]), torch.tensor([[[[1.0, 1.0, 4.0]]]])]
    t = [torch.tensor([[[[3.0, 1.0]]]]), torch.tensor([[[[4.0, 1.0, 1.0]]]])]
    expected = (8 / (1 + eps) + 18 / (2 + eps)) / 5
    assert lgd_distill_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert lgd_distill_loss(s, t, lam=2.0).item() == pytest.approx(2 * expected, rel=1e-6)
    # a 1x1 level (undefined instance statistics) adds nothing to the sum nor to the element count
    s1, t1 = torch.tensor([[[[5.0]]]]), torch.tensor([[[[-7.0]]]])
    assert lgd_distill_loss(s + [s1], t + [t1]).item() == pytest.approx(expected, rel=1e-6)
    only = lgd_distill_loss([s1.requires_grad_()], [t1])
    only.backward()
    assert only.item() == 0.0 and s1.grad is not None


def test_distill_loss_invariants():
    s = torch.randn(2, 4, 3, 5, requires_grad=True)
    t = torch.randn(2, 4, 3, 5, requires_grad=True)
    assert lgd_distill_loss([s], [s.detach().clone()]).item() == pytest.approx(0.0, abs=1e-10)
    # instance norm removes a per-image, per-channel affine change of the teacher
    scale = torch.rand(2, 4, 1, 1) + 0.5
    assert lgd_distill_loss([s], [s.detach() * scale + 3.0]).item() == pytest.approx(0.0, abs=1e-6)
    lgd_distill_loss([s], [t]).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="level 0"):
        lgd_distill_loss([s], [t[:, :, :2]])


def test_adapter_shape():
    adapter = SequentialConvs(C)
    assert sum(isinstance(m, nn.Conv2d) for m in adapter.modules()) == 3
    assert adapter(torch.randn(1, C, 3, 5)).shape == (1, C, 3, 5)


# ----------------------------------------------------------------------------------------- LGDLoss


def _loss(**kw):
    feats = _features()
    specs = {k: FeatureSpec(C, 2 ** (i + 3)) for i, k in enumerate(feats)}
    params = {"num_classes": 3, "pre_nondistill_steps": 5, "freeze_backbone_steps": 3} | kw
    loss = LGDLoss(list(feats), specs, None, **params)
    seen = {}

    def head_loss(pyramid, like):
        seen["pyramid"], seen["like"] = pyramid, like
        weights = torch.arange(1, C + 1, dtype=torch.float32).view(1, C, 1, 1)
        return {"cls": sum((v * weights).mean() for v in pyramid.values()), "box": pyramid["p3"].abs().mean()}

    loss.bind_head(head_loss)
    return loss, seen


def _outputs(requires_grad=True):
    feats = _features(requires_grad=requires_grad)
    strides = {k: 2 ** (i + 3) for i, k in enumerate(feats)}
    return DetOutputs("retinanet", BATCH, [(64, 90), (50, 96)], _targets(), feats, strides)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_lgdloss_terms_and_head_binding():
    loss, seen = _loss()
    student = _outputs()
    out = loss(student)
    assert set(out) == {"distill", "tea/cls", "tea/box"}
    assert seen["like"] is student
    assert {k: v.shape for k, v in seen["pyramid"].items()} == {k: v.shape for k, v in student.features.items()}
    unbound, _ = _loss()
    unbound._head_loss = None
    with pytest.raises(RuntimeError, match="bind_head"):
        unbound(student)


def test_distill_term_trains_adapter_only_and_head_term_trains_teacher():
    loss, _ = _loss()
    loss.set_step(10)  # distillation on
    student = _outputs()
    out = loss(student)
    out["distill"].backward(retain_graph=True)
    assert all(g is None for g in _grads(loss.teacher))  # the instructive pyramid is detached in the distill term
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(loss.adapter))
    assert student.features["p3"].grad is not None
    out["tea/cls"].backward()
    assert all(g is not None for g in _grads(loss.teacher))  # every teacher module learns from the head term


def test_student_detached_during_warmup_and_post_phase():
    loss, _ = _loss(max_steps=100, post_nondistill_steps=10)
    assert [loss.distill_mode(s) for s in (0, 4, 5, 90, 91, 99)] == ["detach", "detach", "on", "on", "detach", "detach"]
    for step, mode in [(4, "detach"), (5, "on"), (91, "detach")]:
        loss.set_step(step)
        student = _outputs()
        loss(student)["distill"].backward()
        assert (student.features["p3"].grad is None) == (mode == "detach"), step


def test_post_mode_off_gives_zero_with_graph():
    loss, _ = _loss(max_steps=100, post_nondistill_steps=10, post_mode="off")
    loss.set_step(95)
    d = loss(_outputs())["distill"]
    d.backward()
    assert d.item() == 0.0
    assert all(g is not None and not g.any() for g in _grads(loss.adapter))


def test_value_ignores_the_1x1_level():
    loss, _ = _loss()
    loss.set_step(10)
    student = _outputs()
    full = loss(student)["distill"]
    with torch.no_grad():
        pyr = loss.instructive_pyramid(student)
        lv = ["p3", "p4", "p5", "p6"]
        n = sum(student.features[k].numel() for k in lv)
        adapted = {k: loss.adapter(student.features[k]) for k in lv}
        total = sum(
            (nn.functional.instance_norm(pyr[k]) - nn.functional.instance_norm(adapted[k])).pow(2).sum() for k in lv
        )
    assert math.isfinite(full.item())
    assert full.item() == pytest.approx((total / n).item(), rel=1e-5)


def test_schedule_helpers_and_param_groups():
    loss, _ = _loss(freeze_backbone_steps=20)
    assert loss.backbone_frozen(19) and not loss.backbone_frozen(20)
    adapter, teacher = loss.param_groups()
    a, t = {id(p) for p in adapter["params"]}, {id(p) for p in teacher["params"]}
    assert a and t and not a & t
    assert a | t == {id(p) for p in loss.parameters()}


def test_constructor_errors():
    specs = {"p3": FeatureSpec(16, 8), "p4": FeatureSpec(32, 16)}
    with pytest.raises(ValueError, match="same width"):
        LGDLoss(["p3", "p4"], specs, num_classes=3)
    with pytest.raises(ValueError, match="max_steps"):
        LGDLoss(["p3"], {"p3": FeatureSpec(16, 8)}, num_classes=3, post_nondistill_steps=5)
    with pytest.raises(ValueError, match="levels"):
        LGDLoss(["p9"], {"p3": FeatureSpec(16, 8)}, num_classes=3)


def test_runs_under_bf16_autocast_with_float32_distill_term():
    loss, _ = _loss()
    loss.set_step(10)
    student = _outputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(student)
    assert out["distill"].dtype == torch.float32 and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert student.features["p3"].grad is not None
