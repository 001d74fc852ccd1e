"""Hint (FitNet-style, Chen et al. 2017): hand values, options, the always-present adaptation layer, gradients."""

from __future__ import annotations

import pytest
import torch

from detkd.losses.hint import HintLoss, hint_loss
from detkd.models.connectors import Connector
from detkd.structures import DetOutputs, FeatureSpec


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    """N = 2 images of shape (1, 1, 2): differences (1, 2) and (-1, -1)."""
    s = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    return s, t


def test_hand_values_and_options():
    s, t = _pair()
    # squares 1 + 4 + 1 + 1 = 7, absolutes 1 + 2 + 1 + 1 = 5; N = 2 images, 4 elements
    assert hint_loss(s, t).item() == pytest.approx(7 / 2)
    assert hint_loss(s, t, reduction="mean").item() == pytest.approx(7 / 4)
    assert hint_loss(s, t, norm="l1").item() == pytest.approx(5 / 2)
    assert hint_loss(s, t, norm="l1", reduction="mean").item() == pytest.approx(5 / 4)
    assert hint_loss(s, s.clone()).item() == 0.0
    with pytest.raises(ValueError, match="norm"):
        hint_loss(s, t, norm="l3")
    with pytest.raises(ValueError, match="shapes differ"):
        hint_loss(s, t[:1])


def _outputs(features: dict[str, torch.Tensor], taps: dict[str, torch.Tensor] | None = None) -> DetOutputs:
    n = next(iter(features.values())).shape[0]
    return DetOutputs(
        family="faster_rcnn",
        batch_shape=(32, 48),
        image_sizes=[(32, 48)] * n,
        targets=None,
        features=features,
        strides={k: 4 * 2**i for i, k in enumerate(features)},
        extras={"taps": taps or {}},
    )


def test_adaptation_is_present_with_equal_channels_and_applied():
    loss = HintLoss(["p3"], {"p3": FeatureSpec(2, 8)}, {"p3": FeatureSpec(2, 8)})
    adapt = loss.adapt["p3"]
    assert isinstance(adapt, Connector)
    with torch.no_grad():  # make the adaptation a known map: channel swap plus bias (1, 0)
        adapt.conv.weight.copy_(torch.tensor([[[[0.0]], [[1.0]]], [[[1.0]], [[0.0]]]]))
        adapt.conv.bias.copy_(torch.tensor([1.0, 0.0]))
    s = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    t = torch.zeros(1, 2, 1, 2)
    # A(s) = channels (3 + 1, 4 + 1) and (1, 2): squares 16 + 25 + 1 + 4 = 46, N = 1
    out = loss(_outputs({"p3": s}), _outputs({"p3": t}))
    assert out["p3"].item() == pytest.approx(46.0)


def test_channel_mismatch_and_reduction_param():
    loss = HintLoss(["p4"], {"p4": FeatureSpec(3, 16)}, {"p4": FeatureSpec(5, 16)}, norm="l1", reduction="mean")
    s, t = torch.randn(2, 3, 4, 6), torch.randn(2, 5, 4, 6)
    out = loss(_outputs({"p4": s}), _outputs({"p4": t}))
    expected = (loss.adapt["p4"](s) - t).abs().mean()
    assert out["p4"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_student_and_adapter_not_teacher():
    loss = HintLoss(["p3"], {"p3": FeatureSpec(3, 8)}, {"p3": FeatureSpec(4, 8)})
    s = torch.randn(2, 3, 5, 7, requires_grad=True)
    t = torch.randn(2, 4, 5, 7, requires_grad=True)
    loss(_outputs({"p3": s}), _outputs({"p3": t}))["p3"].backward()
    assert s.grad.abs().sum() > 0
    assert loss.adapt["p3"].conv.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_tapped_modules_and_fc_features():
    name, fc = "backbone.body.layer3", "roi_heads.box_head.fc7"
    specs_s = {name: FeatureSpec(3, 16), fc: FeatureSpec(6, 16)}
    specs_t = {name: FeatureSpec(5, 16), fc: FeatureSpec(8, 16)}
    loss = HintLoss([name, fc], specs_s, specs_t)
    s_taps = {name: torch.randn(2, 3, 4, 4), fc: torch.randn(7, 6)}  # FC features: (rois, D)
    t_taps = {name: torch.randn(2, 5, 4, 4), fc: torch.randn(7, 8)}
    feats = {"p3": torch.zeros(2, 1, 4, 4)}
    out = loss(_outputs(feats, s_taps), _outputs(feats, t_taps))
    conv = loss.adapt["roi_heads__box_head__fc7"].conv
    expected_fc = ((s_taps[fc] @ conv.weight[:, :, 0, 0].T + conv.bias - t_taps[fc]) ** 2).sum() / 7
    assert out[fc].item() == pytest.approx(expected_fc.item(), rel=1e-5)
    assert out[name].item() > 0


def test_errors_name_level_and_params():
    with pytest.raises(TypeError, match="gamma"):
        HintLoss(["p3"], {"p3": FeatureSpec(2, 8)}, {"p3": FeatureSpec(2, 8)}, gamma=0.5)
    with pytest.raises(KeyError, match="'p5'"):
        HintLoss(["p5"], {"p3": FeatureSpec(2, 8)}, {"p3": FeatureSpec(2, 8)})
    loss = HintLoss(["c4"], {"c4": FeatureSpec(2, 8)}, {"c4": FeatureSpec(2, 8)})
    with pytest.raises(KeyError, match="student has no feature 'c4'"):
        loss(_outputs({"p3": torch.zeros(1, 2, 2, 2)}), _outputs({"p3": torch.zeros(1, 2, 2, 2)}))
    loss = HintLoss(["p3"], {"p3": FeatureSpec(2, 8)}, {"p3": FeatureSpec(2, 8)})
    with pytest.raises(ValueError, match="'p3'.*\\(1, 2, 4, 4\\).*\\(1, 2, 2, 2\\)"):
        loss(_outputs({"p3": torch.zeros(1, 2, 4, 4)}), _outputs({"p3": torch.zeros(1, 2, 2, 2)}))
