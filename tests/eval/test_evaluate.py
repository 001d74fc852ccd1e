"""evaluate() plumbing (GT source, batching, modes, max detections) and measure_latency, with fake detectors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkd.eval import evaluate, measure_latency

BOXES = {
    10: ([[4.0, 6.0, 30.0, 20.0]], [1]),
    11: ([[0.0, 0.0, 15.0, 15.0], [20.0, 5.0, 40.0, 25.0]], [2, 1]),
    12: ([], []),  # an image without boxes
}


class ToySet:
    """Three 32x48 images; targets keyed by image_id. ``with_get_annotation`` toggles the cheap GT path."""

    num_classes = 2

    def __init__(self, with_get_annotation: bool):
        self.ids = sorted(BOXES)
        self.decoded = 0
        if with_get_annotation:
            self.get_annotation = self._annotation

    def __len__(self):
        return len(self.ids)

    def _annotation(self, i):
        boxes, labels = BOXES[self.ids[i]]
        return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": self.ids[i], "width": 48, "height": 32}

    def __getitem__(self, i):
        self.decoded += 1
        image = torch.full((3, 32, 48), float(self.ids[i]))  # the fake model reads the image id from the pixels
        return image, {k: v for k, v in self._annotation(i).items() if k in ("boxes", "labels", "image_id")}


class Oracle(nn.Module):
    """Returns the true boxes of each image (found through its pixel value, score 0.9), followed by ``extra``
    junk boxes of score ``junk_score``."""

    def __init__(self, extra: int = 0, junk_score: float = 0.01):
        super().__init__()
        self.extra, self.junk_score = extra, junk_score
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.batches = []
        self.modes = []

    def forward(self, images):
        self.batches.append(len(images))
        self.modes.append(self.training)
        out = []
        for img in images:
            boxes, labels = BOXES[int(img[0, 0, 0].item())]
            b = torch.tensor(boxes).reshape(-1, 4)
            junk = torch.tensor([[40.0, 0.0, 47.0, 7.0]]).repeat(self.extra, 1)
            out.append({
                "boxes": torch.cat([b, junk]),
                "scores": torch.cat([torch.full((len(b),), 0.9), torch.full((self.extra,), self.junk_score)]),
                "labels": torch.tensor(labels + [1] * self.extra, dtype=torch.int64),
            })
        return out


@pytest.mark.parametrize("with_get_annotation", [True, False])
def test_perfect_model_scores_one_and_mode_is_restored(with_get_annotation):
    data, model = ToySet(with_get_annotation), Oracle()
    model.train()
    m = evaluate(model, data, batch_size=2, device="cpu")
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
    assert model.batches == [2, 1]  # 3 images in batches of 2
    assert model.modes == [False, False]  # ran in eval mode ...
    assert model.training  # ... and the previous mode is back
    assert data.decoded == 3


def test_max_detections_keeps_the_highest_scores():
    # Each image's output lists its true boxes (score 0.9) first, then 5 junk boxes scoring 0.95. Keeping the top 2
    # *by score* keeps only junk, so no true box survives: recall 0. (Keeping the first 2 would give recall 1.)
    data = ToySet(True)
    cut = evaluate(Oracle(extra=5, junk_score=0.95), data, batch_size=3, device="cpu", max_detections=2)
    assert cut["AR2"] == 0.0 and cut["AP"] == 0.0
    full = evaluate(Oracle(extra=5, junk_score=0.95), data, batch_size=3, device="cpu")
    assert full["AR100"] == pytest.approx(1.0) and full["AP"] < 1.0  # junk outranks the true boxes


def test_missing_num_classes_is_a_clear_error():
    data = ToySet(True)
    del ToySet.num_classes
    try:
        with pytest.raises(ValueError, match="num_classes"):
            evaluate(Oracle(), data, batch_size=1, device="cpu")
        assert evaluate(Oracle(), data, batch_size=1, device="cpu", num_classes=2)["AP"] == pytest.approx(1.0)
    finally:
        ToySet.num_classes = 2


def test_blind_model_scores_zero():
    class Blind(Oracle):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                    for _ in images]

    m = evaluate(Blind(), ToySet(True), batch_size=2, device="cpu")
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and math.isnan(m["APl"])


def test_measure_latency_is_the_median_per_image(monkeypatch):
    # A fake clock: each call "takes" the next duration of the list, whatever the machine is doing.
    clock = [0.0]
    monkeypatch.setattr("detkd.eval.latency.perf_counter", lambda: clock[0])

    class Timed(nn.Module):
        def __init__(self, durations_s):
            super().__init__()
            self.durations, self.shapes = list(durations_s), []

        def forward(self, images):
            self.shapes.append([tuple(i.shape) for i in images])
            clock[0] += self.durations.pop(0)
            return [{}] * len(images)

    # 2 warm-up calls (ignored, however slow), then 5 timed calls of 40, 8, 12, 100, 20 ms: the median is 20 ms
    # per batch of 4 images, 5 ms per image (the mean, 36 ms, would say 9).
    model = Timed([1.0, 1.0, 0.040, 0.008, 0.012, 0.100, 0.020])
    model.train()
    ms = measure_latency(model, (40, 24), device="cpu", warmup=2, iters=5, batch=4)
    assert ms == pytest.approx(5.0)
    assert len(model.shapes) == 7 and model.shapes[0] == [(3, 40, 24)] * 4
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="iters >= 1"):
        measure_latency(model, 8, device="cpu", iters=0)
