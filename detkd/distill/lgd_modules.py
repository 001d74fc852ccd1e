"""Building blocks of LGD's label-guided "teacher" (Zhang et al., AAAI'22, arXiv 2109.11496; docs/methods.md §5.1).

Numerics follow the official megvii-research/LGD code as described in methods.md:

* label descriptors: clamped, normalised boxes + one-hot class, mapped to [-1, 1] (``label_descriptors``);
* the label encoder is a PointNet whose every box is its own length-1 "point cloud sample": its norms are
  ``LayerNorm([C, 1], elementwise_affine=False)`` over the channels of one box, its STNs predict one matrix per box,
  and the only operation across boxes is the per-image max pool. Variable box counts therefore need no padding;
* appearance embeddings are mask-pooled student features (``mask_pool``);
* the intra-object knowledge mapper renders per-box vectors back into a feature map (``KnowledgeMapper``).

Rows of every per-box tensor are ordered image by image, boxes in target order, the context box last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def label_boxes(
    targets: list[dict[str, Tensor]], batch_shape: tuple[int, int], num_classes: int, *, add_context: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The boxes LGD encodes, clamped to the padded batch, one row per box (no grad).

    Per image: its GT boxes, then (``add_context``) the whole-image box [0, 0, w, h] with label 0. An image without
    boxes gets one dummy box [0, 0, 1, 1] with label 0 and no context box (official ``box_descriptor_encode``).
    All boxes are clamped to [0, w - 1] x [0, h - 1], (h, w) = ``batch_shape`` (the padded size, not the image's).
    Real labels must lie in 1..``num_classes``.

    Returns:
        boxes (T, 4) float xyxy pixels, labels (T,) int64 (1..K, 0 for context/dummy rows),
        image_index (T,) int64, is_context (T,) bool.
    """
    if not targets:
        raise ValueError("label_boxes: empty targets list")
    h, w = batch_shape
    device = targets[0]["boxes"].device
    rows_b, rows_l, rows_i, rows_c = [], [], [], []
    for i, tgt in enumerate(targets):
        boxes, labels = tgt["boxes"].detach().float(), tgt["labels"].detach().long()
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"LGD targets[{i}]: expected boxes (M, 4) and labels (M,), got {tuple(boxes.shape)} and "
                f"{tuple(labels.shape)}"
            )
        bad = labels[(labels < 1) | (labels > num_classes)]
        if bad.numel():
            raise ValueError(f"LGD targets[{i}]: label {int(bad[0])} outside 1..{num_classes}")
        ctx = torch.zeros(0, dtype=torch.bool, device=device)
        if len(boxes) == 0:
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device)
            labels = torch.zeros(1, dtype=torch.long, device=device)
        elif add_context:
            boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, float(w), float(h)]], device=device)])
            labels = torch.cat([labels, labels.new_zeros(1)])
            ctx = torch.tensor([True], device=device)
        rows_b.append(boxes)
        rows_l.append(labels)
        rows_i.append(torch.full((len(boxes),), i, dtype=torch.long, device=device))
        rows_c.append(torch.cat([torch.zeros(len(boxes) - len(ctx), dtype=torch.bool, device=device), ctx]))
    boxes = torch.cat(rows_b)
    lo = boxes.new_zeros(4)
    hi = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
    return torch.clamp(boxes, lo, hi), torch.cat(rows_l), torch.cat(rows_i), torch.cat(rows_c)


def encode_descriptors(boxes: Tensor, labels: Tensor, batch_shape: tuple[int, int], num_classes: int) -> Tensor:
    """(T, 4) clamped boxes + (T,) labels -> (T, 4 + K) descriptors in [-1, 1] (no grad).

    x1, x2 are divided by w and y1, y2 by h; label l in 1..K becomes one-hot index l - 1, label 0 (context or
    dummy row) an all-zero one-hot; then every entry is mapped by 2x - 1, so a zero one-hot becomes all -1.
    """
    h, w = batch_shape
    norm = boxes / boxes.new_tensor([w, h, w, h])
    one_hot = F.one_hot(labels, num_classes + 1)[:, 1:].to(norm.dtype)
    return torch.cat([norm, one_hot], dim=1) * 2.0 - 1.0


@torch.no_grad()
def label_descriptors(
    targets: list[dict[str, Tensor]], batch_shape: tuple[int, int], num_classes: int, *, add_context: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """LGD label descriptors of a batch (official ``box_descriptor_encode``, one-hot categories, xyxy boxes).

    Returns:
        desc (T, 4 + K) in [-1, 1], image_index (T,) int64, is_context (T,) bool; T = total rows of the batch
        (see ``label_boxes`` for the context and dummy rows). The context row [0, 0, w, h] is clamped to
        [0, 0, w - 1, h - 1] like every box, so it reads (-1, -1, 1 - 2/w, 1 - 2/h, -1, ..., -1).
    """
    boxes, labels, image_index, is_context = label_boxes(targets, batch_shape, num_classes, add_context=add_context)
    return encode_descriptors(boxes, labels, batch_shape, num_classes), image_index, is_context


def _point_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv1d(k=1) + LayerNorm over one box's channels (no affine) + ReLU, on (T, C, 1)."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, 1), nn.LayerNorm([c_out, 1], elementwise_affine=False), nn.ReLU())


def _fc_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, c_out), nn.LayerNorm(c_out, elementwise_affine=False), nn.ReLU())


