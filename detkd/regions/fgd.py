"""Box -> feature-cell masks of FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR'22).

The rules reproduce the official ``FeatureLoss`` (yzd-v/FGD, ``mmdet/distillation/losses/fgd.py``), see
docs/methods.md §3.1 and §3.4:

* a box (network-input pixels, xyxy) is scaled to the map as ``x / w_img * W`` and ``y / h_img * H`` where
  ``(h_img, w_img)`` is the image's resized *unpadded* size (official ``img_shape``), or the padded batch size with
  ``use_padded=True`` (mmrazor's port uses ``batch_input_shape``);
* ``wmin = floor(x1)``, ``wmax = ceil(x2)``, ``hmin = floor(y1)``, ``hmax = ceil(y2)``; the *inclusive* cells
  ``[hmin..hmax] x [wmin..wmax]``, clipped to the map, get ``1 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))`` computed
  from the *unclipped* extent; where boxes overlap the larger value (the smaller box) wins;
* ``bg = 1 - [fg > 0]``, divided by its sum when that sum is positive.

Where the official code slices with a negative start (a box left of / above the image), Python's wrap-around would
paint the wrong cells; here the start is clipped to 0 instead.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
from torch import Tensor


def _check_inputs(boxes: list[Tensor], image_sizes: list[tuple[int, int]], batch_shape, use_padded: bool) -> None:
    if len(boxes) != len(image_sizes):
        raise ValueError(f"fgd_masks: got {len(boxes)} box tensors but {len(image_sizes)} image sizes")
    if use_padded and batch_shape is None:
        raise ValueError("fgd_masks: use_padded=True needs batch_shape (the padded (H, W) of the batch)")
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"fgd_masks: boxes of image {i} must be (M, 4) xyxy, got shape {tuple(b.shape)}")


_BITS = 62  # boxes per int64 bit plane: bits 0..61 stay clear of the sign bit


def fgd_masks(
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    feat_hw: tuple[int, int],
    *,
    batch_shape: tuple[int, int] | None = None,
    use_padded: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD foreground and background masks of one feature level (see :func:`fgd_masks_levels`).

    Args:
        boxes: per image, (M_i, 4) xyxy boxes in network-input pixels (M_i may be 0).
        image_sizes: per image, the resized unpadded (h, w).
        feat_hw: (H, W) of the feature map.
        batch_shape: padded (H, W) of the batch; used for scaling when ``use_padded``.
        use_padded: scale boxes by ``batch_shape`` (corrected variant) instead of the unpadded size (official).
        device: where to build the masks (default: the boxes' device).

    Returns:
        fg (N, H, W) float32: per cell the largest ``1 / area_in_cells`` of the boxes covering it, 0 elsewhere.
        bg (N, H, W) float32: ``1 / N_bg`` on cells no box covers (uniform ``1 / (H W)`` without boxes).
    """
    return fgd_masks_levels(
        boxes, image_sizes, [feat_hw], batch_shape=batch_shape, use_padded=use_padded, device=device
    )[0]


