"""Pair checks: clear errors naming the method, the level/field and both sides; heterogeneous pairs pass."""

from __future__ import annotations

import pytest

from detkd.models import build
from detkd.models.adapters import build_adapter
from detkd.models.connectors import Connector, make_connector
from detkd.models.pairs import HeadSignature, PairError, check_pair, check_shared_input, head_signature
from detkd.structures import FeatureSpec

LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def tiny(family="retinanet", backbone="resnet18", fpn=32, k=3):
    return build(family, backbone, num_classes=k, fpn_channels=fpn, head_convs=1, min_size=64, max_size=64)


def test_heterogeneous_pair_is_fine_for_features_with_a_connector():
    teacher, student = build_adapter(tiny(backbone="resnet50", fpn=64)), build_adapter(tiny(fpn=32))
    t_specs, s_specs = teacher.feature_specs(), student.feature_specs()
    assert t_specs["p3"] == FeatureSpec(64, 8) and s_specs["p3"] == FeatureSpec(32, 8)
    check_pair("fgd", "features", s_specs, t_specs, LEVELS)
    check_pair("ld", "same_head", s_specs, t_specs, LEVELS,
               student_head=head_signature(student), teacher_head=head_signature(teacher))
    conn = make_connector(s_specs["p3"], t_specs["p3"])
    assert isinstance(conn, Connector) and conn.conv.weight.shape == (64, 32, 1, 1)


def test_missing_level_names_method_level_and_side():
    s = {"p3": FeatureSpec(32, 8)}
    t = {"p3": FeatureSpec(64, 8), "p4": FeatureSpec(64, 16)}
    with pytest.raises(PairError, match=r"cwd: level 'p4' is missing in the student"):
        check_pair("cwd", "features", s, t, ["p3", "p4"])
    with pytest.raises(PairError, match=r"fgd: level 'p4' is missing in the teacher"):
        check_pair("fgd", "features", t, s, ["p3", "p4"])
    with pytest.raises(PairError, match="no levels"):
        check_pair("cwd", "features", s, t, [])


def test_stride_mismatch_names_both_shapes_and_resize_allows_it():
    s = {"p3": FeatureSpec(32, 8)}
    t = {"p3": FeatureSpec(64, 16)}
    msg = (r"cwd: level 'p3' has student FeatureSpec\(channels=32, stride=8\) "
           r"but teacher FeatureSpec\(channels=64, stride=16\)")
    with pytest.raises(PairError, match=msg):
        check_pair("cwd", "features", s, t, ["p3"])
    check_pair("cwd", "features", s, t, ["p3"], allow_resize=True)


def test_rcnn_vs_dense_levels_do_not_pair_at_p2():
    rcnn, dense = build_adapter(tiny("faster_rcnn")), build_adapter(tiny("retinanet"))
    with pytest.raises(PairError, match="'p2' is missing in the teacher"):
        check_pair("fitnet", "features", rcnn.feature_specs(), dense.feature_specs(), ["p2", "p3"])
    # P3..P5 line up (same strides) even across families
    check_pair("fitnet", "features", rcnn.feature_specs(), dense.feature_specs(), ["p3", "p4", "p5"])


def test_same_head_mismatches():
    specs = {"p3": FeatureSpec(16, 8)}
    base = HeadSignature("gfl", 3, (8, 16), 1)
    cases = [
        (HeadSignature("fcos", 3, (8, 16), 1), "family differs: student 'gfl' vs teacher 'fcos'"),
        (HeadSignature("gfl", 80, (8, 16), 1), "num_classes differs: student 3 vs teacher 80"),
        (HeadSignature("gfl", 3, (8, 16, 32), 1), r"strides differs: student \(8, 16\) vs teacher \(8, 16, 32\)"),
        (HeadSignature("gfl", 3, (8, 16), 9), "num_anchors differs: student 1 vs teacher 9"),
    ]
    for teacher, msg in cases:
        with pytest.raises(PairError, match="ld: needs the same head, but " + msg):
            check_pair("ld", "same_head", specs, specs, ["p3"], student_head=base, teacher_head=teacher)
    with pytest.raises(PairError, match="pass student_head and teacher_head"):
        check_pair("ld", "same_head", specs, specs, ["p3"])
    with pytest.raises(ValueError, match="unknown pair requirement"):
        check_pair("ld", "heads", specs, specs, ["p3"])


def test_head_signature_reads_the_model():
    retina = head_signature(build_adapter(tiny("retinanet", k=5)))
    assert (retina.family, retina.num_classes, retina.strides, retina.num_anchors) == (
        "retinanet", 5, (8, 16, 32, 64, 128), 9)
    rcnn = head_signature(build_adapter(tiny("faster_rcnn")))
    assert rcnn.num_anchors == 3 and rcnn.strides == (4, 8, 16, 32, 64)
    # same family, other anchor sizes: outputs no longer correspond location by location
    other = build_adapter(tiny("retinanet", k=5))
    other.model.anchor_generator.sizes = tuple((2 * s[0], *s[1:]) for s in other.model.anchor_generator.sizes)
    specs = {"p3": FeatureSpec(16, 8)}
    with pytest.raises(PairError, match="anchor_sizes differs"):
        check_pair("ld", "same_head", specs, specs, ["p3"], student_head=retina, teacher_head=head_signature(other))


def test_shared_input_needs_same_normalisation():
    student, teacher = tiny(), tiny(backbone="resnet34")
    check_shared_input("cwd", student, teacher)
    teacher.transform.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(PairError, match=r"cwd: .*transform.image_mean differs"):
        check_shared_input("cwd", student, teacher)
    assert issubclass(PairError, ValueError)
