"""Connectors: sized from FeatureSpec alone, Identity when nothing to adapt, hand-checked 1x1 conv and resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkd.models.connectors import Connector, make_connector
from detkd.structures import FeatureSpec


def test_identity_only_when_channels_match_and_nothing_is_asked():
    same = make_connector(FeatureSpec(16, 8), FeatureSpec(16, 8))
    assert isinstance(same, nn.Identity)
    x = torch.rand(1, 16, 3, 5)
    assert same(x) is x
    assert isinstance(make_connector(FeatureSpec(16, 8), FeatureSpec(16, 8), always=True), Connector)  # FitNet hint
    assert isinstance(make_connector(FeatureSpec(16, 8), FeatureSpec(16, 8), norm="bn"), Connector)
    conn = make_connector(FeatureSpec(2, 8), FeatureSpec(3, 8))
    assert isinstance(conn, Connector) and conn.conv.weight.shape == (3, 2, 1, 1)
    assert torch.equal(conn.conv.bias, torch.zeros(3))


def test_conv_is_a_per_pixel_linear_map_by_hand():
    conn = Connector(FeatureSpec(2, 8), FeatureSpec(3, 8))
    with torch.no_grad():
        conn.conv.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, -1.0], [0.5, 0.5]]).view(3, 2, 1, 1))
        conn.conv.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.zeros(1, 2, 2, 3)  # non-square map
    x[0, 0, 1, 2], x[0, 1, 1, 2] = 4.0, 6.0
    y = conn(x)
    assert y.shape == (1, 3, 2, 3)
    # at (1, 2): [1*4 + 0*6 + 0, 2*4 - 6 + 1, 0.5*4 + 0.5*6 - 1] = [4, 3, 4]; elsewhere the bias
    torch.testing.assert_close(y[0, :, 1, 2], torch.tensor([4.0, 3.0, 4.0]))
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, -1.0]))


def test_norms_and_unknown_norm():
    bn = Connector(FeatureSpec(4, 8), FeatureSpec(8, 8), norm="bn")
    gn = Connector(FeatureSpec(4, 8), FeatureSpec(8, 8), norm="gn")
    assert isinstance(bn.norm, nn.BatchNorm2d) and isinstance(gn.norm, nn.GroupNorm)
    assert gn.norm.num_groups == 8  # min(32, channels)
    out = gn(torch.rand(2, 4, 3, 5))
    # GroupNorm with one channel per group: each channel map has mean 0 over H x W
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(2, 8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown connector norm 'ln'"):
        Connector(FeatureSpec(4, 8), FeatureSpec(8, 8), norm="ln")


def test_resize_only_when_enabled():
    x = torch.rand(1, 2, 4, 6)
    plain = Connector(FeatureSpec(2, 8), FeatureSpec(3, 16))
    assert plain(x, size=(2, 3)).shape == (1, 3, 4, 6)  # resize off: a size mismatch stays visible
    resizing = Connector(FeatureSpec(2, 8), FeatureSpec(3, 16), resize=True)
    y = resizing(x, size=(2, 3))
    expected = F.interpolate(resizing.conv(x), size=(2, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, expected)
    # bilinear 2x downsampling with align_corners=False averages each 2x2 block
    ramp = torch.arange(24.0).view(1, 1, 4, 6)
    with torch.no_grad():
        resizing.conv.weight.fill_(0.0)
        resizing.conv.weight[:, 0] = 1.0
    down = resizing(torch.cat([ramp, torch.zeros_like(ramp)], dim=1), size=(2, 3))
    torch.testing.assert_close(down[0, 0], F.avg_pool2d(ramp, 2)[0, 0])
    assert resizing(x).shape == (1, 3, 4, 6)  # no size given: unchanged


def test_gradients_reach_student_and_connector():
    conn = Connector(FeatureSpec(2, 8), FeatureSpec(3, 8))
    x = torch.rand(1, 2, 3, 4, requires_grad=True)
    conn(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert conn.conv.weight.grad.abs().sum() > 0
