"""FGD: hand values of every term on a (1, 2, 2, 3) example with a known mask, invariants, gradients, init.

Geometry: a 32 x 48 image on a 2 x 3 map (stride 16). The box (0, 0, 10, 10) maps to x 0..0.625, y 0..0.625, so
the inclusive rule covers rows 0..1 x cols 0..1: fg = 1/4 there, and bg = 1/2 on the last column.
"""

from __future__ import annotations

import math

import pytest
import torch

from detkd.losses.fgd import (
    FGD_DEFAULTS,
    NARROW_SUPPORT,
    FGDLoss,
    attention_support,
    fgd_attention,
    fgd_focal_loss,
)
from detkd.models.connectors import Connector
from detkd.regions.fgd import fgd_masks
from detkd.structures import DetOutputs, FeatureSpec

SPECS = {"p3": FeatureSpec(2, 16)}
UNIT = {"alpha_fgd": 1.0, "beta_fgd": 1.0, "gamma_fgd": 1.0, "lambda_fgd": 1.0}
FG = [[0.25, 0.25, 0.0], [0.25, 0.25, 0.0]]
BG = [[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]


def _outputs(feat: torch.Tensor, boxes: list[list[list[float]]], image_sizes=None, batch_shape=(32, 48)) -> DetOutputs:
    n = feat.shape[0]
    targets = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.ones(len(b))} for b in boxes
    ]
    return DetOutputs(
        family="retinanet",
        batch_shape=batch_shape,
        image_sizes=image_sizes or [batch_shape] * n,
        targets=targets,
        features={"p3": feat},
        strides={"p3": 16},
    )


def _terms(loss: FGDLoss, s: torch.Tensor, t: torch.Tensor, boxes=None) -> dict[str, float]:
    out = loss(_outputs(s, boxes or [[[0, 0, 10, 10]]]), _outputs(t, boxes or [[[0, 0, 10, 10]]]))
    return {k.split("/")[1]: v.item() for k, v in out.items()}


def test_hand_values_with_uniform_teacher_attention():
    # |t| = 1 everywhere: teacher spatial and channel attention are all 1 (softmax of equal values times H W / C)
    t = torch.ones(1, 2, 2, 3)
    d = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], [[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]]])
    s = t + d
    terms = _terms(FGDLoss(["p3"], SPECS, SPECS, **UNIT), s, t)
    # fg: cells (0,0) ch0 and (0,1) ch1, both fg = 1/4, squared diff 1 each -> 0.5; bg: cell (1,2) ch0, 1/2 * 4 = 2
    assert terms["fg"] == pytest.approx(0.5)
    assert terms["bg"] == pytest.approx(2.0)
    # student |s|: ch0 (2 1 1 / 1 1 3), ch1 (1 0 1 / 1 1 1): mean_c = (1.5 .5 1 / 1 1 2), mean_hw = (1.5, 5/6)
    # attention at temp 0.5: A_S = 6 softmax(3, 1, 2, 2, 2, 4), A_C = 2 softmax(3, 5/3); the teacher's are all 1
    z = [math.exp(v) for v in (3, 1, 2, 2, 2, 4)]
    a_s = [6 * v / sum(z) for v in z]
    a_c = [2 * math.exp(3) / (math.exp(3) + math.exp(5 / 3)), 2 * math.exp(5 / 3) / (math.exp(3) + math.exp(5 / 3))]
    assert terms["at"] == pytest.approx(sum(abs(v - 1) for v in a_c) + sum(abs(v - 1) for v in a_s), rel=1e-5)
    # relation at init: both GcBlocks are the identity (zero last conv), so rel = sum d^2 / N = 1 + 4 + 1
    assert terms["rel"] == pytest.approx(6.0)


