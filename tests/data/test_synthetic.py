"""The embedded synthetic dataset: deterministic, cached by config, follows the data contract, hard enough."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detkd.config import SynthConfig
from detkd.data import CocoDetection, dataset_stats
from detkd.data import synthetic as syn

TINY = SynthConfig(num_train=24, num_val=4, image_size=96, max_objects=6, seed=1)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b = syn.generate(tmp_path / "a", TINY), syn.generate(tmp_path / "b", TINY)
    for name in ("annotations_train.json", "annotations_val.json", "meta.json", "images/train_000003.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = syn.generate(tmp_path / "c", SynthConfig(num_train=24, num_val=4, image_size=96, seed=2))
    assert (a / "annotations_train.json").read_bytes() != (c / "annotations_train.json").read_bytes()


def test_contract_and_difficulty(tmp_path):
    root = syn.generate(tmp_path, TINY)
    ds = CocoDetection(root / "annotations_train.json", root / "images")
    assert ds.class_names == syn.CLASSES and ds.num_classes >= 5
    stats = dataset_stats(ds)
    assert stats["images"] == 24 and stats["images_without_boxes"] >= 1  # some negatives
    assert stats["dropped_degenerate"] == 0 and stats["clipped"] == 0  # the generator writes clean boxes
    sides = []
    for i in range(len(ds)):
        boxes = ds.get_annotation(i)["boxes"]
        assert ((boxes >= 0) & (boxes <= 96)).all()
        sides += (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values.tolist()
    assert min(sides) < 16 and max(sides) > 30  # small objects and large ones (up to half the image)
    assert max(sides) <= 96 / 2 + 2
    image, target = ds[0]
    assert image.shape == (3, 96, 96) and target["labels"].min() >= 1


def test_classes_need_both_colour_and_shape():
    parts = [name.split("_") for name in syn.CLASSES]
    same_shape = any(a[1] == b[1] and a[0] != b[0] for a in parts for b in parts)
    same_colour = any(a[0] == b[0] and a[1] != b[1] for a in parts for b in parts)
    assert same_shape and same_colour and all(c in syn.COLOURS for c, _ in parts)
    assert not {tuple(c) for c in syn.DISTRACTOR_COLOURS} & set(syn.COLOURS.values())


def test_occlusion_rule_on_a_hand_made_owner_map():
    owner = np.full((10, 12), -1, dtype=np.int16)
    owner[0:2, 0:5] = 0  # object 0: 10 of its 30 pixels visible (67% hidden) -> removed
    owner[3:7, 6:9] = 1  # object 1: 12 of 20 visible (40% hidden) -> box of the visible pixels
    owner[8:10, 0:2] = 2  # object 2: fully visible
    anns = syn._visible_boxes(owner, [(1, 30), (2, 20), (3, 4)])
    assert anns == [([6, 3, 9, 7], 2), ([0, 8, 2, 10], 3)]


def test_rendered_boxes_lie_inside_the_image():
    rng = np.random.default_rng([0, 0, 5])
    pixels, anns = syn.render_image(rng, 96, 6)
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    for (x0, y0, x1, y1), label in anns:
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and 1 <= label <= len(syn.CLASSES)


def test_ensure_regenerates_only_when_config_changes(tmp_path, monkeypatch):
    syn.ensure(tmp_path, TINY)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"format_version": syn.FORMAT_VERSION, "config": TINY.__dict__}

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although nothing changed")

    monkeypatch.setattr(syn, "generate", boom)
    syn.ensure(tmp_path, TINY)  # cached: no call
    monkeypatch.undo()
    bigger = SynthConfig(num_train=3, num_val=2, image_size=64, seed=1)
    syn.ensure(tmp_path, bigger)
    assert len(json.loads((tmp_path / "annotations_train.json").read_text())["images"]) == 3
    assert len(list((tmp_path / "images").glob("train_*.png"))) == 3  # stale images of the old config removed


def test_generate_rejects_bad_config_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="synthetic.image_size"):
        syn.generate(tmp_path, SynthConfig(num_train=1, num_val=1, image_size=8))
    with pytest.raises(ValueError, match="synthetic.num_train"):
        syn.generate(tmp_path, SynthConfig(num_train=-1))


@pytest.mark.skipif(syn.fcntl is None, reason="the lock needs fcntl (POSIX)")
def test_ensure_waits_for_a_generation_in_progress_and_does_not_redo_it(tmp_path, monkeypatch):
    """Processes started together (a study split over seeds) share the folder: while one holds the lock (is
    generating), another's ``ensure`` waits, then finds the set complete instead of deleting and rewriting it."""
    import fcntl
    import threading

    tiny = SynthConfig(num_train=3, num_val=2, image_size=64, seed=1)
    calls = []
    real_generate = syn.generate
    monkeypatch.setattr(syn, "generate", lambda *a: calls.append(a) or real_generate(*a))
    with (tmp_path / syn.LOCK_NAME).open("a") as holder:  # "the other process", mid-generation
        fcntl.flock(holder, fcntl.LOCK_EX)
        waiter = threading.Thread(target=syn.ensure, args=(tmp_path, tiny))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not (tmp_path / "meta.json").exists()  # blocked on the lock
        real_generate(tmp_path, tiny)  # the holder finishes its set
        fcntl.flock(holder, fcntl.LOCK_UN)
    waiter.join(30)
    assert not waiter.is_alive()
    assert calls == []  # found complete after the wait: not regenerated


def test_ensure_refuses_a_folder_of_other_files_and_resumes_its_own(tmp_path):
    """``data.root`` of a real dataset without ``data.format`` (the default is synthetic) must not get 500 generated
    images written into it and trained on; a generation interrupted before meta.json is simply redone."""
    tiny = SynthConfig(num_train=3, num_val=2, image_size=64, seed=1)
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    with pytest.raises(ValueError, match=r"data.format is 'synthetic' \(the default\) but .*voc holds files"):
        syn.ensure(voc, tiny)
    assert sorted(p.name for p in voc.iterdir()) == ["Annotations", "JPEGImages"]  # nothing written
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="images/holiday.jpg"):
        syn.ensure(mine, tiny)
    half = tmp_path / "half"
    syn.generate(half, tiny)
    (half / "meta.json").unlink()  # interrupted before its last write
    syn.ensure(half, tiny)
    assert (half / "meta.json").is_file()