def fgd_masks_levels(
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    feat_hws: list[tuple[int, int]],
    *,
    batch_shape: tuple[int, int] | None = None,
    use_padded: bool = False,
    device: torch.device | str | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`fgd_masks` for several levels at once: one ``(fg, bg)`` pair of (N, H_l, W_l) per ``feat_hws`` entry.

    How (no Python loop over boxes, images or levels): per level, the boxes of an image are ranked by mask value,
    largest first, and each gets one bit of an int64 plane (62 boxes per plane). A box covers a cell iff it covers
    the cell's row and its column, so the set of boxes covering a cell is ``row_bits[h] & col_bits[w]`` and the
    winner (largest value = smaller box) is its lowest set bit. All cells of all levels are handled as one flat
    list, so the cost is a few integer ops over (N * planes, sum_l H_l W_l) instead of one small op per box.
    """
    _check_inputs(boxes, image_sizes, batch_shape, use_padded)
    n, counts = len(boxes), [int(b.shape[0]) for b in boxes]
    device = torch.device(device) if device is not None else (boxes[0].device if boxes else torch.device("cpu"))
    if n == 0 or not feat_hws:  # nothing to paint; keeps the reshapes below well defined
        return [(torch.zeros(n, h, w, device=device), torch.zeros(n, h, w, device=device)) for h, w in feat_hws]
    num_levels = len(feat_hws)
    cells = _cells(tuple((int(h), int(w)) for h, w in feat_hws), device)
    max_h, max_w = max(h for h, _ in feat_hws), max(w for _, w in feat_hws)
    planes = max(1, -(-max(counts, default=0) // _BITS))
    cover = torch.zeros(n * planes, cells.level.numel(), dtype=torch.long, device=device)
    table = torch.zeros(n * planes, num_levels * (_BITS + 1), dtype=torch.float32, device=device)  # value by rank
    if sum(counts) > 0:
        sizes = [tuple(batch_shape) if use_padded else tuple(s) for s in image_sizes]
        hw_img = torch.tensor(sizes, dtype=torch.float32, device=device)
        repeats = torch.tensor(counts, device=device)
        img = torch.repeat_interleave(torch.arange(n, device=device), repeats, output_size=sum(counts))  # no sync
        lo, hi, value = _level_extents(torch.cat(boxes).to(device), hw_img[img], feat_hws)
        slot, rank = _slots(img, value, counts, planes)
        rows = _bit_planes(lo[..., 0], hi[..., 0], max_h, slot, rank, n * planes)
        cols = _bit_planes(lo[..., 1], hi[..., 1], max_w, slot, rank, n * planes)
        # bit r of a cell is set iff the box of rank r covers both its row and its column
        cover = rows.index_select(1, cells.row) & cols.index_select(1, cells.col)  # index_select: no advanced indexing
        level = torch.arange(num_levels, device=device)[:, None].expand_as(slot)
        table[slot, level * (_BITS + 1) + rank + 1] = value
    # frexp(2^k) has exponent k + 1 and frexp(0) exponent 0: the column of the winner, or the zero column 0
    exponent = torch.frexp((cover & -cover).float()).exponent  # powers of two are exact in float32
    fg = table.gather(1, cells.table + exponent).view(n, planes, -1).amax(dim=1)  # (N, all cells)
    bg = _background(fg, cells.level, num_levels)
    per_level = [h * w for h, w in feat_hws]
    return [
        (f.reshape(n, h, w), b.reshape(n, h, w))
        for f, b, (h, w) in zip(fg.split(per_level, 1), bg.split(per_level, 1), feat_hws)
    ]


def fgd_masks_loop(
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    feat_hw: tuple[int, int],
    *,
    batch_shape: tuple[int, int] | None = None,
    use_padded: bool = False,
) -> tuple[Tensor, Tensor]:
    """Straightforward per-box reference of :func:`fgd_masks` (same arguments and results), written like the official
    code: one slice-and-max per box. Used by the tests and the benchmark."""
    _check_inputs(boxes, image_sizes, batch_shape, use_padded)
    n = len(boxes)
    h_map, w_map = feat_hw
    device = boxes[0].device if boxes else "cpu"
    fg = torch.zeros(n, h_map, w_map, dtype=torch.float32, device=device)
    for i in range(n):
        h_img, w_img = tuple(batch_shape) if use_padded else tuple(image_sizes[i])
        hmin, hmax, wmin, wmax, value = _scaled_extents(boxes[i], h_img, w_img, feat_hw)
        for j in range(boxes[i].shape[0]):
            r0, r1 = max(int(hmin[j]), 0), int(hmax[j]) + 1
            c0, c1 = max(int(wmin[j]), 0), int(wmax[j]) + 1
            fg[i, r0:r1, c0:c1] = torch.maximum(fg[i, r0:r1, c0:c1], value[j])
    bg = torch.zeros_like(fg)
    for i in range(n):
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        total = float(bg[i].sum())
        if total > 0:
            bg[i] /= total
    return fg, bg


class _Cells(NamedTuple):
    """The cells of all levels as one flat axis (sum_l H_l W_l,), each entry an int64 index tensor."""

    level: Tensor  # level of each cell
    row: Tensor  # position of the cell's row in the row bit planes: level * max_h + h
    col: Tensor  # position of the cell's column in the column bit planes: level * max_w + w
    table: Tensor  # first column of the cell's level in the value table: level * (_BITS + 1)


@functools.lru_cache(maxsize=64)
def _cells(feat_hws: tuple[tuple[int, int], ...], device: torch.device) -> _Cells:
    """Index tensors of the flat cell axis; cached, as the same few level shapes come back every iteration."""
    max_h, max_w = max(h for h, _ in feat_hws), max(w for _, w in feat_hws)
    parts = []
    for i, (h, w) in enumerate(feat_hws):
        level = torch.full((h * w,), i, dtype=torch.long)
        rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        parts.append((level, i * max_h + rows, i * max_w + cols, level * (_BITS + 1)))
    return _Cells(*(torch.cat(x).to(device) for x in zip(*parts)))


def _level_extents(boxes: Tensor, hw_img: Tensor, feat_hws: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Cell extents of (B, 4) boxes on every level: lo (L, B, 2) = (hmin, wmin), hi (L, B, 2) = (hmax, wmax), both
    unclipped int64, and value (L, B) float32 = 1 / area in cells of the unclipped extent (official).

    hw_img: (B, 2) (h, w) each box is scaled by. Divide first, then multiply, as the official code does, so that
    boxes on exact cell boundaries round the same way as :func:`fgd_masks_loop`.
    """
    ratio = boxes.float() / hw_img.flip(1).repeat(1, 2)  # x / w_img, y / h_img
    scale = torch.tensor([[w, h, w, h] for h, w in feat_hws], dtype=torch.float32, device=boxes.device)
    scaled = ratio[None] * scale[:, None]  # (L, B, 4)
    lo = torch.floor(scaled[..., [1, 0]]).long()
    hi = torch.ceil(scaled[..., [3, 2]]).long()
    value = 1.0 / (hi[..., 0] + 1 - lo[..., 0]) / (hi[..., 1] + 1 - lo[..., 1])
    return lo, hi, value


def _slots(img: Tensor, value: Tensor, counts: list[int], planes: int) -> tuple[Tensor, Tensor]:
    """(L, B) plane index ``image * planes + plane`` and (L, B) bit rank of each box, largest value = rank 0.

    img (B,) is sorted (boxes are concatenated image by image); value ties keep the input order (stable sorts).
    """
    order = torch.argsort(value, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(img[order], dim=1, stable=True))  # by image, then by value descending
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1], device=img.device).expand_as(order))
    first = torch.tensor(list(itertools.accumulate([0] + counts[:-1])), device=img.device)
    within = position - first[img]  # rank of each box inside its image
    return img * planes + within // _BITS, within % _BITS


