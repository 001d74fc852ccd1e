"""FeatureTaps: hooks record only inside capture(), read() clears, remove() unhooks."""

from __future__ import annotations

import pytest
import torch

from detkd.models import build
from detkd.models.taps import FeatureTaps

LAYER2 = "backbone.body.layer2"


@pytest.fixture(scope="module")
def model():
    m = build("retinanet", "resnet18", num_classes=2, fpn_channels=16, head_convs=1, min_size=64, max_size=64)
    return m.eval()


def layer2_by_hand(model, x):
    body = model.backbone.body
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    return body.layer2(body.layer1(x))


def test_records_backbone_stage_only_inside_capture(model):
    x = torch.rand(2, 3, 32, 48)  # non-square: layer2 (stride 8) is 4 x 6
    taps = FeatureTaps(model, [LAYER2, "backbone.fpn"])
    try:
        with torch.no_grad():
            model.backbone(x)  # outside capture: nothing kept
            assert taps.read() == {}
            with taps.capture():
                fpn_out = model.backbone(x)
            got = taps.read()
            expected = layer2_by_hand(model, x)
        assert set(got) == {LAYER2, "backbone.fpn"}
        assert got[LAYER2].shape == (2, 128, 4, 6)
        torch.testing.assert_close(got[LAYER2], expected)
        assert list(got["backbone.fpn"]) == list(fpn_out)  # a module returning a dict is recorded as is
        # read() cleared the store: nothing survives to the next step
        assert taps._store == {} and taps.read() == {}
        with torch.no_grad():
            model.backbone(x)
        assert taps.read() == {}
    finally:
        taps.remove()


def test_remove_unhooks_and_context_manager(model):
    module = model.get_submodule(LAYER2)
    before = len(module._forward_hooks)
    with FeatureTaps(model, [LAYER2]) as taps:
        assert len(module._forward_hooks) == before + 1
    assert len(module._forward_hooks) == before
    with pytest.raises(RuntimeError, match="removed"):
        with taps.capture():
            pass


def test_last_call_wins_and_no_nested_capture(model):
    taps = FeatureTaps(model, ["backbone.body.conv1"])
    try:
        with torch.no_grad(), taps.capture():
            model.backbone.body.conv1(torch.zeros(1, 3, 8, 8))
            model.backbone.body.conv1(torch.ones(1, 3, 8, 8))
            with pytest.raises(RuntimeError, match="already open"):
                with taps.capture():
                    pass
        out = taps.read()["backbone.body.conv1"]
        assert out.shape == (1, 64, 4, 4) and out.abs().sum() > 0  # the ones-input call, not the zeros one
    finally:
        taps.remove()


def test_unknown_name_lists_close_names(model):
    with pytest.raises(KeyError, match="backbone.body.layer2"):
        FeatureTaps(model, ["backbone.body.layer22"])
    module = model.get_submodule("backbone.body.layer1")
    assert len(module._forward_hooks) == 0  # a failed construction registers nothing
    with pytest.raises(KeyError):
        FeatureTaps(model, ["backbone.body.layer1", "nope"])
    assert len(module._forward_hooks) == 0
