"""Tiny data and trainables for the engine tests (also used by ddp_worker.py, so no pytest imports here)."""

from __future__ import annotations

import random
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ToyDetection(torch.utils.data.Dataset):
    """``n`` random 3x``size``x``size`` images with 1-2 bright boxes each; labels 1..3.

    Records are fixed per index; ``__getitem__`` adds augmentation that draws from the torch, python and numpy
    global RNGs (flip, brightness, noise), so exact resume must restore all three.
    """

    num_classes = 3

    def __init__(self, n: int = 8, size: int = 64, augment: bool = True):
        self.n, self.size, self.augment = n, size, augment

    def __len__(self) -> int:
        return self.n

    def get_annotation(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        k = 1 + i % 2
        wh = torch.randint(12, 25, (k, 2), generator=g).float()
        xy = torch.rand(k, 2, generator=g) * (self.size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        labels = torch.randint(1, 4, (k,), generator=g)
        return {"boxes": boxes, "labels": labels, "image_id": i, "width": self.size, "height": self.size}

    def __getitem__(self, i: int):
        ann = self.get_annotation(i)
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, self.size, self.size, generator=g) * 0.2
        for (x0, y0, x1, y1), c in zip(ann["boxes"].long().tolist(), ann["labels"].tolist()):
            image[c - 1, y0:y1, x0:x1] = 1.0
        boxes = ann["boxes"].clone()
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
                boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
            image = image * (0.8 + 0.4 * random.random()) + float(np.random.normal(0, 0.01))
        return image.clamp(0, 1), {"boxes": boxes, "labels": ann["labels"], "image_id": i}


def collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def make_loader(dataset, batch_size: int = 2, seed: int = 0, sampler=None):
    """Shuffled with a seeded generator, like detkd.data.build_loader; num_workers=0."""
    if sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate)


class TinyNet(nn.Module):
    """Conv + BN + dropout regressor of the first box and its class: a stand-in detector whose forward draws
    random numbers (dropout) and whose BN buffers change in training."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.drop = nn.Dropout(0.2)
        self.box = nn.Linear(128, 4)
        self.cls = nn.Linear(128, num_classes)

    def forward(self, images, targets):
        f = self.drop(self.body(torch.stack(images)).flatten(1))
        size = images[0].shape[-1]
        gt_box = torch.stack([t["boxes"][0] for t in targets]) / size
        gt_cls = torch.stack([t["labels"][0] for t in targets]) - 1
        return {"box": F.smooth_l1_loss(self.box(f), gt_box), "cls": F.cross_entropy(self.cls(f), gt_cls)}


class TinyTrainable(nn.Module):
    """Trainable contract around TinyNet (like TaskModel) plus a trainable extra module (like a connector)."""

    def __init__(self):
        super().__init__()
        self.student = TinyNet()
        self.connector = nn.Linear(2, 2)

    def forward(self, images, targets):
        losses = self.student(images, targets)
        reg = self.connector(torch.ones(2)).pow(2).mean() * 1e-3
        out = {f"task/{k}": v for k, v in losses.items()}
        out["distill/reg"] = reg
        out["loss"] = sum(losses.values()) + reg
        return out


class TinyBackbone(nn.Module):
    """Two conv stages (strides 8 and 16) + torchvision FPN, width 32 (FCOS's GroupNorm needs a multiple of 32)."""

    out_channels = 32

    def __init__(self):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.c3 = nn.Sequential(block(3, 8), block(8, 16), block(16, 16))
        self.c4 = block(16, 32)
        self.fpn = FeaturePyramidNetwork([16, 32], self.out_channels)

    def forward(self, x):
        c3 = self.c3(x)
        return self.fpn(OrderedDict([("p3", c3), ("p4", self.c4(c3))]))


def tiny_fcos(num_classes: int = 3, size: int = 64):
    """A plain torchvision FCOS (labels 1..num_classes) with a tiny backbone and a one-conv head."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    anchors = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    head = FCOSHead(32, 1, num_classes + 1, num_convs=1)
    return FCOS(TinyBackbone(), num_classes + 1, min_size=size, max_size=size, anchor_generator=anchors, head=head)