def _bit_planes(lo: Tensor, hi: Tensor, size: int, slot: Tensor, rank: Tensor, num_slots: int) -> Tensor:
    """(num_slots, L * size) int64: in plane ``slot[l, b]``, bit ``rank[l, b]`` is set on the positions
    ``lo[l, b]..hi[l, b]`` (clipped to 0..size-1) of level l's block, i.e. positions ``l * size + p``.
    lo, hi, slot, rank: (L, B). ``size`` is at least the largest level's size; positions past a level's own size
    are never read.

    Built as a difference array: +bit at lo, -bit after hi, then a cumulative sum along the positions. Within a
    plane every box owns its bit, so the sums are exact bitwise ORs.
    """
    num_levels = lo.shape[0]
    level = torch.arange(num_levels, device=lo.device)[:, None]
    row = (slot * num_levels + level).flatten()
    bit = (1 << rank).flatten()
    diff = torch.zeros(num_slots * num_levels, size + 1, dtype=torch.long, device=lo.device)
    diff.index_put_((row, lo.flatten().clamp(0, size)), bit, accumulate=True)
    end = torch.maximum(hi + 1, lo)  # an inverted box (x2 < x1) paints nothing, as the official empty slice
    diff.index_put_((row, end.flatten().clamp(0, size)), -bit, accumulate=True)
    return diff.cumsum(dim=1)[:, :size].reshape(num_slots, num_levels * size)


def _background(fg: Tensor, cell_level: Tensor, num_levels: int) -> Tensor:
    """(N, cells) bg = 1 - [fg > 0], divided per image and level by its sum when that sum is positive."""
    bg = (fg <= 0).float()
    totals = torch.zeros(fg.shape[0], num_levels, device=fg.device).index_add_(1, cell_level, bg)
    return bg / totals.clamp(min=1).index_select(1, cell_level)  # where the sum is 0, bg is 0 everywhere anyway


def _scaled_extents(
    boxes: Tensor, h_img: Tensor | int, w_img: Tensor | int, feat_hw: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unclipped integer cell extents (hmin, hmax, wmin, wmax) of (B, 4) boxes and their (B,) float32 mask values.

    ``h_img`` / ``w_img`` are the sizes to scale by, scalars or (B,) tensors. The order of operations (divide by the
    image size, then multiply by the map size) follows the official code so that boxes on exact cell boundaries
    round the same way.
    """
    h_map, w_map = feat_hw
    b = boxes.float()
    wmin = torch.floor(b[:, 0] / w_img * w_map).long()
    hmin = torch.floor(b[:, 1] / h_img * h_map).long()
    wmax = torch.ceil(b[:, 2] / w_img * w_map).long()
    hmax = torch.ceil(b[:, 3] / h_img * h_map).long()
    value = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)  # area from the unclipped extent (official)
    return hmin, hmax, wmin, wmax, value