def test_focal_terms_against_naive_loop_with_teacher_attention():
    s, t = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    terms = _terms(FGDLoss(["p3"], SPECS, SPECS, temp=0.5, **UNIT), s, t)
    # teacher attention by hand
    ts = t[0].abs().mean(0).flatten().tolist()
    zs = [math.exp(v / 0.5) for v in ts]
    a_s = [6 * v / sum(zs) for v in zs]
    tc = t[0].abs().mean((1, 2)).tolist()
    zc = [math.exp(v / 0.5) for v in tc]
    a_c = [2 * v / sum(zc) for v in zc]
    fg = bg = 0.0
    for c in range(2):
        for h in range(2):
            for w in range(3):
                sq = (s[0, c, h, w].item() - t[0, c, h, w].item()) ** 2 * a_s[h * 3 + w] * a_c[c]
                fg += FG[h][w] * sq
                bg += BG[h][w] * sq
    assert terms["fg"] == pytest.approx(fg, rel=1e-5)
    assert terms["bg"] == pytest.approx(bg, rel=1e-5)


def test_attention_shapes_and_sums():
    f = torch.randn(2, 5, 3, 4)
    spatial, channel = fgd_attention(f, 0.5)
    assert spatial.shape == (2, 3, 4) and channel.shape == (2, 5)
    torch.testing.assert_close(spatial.sum((1, 2)), torch.full((2,), 12.0))
    torch.testing.assert_close(channel.sum(1), torch.full((2,), 5.0))


def test_attention_support_is_one_for_uniform_maps_and_one_over_k_for_one_hot():
    flat = torch.ones(1, 4, 3, 5)  # every cell and channel alike: attention 1 everywhere
    spatial, channel = map(attention_support, fgd_attention(flat, 0.8))
    torch.testing.assert_close(spatial, torch.ones(1))
    torch.testing.assert_close(channel, torch.ones(1))
    peaked = torch.zeros(2, 4, 3, 5)
    peaked[:, 2, 1, 3] = 1000.0  # one activation far above temp: one-hot in space and in channels
    spatial, channel = map(attention_support, fgd_attention(peaked, 0.8))
    torch.testing.assert_close(spatial, torch.full((2,), 1 / 15), atol=1e-4, rtol=0)
    torch.testing.assert_close(channel, torch.full((2,), 1 / 4), atol=1e-4, rtol=0)
    half = torch.tensor([[[2.0, 2.0, 0.0, 0.0]]])  # (1, 1, 4): two cells of equal weight of four -> 1/2
    torch.testing.assert_close(attention_support(half), torch.full((1,), 0.5))
    # a larger temp spreads the same map: support grows monotonically with temp
    f = torch.randn(1, 8, 6, 6).mul(5)
    supports = [attention_support(fgd_attention(f, t)[0]).item() for t in (0.5, 2.0, 8.0)]
    assert supports[0] < supports[1] < supports[2] <= 1.0


def test_zero_when_student_equals_teacher():
    t = torch.randn(2, 2, 2, 3)
    terms = _terms(FGDLoss(["p3"], SPECS, SPECS, **UNIT), t.clone(), t, boxes=[[[0, 0, 10, 10]], [[20, 5, 40, 30]]])
    assert terms == {"fg": 0.0, "bg": 0.0, "at": 0.0, "rel": 0.0}


def test_terms_are_multiplied_by_the_weights():
    s, t = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 3)
    raw_loss = FGDLoss(["p3"], SPECS, SPECS, **UNIT)
    weighted = FGDLoss(["p3"], SPECS, SPECS)  # class defaults: 1e-3, 5e-4, 1e-3, 5e-6
    weighted.load_state_dict(raw_loss.state_dict())
    raw, out = _terms(raw_loss, s, t), _terms(weighted, s, t)
    for key, w in {"fg": 1e-3, "bg": 5e-4, "at": 1e-3, "rel": 5e-6}.items():
        assert out[key] == pytest.approx(w * raw[key], rel=1e-6)