class STN(nn.Module):
    """PointNet transform net as LGD uses it: (T, k, 1) -> (T, k, k), one matrix per box.

    k -> 64 -> 128 -> 1024 (point blocks), max over the point axis (length 1 here), 1024 -> 512 -> 256 (fc + LN +
    ReLU), 256 -> k*k. No identity shortcut is added (the reference drops it, having no orthogonality regulariser).
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.points = nn.Sequential(_point_block(k, 64), _point_block(64, 128), _point_block(128, 1024))
        self.head = nn.Sequential(_fc_block(1024, 512), _fc_block(512, 256), nn.Linear(256, k * k))

    def forward(self, x: Tensor) -> Tensor:
        g = self.points(x).amax(dim=2)
        return self.head(g).view(-1, self.k, self.k)


def _apply_transform(x: Tensor, matrix: Tensor) -> Tensor:
    """(T, k, 1) row-vector times (T, k, k): x'_j = sum_i x_i M_ij."""
    return torch.bmm(x.transpose(1, 2), matrix).transpose(1, 2)


def segment_max(x: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """(T, C) -> (num_segments, C) max over the rows of each segment; every segment must have a row."""
    out = x.new_full((num_segments, x.shape[1]), float("-inf"))
    return out.scatter_reduce(0, index[:, None].expand_as(x), x, reduce="amax", include_self=False)


class LabelEncoder(nn.Module):
    """PointNet label encoder: descriptors (T, k_in) -> label embeddings (T, out).

    input STN(k_in) -> conv k_in->64 (LN, ReLU) -> feature STN(64) -> 64->128->1024 (LN, ReLU) -> per-image max
    pool (1024) broadcast back and concatenated after the 64-d transformed local feature (1088) -> conv -> out
    (LN, ReLU). Every norm is LayerNorm([C, 1]) without affine over one box; see the module docstring.
    """

    def __init__(self, k_in: int, out: int = 256):
        super().__init__()
        self.stn_input = STN(k_in)
        self.local = _point_block(k_in, 64)
        self.stn_feature = STN(64)
        self.lift = nn.Sequential(_point_block(64, 128), _point_block(128, 1024))
        self.fuse = _point_block(64 + 1024, out)

    def forward(self, desc: Tensor, image_index: Tensor, num_images: int) -> Tensor:
        x = desc.unsqueeze(-1)
        x = self.local(_apply_transform(x, self.stn_input(x)))
        local = _apply_transform(x, self.stn_feature(x))  # (T, 64, 1)
        g = segment_max(self.lift(local).squeeze(-1), image_index, num_images)  # (B, 1024)
        x = torch.cat([local, g[image_index].unsqueeze(-1)], dim=1)
        return self.fuse(x).squeeze(-1)


def mask_pool(features: Tensor, masks: Tensor, image_index: Tensor) -> Tensor:
    """Appearance embedding of each box: mean of its image's features over its inside-mask.

    Args:
        features: (B, C, H, W); masks: (T, H, W) bool; image_index: (T,) image of each mask.
    Returns:
        (T, C): sum of features inside / max(#points, 1), so a mask without grid points gives a zero vector.
    """
    out = features.new_zeros(len(masks), features.shape[1])
    flat = features.flatten(2)
    m = masks.flatten(1).to(features.dtype)
    for b in range(features.shape[0]):
        rows = (image_index == b).nonzero().squeeze(1)
        if rows.numel():
            mb = m[rows]
            # .to(): under autocast the matmul may come out in a lower precision than ``out``
            out[rows] = ((mb @ flat[b].T) / mb.sum(1, keepdim=True).clamp(min=1.0)).to(out.dtype)
    return out


def cross_image_mask(image_index: Tensor) -> Tensor:
    """(T, T) bool attention mask, True (= blocked) where query and key rows belong to different images."""
    return image_index[:, None] != image_index[None, :]


def _refinement(channels: int) -> nn.Sequential:
    def gn() -> nn.GroupNorm:
        return nn.GroupNorm(1, channels, affine=False)

    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), gn(), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), gn(), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), gn(),
    )  # fmt: skip


class KnowledgeMapper(nn.Module):
    """Intra-object knowledge mapper: per-box vectors (T, C) -> one instructive map (B, C, H, W).

    Each instance row goes through a Linear and is painted into its inside-mask (sum over instances), then a 3x3
    conv; with a context box (``add_context``) the Linear of the image's bias row is added as a per-channel bias;
    ReLU; refinement 3 x [3x3 conv, GN(1, no affine)] with ReLU after the first two. Bias rows (``bias_row``) are
    never painted.
    """

    def __init__(self, channels: int, *, add_context: bool = True):
        super().__init__()
        self.instance_proj = nn.Linear(channels, channels)
        # only built when used, so that no parameter is left without a gradient (DDP)
        self.context_proj = nn.Linear(channels, channels) if add_context else None
        self.instance_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.refine = _refinement(channels)

    def forward(self, rows: Tensor, masks: Tensor, image_index: Tensor, bias_row: Tensor, num_images: int) -> Tensor:
        inst = self.instance_proj(rows)
        h, w = masks.shape[-2:]
        m = masks.flatten(1).to(inst.dtype)
        canvas = inst.new_zeros(num_images, inst.shape[1], h * w)
        for b in range(num_images):
            sel = ((image_index == b) & ~bias_row).nonzero().squeeze(1)
            if sel.numel():
                canvas[b] = (inst[sel].T @ m[sel]).to(canvas.dtype)
        x = self.instance_conv(canvas.view(num_images, -1, h, w))
        if self.context_proj is not None:
            bias = inst.new_zeros(num_images, inst.shape[1])
            bias = bias.index_add(0, image_index[bias_row], self.context_proj(rows[bias_row]))
            x = x + bias[:, :, None, None]
        return self.refine(F.relu(x))
