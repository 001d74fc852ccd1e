"""CWD: hand values, forms, temperature, gradients, align conv and the module's checks."""

from __future__ import annotations

import math
import re

import pytest
import torch

from detkd.losses.cwd import CWDLoss, cwd_loss
from detkd.models.connectors import Connector
from detkd.structures import DetOutputs, FeatureSpec

LN2, LN3 = math.log(2), math.log(3)


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 2 x 2 x 2. Teacher: channel 0 logits (0, 0, 0, ln 3) -> p = (1/6, 1/6, 1/6, 1/2); channel 1 zeros -> 1/4.
    Student: channel 0 zeros -> q = 1/4; channel 1 logits (ln 2, 0, 0, 0) -> q = (2/5, 1/5, 1/5, 1/5)."""
    t = torch.tensor([[[[0.0, 0.0], [0.0, LN3]], [[0.0, 0.0], [0.0, 0.0]]]])
    s = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[LN2, 0.0], [0.0, 0.0]]]])
    return s, t


# KL per channel, by hand
KL0 = 3 * (1 / 6) * math.log((1 / 6) / (1 / 4)) + (1 / 2) * math.log((1 / 2) / (1 / 4))  # = ln(4/3) / 2
KL1 = (1 / 4) * math.log((1 / 4) / (2 / 5)) + 3 * (1 / 4) * math.log((1 / 4) / (1 / 5))
# teacher entropies
H0 = -(3 * (1 / 6) * math.log(1 / 6) + (1 / 2) * math.log(1 / 2))
H1 = math.log(4)


def test_hand_value_kl():
    s, t = _example()
    assert KL0 == pytest.approx(math.log(4 / 3) / 2)
    assert cwd_loss(s, t).item() == pytest.approx((KL0 + KL1) / 2, rel=1e-6)  # tau^2 / (N C) = 1 / 2


def test_ce_form_is_kl_plus_teacher_entropy():
    s, t = _example()
    ce = cwd_loss(s, t, form="ce").item()
    assert ce == pytest.approx((KL0 + KL1 + H0 + H1) / 2, rel=1e-6)
    for tau in (1.0, 3.0):
        gap = cwd_loss(s, t, tau=tau, form="ce") - cwd_loss(s, t, tau=tau, form="kl")
        p = torch.softmax(t.reshape(2, 4) / tau, dim=1)
        entropy = -(p * p.log()).sum()
        assert gap.item() == pytest.approx((entropy * tau**2 / 2).item(), rel=1e-5)


def test_zero_when_student_equals_teacher():
    x = torch.randn(2, 3, 4, 5)
    assert cwd_loss(x, x.clone()).item() == 0.0
    assert cwd_loss(x, x.clone(), tau=4.0).item() == 0.0
    assert cwd_loss(x, x.clone(), form="ce").item() > 0  # the CE form keeps the teacher entropy


def _naive_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            ls = [v / tau for v in s[i, j].flatten().tolist()]
            lt = [v / tau for v in t[i, j].flatten().tolist()]
            zs, zt = sum(math.exp(v) for v in ls), sum(math.exp(v) for v in lt)
            for a, b in zip(ls, lt):
                pt = math.exp(b) / zt
                total += pt * (math.log(pt) - (a - math.log(zs)))
    return total * tau**2 / (n * c)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_matches_naive_loop_on_non_square_maps(tau):
    s, t = torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 5)
    assert cwd_loss(s, t, tau=tau).item() == pytest.approx(_naive_kl(s, t, tau), rel=1e-5)


def test_temperature_behaviour():
    s, t = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    # softmax(k x / (k tau)) = softmax(x / tau), so scaling maps and tau by k scales the loss by k^2 (the tau^2 factor)
    assert cwd_loss(3 * s, 3 * t, tau=3.0).item() == pytest.approx(9 * cwd_loss(s, t).item(), rel=1e-5)
    # a per-channel offset of the student does not change its spatial softmax
    assert cwd_loss(s + torch.randn(2, 3, 1, 1), t, tau=2.0).item() == pytest.approx(
        cwd_loss(s, t, tau=2.0).item(), rel=1e-5
    )
    # a higher temperature flattens both distributions: the KL itself shrinks (here tau^2 * KL stays bounded)
    raw = [cwd_loss(s, t, tau=tau).item() / tau**2 for tau in (1.0, 2.0, 8.0)]
    assert raw[0] > raw[1] > raw[2]


def test_gradient_reaches_the_student_only():
    s = torch.randn(1, 2, 3, 4, requires_grad=True)
    t = torch.randn(1, 2, 3, 4, requires_grad=True)
    cwd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def _outputs(features: dict[str, torch.Tensor], **extra) -> DetOutputs:
    n = next(iter(features.values())).shape[0]
    return DetOutputs(
        family="retinanet",
        batch_shape=(64, 96),
        image_sizes=[(64, 96)] * n,
        targets=None,
        features=features,
        strides={k: 8 * 2**i for i, k in enumerate(features)},
        **extra,
    )


def test_module_channel_mismatch_builds_align_and_uses_teacher_channels():
    loss = CWDLoss(
        ["p3", "p4"],
        {"p3": FeatureSpec(4, 8), "p4": FeatureSpec(6, 16)},
        {"p3": FeatureSpec(4, 8), "p4": FeatureSpec(10, 16)},
    )
    assert isinstance(loss.align["p4"], Connector) and not isinstance(loss.align["p3"], Connector)
    s = {"p3": torch.randn(2, 4, 6, 8), "p4": torch.randn(2, 6, 3, 4)}
    t = {"p3": torch.randn(2, 4, 6, 8), "p4": torch.randn(2, 10, 3, 4)}
    out = loss(_outputs(s), _outputs(t))
    assert set(out) == {"p3", "p4"}
    aligned = loss.align["p4"](s["p4"]).detach()
    assert out["p4"].item() == pytest.approx(_naive_kl(aligned, t["p4"], 1.0), rel=1e-5)  # / (N * 10), not 6
    out["p4"].backward()
    assert loss.align["p4"].conv.weight.grad.abs().sum() > 0


def test_module_rejects_mismatch_without_align_unknown_params_and_spatial_mismatch():
    specs_s, specs_t = {"p3": FeatureSpec(4, 8)}, {"p3": FeatureSpec(8, 8)}
    with pytest.raises(ValueError, match="'p3' has 4 student vs 8 teacher channels"):
        CWDLoss(["p3"], specs_s, specs_t, align=False)
    with pytest.raises(TypeError, match="temperature"):
        CWDLoss(["p3"], specs_s, specs_t, temperature=2.0)
    loss = CWDLoss(["p3"], specs_s, specs_t)
    s, t = _outputs({"p3": torch.randn(1, 4, 6, 8)}), _outputs({"p3": torch.randn(1, 8, 3, 4)})
    with pytest.raises(
        ValueError, match=re.escape("'p3'") + ".*" + re.escape("(1, 4, 6, 8)") + ".*" + re.escape("(1, 8, 3, 4)")
    ):
        loss(s, t)


def _with_logits(n: int, hws: list[tuple[int, int]], a: int, k: int) -> DetOutputs:
    feats = {f"p{3 + i}": torch.zeros(n, 2, h, w) for i, (h, w) in enumerate(hws)}
    sizes = [h * w * a for h, w in hws]
    return _outputs(
        feats, head={"cls_logits": torch.randn(n, sum(sizes), k)}, level_sizes=sizes, num_anchors_per_location=a
    )


def test_module_on_cls_logits():
    loss = CWDLoss(["p3", "p4"], {}, {}, source="cls_logits", tau=2.0)
    assert loss.teacher_stage == "head" and loss.needs_same_head and CWDLoss.teacher_stage == "features"
    s, t = _with_logits(2, [(4, 6), (2, 3)], 3, 5), _with_logits(2, [(4, 6), (2, 3)], 3, 5)
    out = loss(s, t)
    s_maps, t_maps = s.as_maps("cls_logits"), t.as_maps("cls_logits")
    assert s_maps["p3"].shape == (2, 15, 4, 6)
    for level in ("p3", "p4"):
        assert out[level].item() == pytest.approx(_naive_kl(s_maps[level], t_maps[level], 2.0), rel=1e-5)
    with pytest.raises(ValueError, match="equal channels"):
        loss(_with_logits(2, [(4, 6), (2, 3)], 3, 4), t)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_module_rejects_a_temperature_that_is_not_positive(tau):
    # tau = 0 divided the maps by zero: NaN terms and a WiringError at step 1 instead of a config error
    specs = {"p3": FeatureSpec(4, 8)}
    with pytest.raises(ValueError, match="CWDLoss: tau must be > 0"):
        CWDLoss(["p3"], specs, specs, tau=tau)