def test_gradients_reach_student_and_both_gcblocks_not_teacher():
    specs = {"p3": FeatureSpec(4, 16)}  # C/2 = 2: a LayerNorm over a single value would output 0
    loss = FGDLoss(["p3"], specs, specs)
    parts = loss.per_level["p3"]

    def backward() -> tuple[torch.Tensor, torch.Tensor]:
        loss.zero_grad()
        s = torch.randn(1, 4, 2, 3, requires_grad=True)
        t = torch.randn(1, 4, 2, 3, requires_grad=True)
        sum(loss(_outputs(s, [[[0, 0, 10, 10]]]), _outputs(t, [[[0, 0, 10, 10]]])).values()).backward()
        return s, t

    s, t = backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    for gc in (parts.gc_s, parts.gc_t):  # at init only the zero-initialised last conv gets a gradient
        assert gc.channel_add[-1].weight.grad.abs().sum() > 0 and gc.channel_add[-1].bias.grad.abs().sum() > 0
    with torch.no_grad():  # once the last conv has moved away from 0, the gradient reaches the whole block
        for gc in (parts.gc_s, parts.gc_t):
            gc.channel_add[-1].weight.normal_()
    backward()
    for gc in (parts.gc_s, parts.gc_t):
        assert gc.conv_mask.weight.grad.abs().sum() > 0 and gc.channel_add[0].weight.grad.abs().sum() > 0


def test_attention_term_alone_gives_the_student_gradient():
    loss = FGDLoss(["p3"], SPECS, SPECS)
    s = torch.randn(1, 2, 2, 3, requires_grad=True)
    loss(_outputs(s, [[[0, 0, 10, 10]]]), _outputs(torch.randn(1, 2, 2, 3), [[[0, 0, 10, 10]]]))["p3/at"].backward()
    assert s.grad.abs().sum() > 0  # the student's attention is not detached (official)


def test_image_without_boxes_uses_uniform_background():
    t = torch.ones(2, 2, 2, 3)  # teacher attention all 1
    d = torch.zeros(2, 2, 2, 3)
    d[1, 0] = 1.0  # only image 1 (no boxes) differs: 6 cells of squared diff 1
    terms = _terms(FGDLoss(["p3"], SPECS, SPECS, **UNIT), t + d, t, boxes=[[[0, 0, 10, 10]], []])
    assert terms["fg"] == 0.0
    assert terms["bg"] == pytest.approx(6 * (1 / 6) / 2)  # bg = 1/(H W) on image 1, divided by N = 2


def test_use_padded_changes_the_masks():
    s, t = torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6)
    box = [[[0, 0, 20, 20]]]
    specs = {"p3": FeatureSpec(2, 8)}
    first_rows = {}
    for use_padded in (False, True):
        loss = FGDLoss(["p3"], specs, specs, use_padded=use_padded, **UNIT)
        out = loss(_outputs(s, box, [(24, 24)], (32, 48)), _outputs(t, box, [(24, 24)], (32, 48)))
        fg, bg = fgd_masks([torch.tensor(box[0])], [(24, 24)], (4, 6), batch_shape=(32, 48), use_padded=use_padded)
        expected = fgd_focal_loss(s, t, fg, bg, *fgd_attention(t, 0.5))
        assert out["p3/fg"].item() == pytest.approx(expected[0].item(), rel=1e-6)
        first_rows[use_padded] = fg[0, 0].tolist()
    # unpadded (24 x 24 image): x 20/24*6 = 5 -> cols 0..5, y 20/24*4 = 3.3 -> rows 0..4: 1/30 (rows clipped to 0..3)
    assert first_rows[False] == pytest.approx([1 / 30] * 6)
    # padded (32 x 48 batch): x 20/48*6 = 2.5 -> cols 0..3, y 20/32*4 = 2.5 -> rows 0..3: 1/16
    assert first_rows[True] == pytest.approx([1 / 16] * 4 + [0.0, 0.0])


def test_module_init_values():
    loss = FGDLoss(["p3"], {"p3": FeatureSpec(32, 8)}, {"p3": FeatureSpec(64, 8)})
    parts = loss.per_level["p3"]
    assert isinstance(parts.align, Connector)
    # official align = default nn.Conv2d init: uniform within 1 / sqrt(fan_in)
    assert parts.align.conv.weight.abs().max() <= 1 / math.sqrt(32)
    for gc in (parts.gc_s, parts.gc_t):
        assert gc.conv_mask.bias.abs().sum() == 0
        assert gc.conv_mask.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.25)  # Kaiming fan_in
        assert torch.all(gc.channel_add[-1].weight == 0) and torch.all(gc.channel_add[-1].bias == 0)
        norm = gc.channel_add[1]
        assert norm.normalized_shape == (32, 1, 1)
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert not isinstance(FGDLoss(["p3"], SPECS, SPECS).per_level["p3"].align, Connector)


