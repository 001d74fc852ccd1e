"""LD: the KL kernel, Main LD, Main KD and VLR LD on hand-built GFL-style outputs (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from detkd.config import apply_override, load_config
from detkd.losses.ld import LD_DEFAULTS, VLRLD, MainKD, MainLD, kd_kl_rows
from detkd.regions.vlr import vlr_region_loop
from detkd.structures import Assignment, DetOutputs, FeatureSpec

SPECS = {"p3": FeatureSpec(8, 8), "p4": FeatureSpec(8, 16)}
BINS = 3  # reg_max 2 keeps the hand loops short


def kl_row_by_hand(zs: list[float], zt: list[float], tau: float) -> float:
    """τ² · (1/K) Σ p_T (log p_T − log q_S), written out with math."""
    es, et = [math.exp(v / tau) for v in zs], [math.exp(v / tau) for v in zt]
    q, p = [v / sum(es) for v in es], [v / sum(et) for v in et]
    return tau * tau * sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q)) / len(zs)


def gfl_outputs(dist, cls, labels, boxes=None) -> DetOutputs:
    """N images; p3 is a non-square 2x3 map (stride 8), p4 is 1x2 (stride 16): L = 8 locations.

    Anchors follow mmdet's GFL: squares of side 8·stride centred at (x·s, y·s).
    """
    n = labels.shape[0]
    feats = {"p3": torch.zeros(n, 8, 2, 3), "p4": torch.zeros(n, 8, 1, 2)}
    cells = [(x, y, 8) for y in range(2) for x in range(3)] + [(x, 0, 16) for x in range(2)]
    anchors = torch.tensor([[x * s - 4 * s, y * s - 4 * s, x * s + 4 * s, y * s + 4 * s] for x, y, s in cells]).float()
    targets = None
    if boxes is not None:
        targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.long)} for b in boxes]
    matched = [torch.where(lab > 0, 0, -1) for lab in labels]
    return DetOutputs(
        "gfl",
        (16, 24),
        [(16, 24)] * n,
        targets,
        feats,
        {"p3": 8, "p4": 16},
        head={"bbox_dist": dist, "cls_logits": cls},
        level_sizes=[6, 2],
        anchors=anchors,
        assignment=Assignment(matched, labels),
    )


# ---------------------------------------------------------------- kd_kl_rows


def test_kd_kl_rows_hand_values_mean_over_bins():
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    got = kd_kl_rows(s, t, tau=1.0)
    # row 0: p_T = [1/4, 3/4], q_S = [1/2, 1/2]: (1/4 ln(1/2) + 3/4 ln(3/2)) / 2 (mean over K = 2, not the sum)
    row0 = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2
    assert got[0].item() == pytest.approx(row0, rel=1e-6)
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)  # equal logits -> 0
    # τ = 2 on doubled logits: same distributions, τ² = 4 times the value
    assert kd_kl_rows(2 * s, 2 * t, tau=2.0)[0].item() == pytest.approx(4 * row0, rel=1e-6)


def test_kd_kl_rows_teacher_detached_and_zero_mass_bins():
    s = torch.randn(4, 17, requires_grad=True)
    t = torch.randn(4, 17, requires_grad=True)
    kd_kl_rows(s, t, tau=10.0).sum().backward()
    assert s.grad is not None and t.grad is None
    t_peaked = torch.full((1, 3), -1e4)
    t_peaked[0, 0] = 0.0  # teacher mass all on bin 0: 0·log 0 terms must vanish, not give NaN
    got = kd_kl_rows(torch.zeros(1, 3), t_peaked, tau=1.0)
    assert got.item() == pytest.approx(math.log(3.0) / 3, rel=1e-5)


# ---------------------------------------------------------------- Main LD


def _ld_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_dist = torch.randn(2, 8, 4 * BINS, generator=g, requires_grad=True)
    t_dist = torch.randn(2, 8, 4 * BINS, generator=g, requires_grad=True)
    s_cls = torch.randn(2, 8, 3, generator=g, requires_grad=True)
    t_cls = torch.randn(2, 8, 3, generator=g, requires_grad=True)
    labels = torch.zeros(2, 8, dtype=torch.long)
    labels[0, 1], labels[1, 4], labels[1, 5] = 2, 1, 3  # positives on p3 only; p4 has none
    return s_dist, t_dist, s_cls, t_cls, labels


def test_main_ld_matches_naive_loop():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case()
    out = MainLD([], SPECS, SPECS, tau=10.0)(gfl_outputs(s_dist, s_cls, labels), gfl_outputs(t_dist, t_cls, labels))
    total = 0.0
    for i, loc in [(0, 1), (1, 4), (1, 5)]:
        w = max(1 / (1 + math.exp(-v)) for v in s_cls[i, loc].tolist())  # the *student's* max class score
        for e in range(4):
            edge = slice(e * BINS, (e + 1) * BINS)
            total += w * kl_row_by_hand(s_dist[i, loc, edge].tolist(), t_dist[i, loc, edge].tolist(), 10.0)
    assert set(out) == {"p3", "p4"}
    assert out["p3"].item() == pytest.approx(total / 4.0, rel=1e-5)  # official constant avg_factor 4
    assert out["p4"].item() == 0.0
    positives = MainLD([], SPECS, SPECS, normalize="positives")(
        gfl_outputs(s_dist, s_cls, labels), gfl_outputs(t_dist, t_cls, labels)
    )
    assert positives["p3"].item() == pytest.approx(total / (4.0 * 3), rel=1e-5)


def test_main_ld_gradients_and_invariants():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case(1)
    out = MainLD(["p3", "p4"], SPECS, SPECS)(gfl_outputs(s_dist, s_cls, labels), gfl_outputs(t_dist, t_cls, labels))
    (out["p3"] + out["p4"]).backward()  # p4 has no positives: a zero that still back-propagates
    assert s_dist.grad[0, 1].abs().sum() > 0 and s_dist.grad[0, 0].abs().sum() == 0
    assert t_dist.grad is None and t_cls.grad is None
    assert s_cls.grad is None  # the LD weight is the detached student score
    same = MainLD([], SPECS, SPECS)(gfl_outputs(s_dist, s_cls, labels), gfl_outputs(s_dist.detach(), t_cls, labels))
    assert same["p3"].item() == pytest.approx(0.0, abs=1e-6)


def test_main_ld_errors_name_the_problem():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case()
    student = gfl_outputs(s_dist, s_cls, labels)
    with pytest.raises(ValueError, match="level 'p5'"):
        MainLD(["p5"], SPECS, SPECS)(student, gfl_outputs(t_dist, t_cls, labels))
    with pytest.raises(ValueError, match="shapes differ"):
        MainLD([], SPECS, SPECS)(student, gfl_outputs(t_dist[:, :, :8], t_cls, labels))
    retina = gfl_outputs(s_dist, s_cls, labels)
    del retina.head["bbox_dist"]
    with pytest.raises(ValueError, match="no 'bbox_dist'"):
        MainLD([], SPECS, SPECS)(retina, retina)


# ---------------------------------------------------------------- Main KD


def test_main_kd_matches_naive_loop_per_level():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case(2)
    labels[0, 7] = 1  # one positive on p4 as well
    out = MainKD([], SPECS, SPECS, tau=2.0)(gfl_outputs(s_dist, s_cls, labels), gfl_outputs(t_dist, t_cls, labels))
    p3 = [kl_row_by_hand(s_cls[i, j].tolist(), t_cls[i, j].tolist(), 2.0) for i, j in [(0, 1), (1, 4), (1, 5)]]
    assert out["p3"].item() == pytest.approx(sum(p3) / 3, rel=1e-5)  # Σ ℓ / #pos of the level
    assert out["p4"].item() == pytest.approx(kl_row_by_hand(s_cls[0, 7].tolist(), t_cls[0, 7].tolist(), 2.0), rel=1e-5)
    sum(out.values()).backward()
    assert s_cls.grad is not None and t_cls.grad is None


def test_main_kd_no_positives_is_zero_with_graph():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case()
    labels.zero_()
    out = MainKD([], SPECS, SPECS)(gfl_outputs(s_dist, s_cls, labels), gfl_outputs(t_dist, t_cls, labels))
    assert out["p3"].item() == 0.0 and out["p4"].item() == 0.0
    (out["p3"] + out["p4"]).backward()
    assert torch.equal(s_cls.grad, torch.zeros_like(s_cls))


# ---------------------------------------------------------------- VLR LD


def _vlr_boxes():
    # image 0: one off-centre box; image 1: no boxes (its VLR is empty)
    return [torch.tensor([[2.0, -3.0, 21.0, 9.0]]), torch.zeros(0, 4)]


def test_vlr_ld_matches_naive_loop():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case(3)
    boxes = _vlr_boxes()
    student, teacher = gfl_outputs(s_dist, s_cls, labels, boxes), gfl_outputs(t_dist, t_cls, labels, boxes)
    loss = VLRLD([], SPECS, SPECS, tau=10.0, topk=3)
    out = loss(student, teacher)
    vlr = vlr_region_loop(student.anchors, [6, 2], boxes[0], topk=3)
    assert (vlr > 0).any() and (vlr[:6] > 0).any()  # the case exercises the region on p3
    expected = {"p3": 0.0, "p4": 0.0}
    for j in range(8):
        if vlr[j] > 0:
            level = "p3" if j < 6 else "p4"
            for e in range(4):
                edge = slice(e * BINS, (e + 1) * BINS)
                row = kl_row_by_hand(s_dist[0, j, edge].tolist(), t_dist[0, j, edge].tolist(), 10.0)
                expected[level] += vlr[j].item() * row / 16.0  # official constant avg_factor 16
    for level in ("p3", "p4"):
        assert out[level].item() == pytest.approx(expected[level], rel=1e-5, abs=1e-7), level
    assert torch.allclose(loss.region(student)[0], vlr.float(), atol=1e-6)
    assert loss.region(student)[1].abs().sum() == 0  # the image without boxes
    sum(out.values()).backward()
    assert t_dist.grad is None


def test_vlr_ld_exclude_positives_and_zero_when_equal():
    s_dist, t_dist, s_cls, t_cls, labels = _ld_case(4)
    boxes = _vlr_boxes()
    student = gfl_outputs(s_dist, s_cls, labels, boxes)
    base = VLRLD([], SPECS, SPECS, topk=3)
    vlr = base.region(student)
    labels_all = (vlr > 0).long()  # make every VLR location a positive
    student_pos = gfl_outputs(s_dist, s_cls, labels_all, boxes)
    excluded = VLRLD([], SPECS, SPECS, topk=3, exclude_positives=True)
    assert excluded.region(student_pos).abs().sum() == 0
    out = excluded(student_pos, gfl_outputs(t_dist, t_cls, labels_all, boxes))
    assert all(v.item() == 0.0 for v in out.values())
    same = base(student, gfl_outputs(s_dist.detach(), t_cls, labels, boxes))
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in same.values())


def test_ld_defaults_cite_the_official_configs():
    assert LD_DEFAULTS["gfl"]["ld"] == {"weight": 0.25, "tau": 10.0}
    assert LD_DEFAULTS["gfl"]["vlr_ld"] == {"weight": 0.25, "tau": 10.0}
    assert LD_DEFAULTS["gfl"]["kd"] == {"weight": 10.0, "tau": 2.0}
    assert LD_DEFAULTS["retinanet"]["kd"]["tau"] == 8.0
    assert "vlr_ld" not in LD_DEFAULTS["fcos"]
    # every entry's params are accepted by its module
    classes = {"ld": MainLD, "kd": MainKD, "vlr_ld": VLRLD}
    for family in LD_DEFAULTS.values():
        for method, cfg in family.items():
            params = {k: v for k, v in cfg.items() if k != "weight"}
            assert classes[method]([], SPECS, SPECS, **params).tau == cfg["tau"]


def test_vlr_ld_diou_true_from_yaml_or_set_is_the_true_diou():
    # `--set ...diou=true` (and `diou: true` in a YAML recipe) is parsed as a YAML bool
    recipe = load_config("configs/ld_gfl_r50_r18_synth.yaml")
    index = [lc.method for lc in recipe.distill.losses].index("vlr_ld")
    cfg = apply_override(recipe, f"distill.losses.{index}.params.diou=true")
    assert cfg.distill.losses[index].params["diou"] is True
    s_dist, _, s_cls, _, labels = _ld_case(4)
    student = gfl_outputs(s_dist, s_cls, labels, _vlr_boxes())
    from_bool = VLRLD([], SPECS, SPECS, topk=3, diou=True)
    assert from_bool.diou == "true"
    expected = VLRLD([], SPECS, SPECS, topk=3, diou="true").region(student)
    assert torch.equal(from_bool.region(student), expected)
    with pytest.raises(ValueError, match="diou must be 'official' or 'true', got False"):
        VLRLD([], SPECS, SPECS, diou=False)


@pytest.mark.parametrize("cls", [MainLD, MainKD, VLRLD])
@pytest.mark.parametrize("tau", [0.0, float("nan")])
def test_temperature_must_be_positive(cls, tau):
    with pytest.raises(ValueError, match=f"{cls.name}: tau must be > 0"):
        cls([], SPECS, SPECS, tau=tau)