def test_defaults_table_and_params():
    fcos = FGDLoss(["p3"], SPECS, SPECS, **FGD_DEFAULTS["fcos"])
    assert fcos.temp == 0.8 and fcos.weights == {"fg": 1.6e-3, "bg": 8e-4, "at": 8e-4, "rel": 8e-6}
    assert FGD_DEFAULTS["faster_rcnn"]["lambda_fgd"] == 5e-7 and FGD_DEFAULTS["retinanet"]["gamma_fgd"] == 5e-4
    assert FGDLoss(["p3"], SPECS, SPECS).weights["at"] == 1e-3  # FeatureLoss class default
    with pytest.raises(TypeError, match="alpha"):
        FGDLoss(["p3"], SPECS, SPECS, alpha=1.0)


def test_errors_name_level_and_shapes():
    loss = FGDLoss(["p3"], SPECS, SPECS)
    with pytest.raises(ValueError, match="'p3'.*\\(1, 2, 2, 3\\).*\\(1, 2, 4, 6\\)"):
        loss(_outputs(torch.zeros(1, 2, 2, 3), [[]]), _outputs(torch.zeros(1, 2, 4, 6), [[]]))
    no_targets = _outputs(torch.zeros(1, 2, 2, 3), [[]])
    no_targets.targets = None
    with pytest.raises(ValueError, match="targets"):
        loss(no_targets, _outputs(torch.zeros(1, 2, 2, 3), [[]]))


def test_a_near_one_hot_teacher_attention_gets_a_first_step_note():
    loss = FGDLoss(["p3"], SPECS, SPECS, temp=0.8, **UNIT)
    assert loss.first_step_notes() == []  # nothing seen yet
    s = torch.randn(2, 2, 10, 10)
    flat = torch.ones(2, 2, 10, 10)  # uniform attention: support 100% of the cells
    loss(_outputs(s, [[[0, 0, 10, 10]]] * 2, batch_shape=(160, 160)), _outputs(flat, [[[0, 0, 10, 10]]] * 2,
                                                                               batch_shape=(160, 160)))
    torch.testing.assert_close(loss.teacher_support["p3"], torch.ones(2))
    assert loss.first_step_notes() == []
    peaked = torch.ones(2, 2, 10, 10)
    peaked[:, :, 4, 7] = 50.0  # one cell far above the rest at temp 0.8: support ~1 cell of 100
    loss(_outputs(s, [[[0, 0, 10, 10]]] * 2, batch_shape=(160, 160)), _outputs(peaked, [[[0, 0, 10, 10]]] * 2,
                                                                                 batch_shape=(160, 160)))
    assert float(loss.teacher_support["p3"].mean()) == pytest.approx(0.01, abs=1e-3)
    (note,) = loss.first_step_notes()
    assert "temp=0.8 covers only p3 1.0% of the cells" in note
    assert "(e.g. temp: 4)" in note  # what to change, not only what is wrong
    # the same map at a temperature that spreads it: no note
    warm = FGDLoss(["p3"], SPECS, SPECS, temp=100.0, **UNIT)
    warm(_outputs(s, [[[0, 0, 10, 10]]] * 2, batch_shape=(160, 160)), _outputs(peaked, [[[0, 0, 10, 10]]] * 2,
                                                                                 batch_shape=(160, 160)))
    assert float(warm.teacher_support["p3"].mean()) > NARROW_SUPPORT and warm.first_step_notes() == []


@pytest.mark.parametrize("temp", [0.0, -0.5, float("nan")])
def test_module_rejects_a_temperature_that_is_not_positive(temp):
    with pytest.raises(ValueError, match="FGDLoss: temp must be > 0"):
        FGDLoss(["p3"], SPECS, SPECS, temp=temp)
