"""Matplotlib figures of the arrays in :mod:`detkd.viz.maps` (object-oriented API, Agg canvas, no pyplot state).

Geometry: every panel is drawn in network-input pixels of the padded batch. A feature map of stride s with
(H, W) cells covers ``[0, W s] x [0, H s]`` (cell j spans ``[j s, (j + 1) s)``), which is where the network's cells
really are; a mask built by another rule (FGD scales boxes by the *unpadded* image size) therefore shows its own
misalignment instead of hiding it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detkd.viz.maps import CWDChannelMaps, EdgeDistributions, FGDLevelMaps, LDLevelRegions, LGDLevelMaps

GT_COLOUR = "#39ff14"  # neon green with a black outline: visible on every colour map used here
DET_COLOURS = {"student": "#00e5ff", "teacher": "#ffb000"}
PANEL = 2.7  # inches per panel side
_OUTLINE = [patheffects.withStroke(linewidth=2.4, foreground="black")]


def input_image(tensor: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised network input -> (H, W, 3) float in [0, 1] (padding shows as the mean colour)."""
    img = tensor.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.clip(img * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def wrap_title(title: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, breaking between " | " segments where possible."""
    lines: list[str] = []
    for seg in title.split(" | "):
        if lines and len(lines[-1]) + 3 + len(seg) <= width:
            lines[-1] += " | " + seg
        else:
            lines += textwrap.wrap(seg, width=width) or [""]
    return lines


def new_figure(rows: int, cols: int, title: str, *, width: float = PANEL) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols panels with ``title`` wrapped to its width (" | " are the preferred breaks)."""
    w_in = max(width * cols + 0.75, 4.5)
    lines = wrap_title(title, int(w_in / 0.085))
    h_in = PANEL * rows + 0.4 + 0.2 * len(lines)
    # fixed margins instead of constrained layout: the layout solver costs more than drawing these figures
    fig = Figure(figsize=(w_in, h_in), dpi=100)
    fig.subplots_adjust(left=0.3 / w_in, right=1 - 0.45 / w_in, bottom=0.35 / h_in,
                        top=1 - (0.35 + 0.18 * len(lines)) / h_in, wspace=0.3, hspace=0.28)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig, axes


def show_image(ax: Axes, img: np.ndarray, title: str, *, dim: float = 1.0) -> None:
    """The image in pixel coordinates (x right, y down), no ticks; ``dim`` < 1 darkens it under an overlay."""
    h, w = img.shape[:2]
    ax.imshow(img * dim, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def draw_boxes(
    ax: Axes,
    boxes: Tensor,
    *,
    colour: str = GT_COLOUR,
    tags: Sequence[str] | None = None,
) -> None:
    """Box outlines (xyxy pixels), each with an optional text tag at its top-left corner."""
    for j, (x1, y1, x2, y2) in enumerate(boxes.detach().cpu().tolist()):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.2,
                               path_effects=_OUTLINE))
        if tags is not None:
            ax.text(x1, y1, tags[j], fontsize=6, color="black", va="bottom",
                    bbox={"facecolor": colour, "pad": 1, "lw": 0})


def box_tags(labels: Tensor, class_names: Sequence[str] | None, scores: Tensor | None = None) -> list[str]:
    """"class" or "class 0.87" per box (the label number when it has no name)."""
    names = [class_names[int(lab) - 1] if class_names and 0 < int(lab) <= len(class_names) else str(int(lab))
             for lab in labels]
    return names if scores is None else [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]


def overlay(
    fig: Figure, ax: Axes, img: np.ndarray, arr: Tensor, stride: int, boxes: Tensor, title: str, *,
    hide_zero: bool = False, **imshow_kw
) -> None:
    """``arr`` (H, W) over the darkened image at its cells' true place (stride ``stride``), GT boxes, colour bar.
    ``hide_zero``: cells equal to 0 stay transparent (masks), so the image shows where a mask is off. An all-zero
    masked map is titled "(empty)" and a constant map "(= value)", both without a colour bar."""
    empty = hide_zero and not bool(arr.any())
    const = not empty and bool(arr.numel()) and float(arr.max()) == float(arr.min())
    note = " (empty)" if empty else (f" (= {float(arr.max()):.3g})" if const else "")
    show_image(ax, img, title + note, dim=0.6)
    h, w = arr.shape
    data = np.ma.masked_equal(arr.numpy(), 0.0) if hide_zero else arr.numpy()
    im = ax.imshow(data, extent=(0, w * stride, h * stride, 0), alpha=0.65, interpolation="nearest",
                   **imshow_kw)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)  # also when empty: keeps the panels aligned
    cbar.ax.tick_params(labelsize=6)
    if empty or const:
        cbar.ax.set_visible(False)
    draw_boxes(ax, boxes)
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)


# ----------------------------------------------------------------------------------------------- figures
def figure_detections(panels: list[tuple[str, np.ndarray, dict]], class_names: Sequence[str], title: str) -> Figure:
    """Side-by-side panels ``(name, image, {"boxes", "labels", ["scores"]})``: GT first, then detections."""
    fig, axes = new_figure(1, len(panels), title, width=PANEL * 1.3)
    for ax, (name, img, det) in zip(axes[0], panels):
        colour = DET_COLOURS.get(name.split()[0], GT_COLOUR)
        show_image(ax, img, f"{name} ({len(det['boxes'])} boxes)")
        draw_boxes(ax, det["boxes"], colour=colour, tags=box_tags(det["labels"], class_names, det.get("scores")))
    return fig


def figure_fgd(img: np.ndarray, maps: dict[str, FGDLevelMaps], i: int, strides: dict[str, int], boxes: Tensor,
               title: str) -> Figure:
    """Rows: fg mask, bg mask, teacher spatial attention, weighted error; one column per level."""
    rows = [("fg mask", "fg", "autumn_r"), ("bg mask", "bg", "Blues"), ("teacher spatial attn", "attention", "magma"),
            ("weighted |F_S-F_T|^2", "weighted", "viridis")]
    fig, axes = new_figure(len(rows), len(maps), title)
    for col, (level, m) in enumerate(maps.items()):
        for row, (name, key, cmap) in enumerate(rows):
            arr = getattr(m, key)[i]
            kw = {"hide_zero": True, "vmin": 0.0} if key in ("fg", "bg") else {}
            overlay(fig, axes[row, col], img, arr, strides[level], boxes, f"{level} {name}", cmap=cmap, **kw)
    return fig


def _scatter_level(
    fig: Figure, ax: Axes, centres: Tensor, values: Tensor, label: str, cmap: str, *, colorbar: bool = True,
    categories: int | None = None,
) -> None:
    """Location centres: small grey dots where ``values`` is 0, coloured dots elsewhere, and a colour bar (hidden
    when unwanted or nothing is coloured, so that every panel keeps the same size). ``categories``: values are the
    integers 1..categories, one discrete colour each."""
    xy, v = centres.reshape(-1, 2).numpy(), values.reshape(-1).numpy()
    on = v > 0
    ax.scatter(xy[~on, 0], xy[~on, 1], s=3, c="#bbbbbb", linewidths=0)
    if categories:
        cmap, vmin, vmax = colormaps[cmap].resampled(categories), 0.5, categories + 0.5
    else:
        vmin, vmax = 0.0, float(v.max()) if on.any() else 1.0
    sc = ax.scatter(xy[on, 0], xy[on, 1], s=22, c=v[on], cmap=cmap, edgecolors="black", linewidths=0.4,
                    vmin=vmin, vmax=vmax)
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label, fontsize=6)
    cb.ax.tick_params(labelsize=6)
    if categories:
        cb.set_ticks(range(1, categories + 1))
    if not colorbar or not on.any():
        cb.ax.set_visible(False)


def figure_ld_regions(img: np.ndarray, regions: dict[str, LDLevelRegions], i: int, boxes: Tensor,
                      edges: EdgeDistributions | None, title: str) -> Figure:
    """Row 1: Main region (positives, coloured by the number of positive anchors at the location); row 2: VLR value
    (max over the location's anchors). The location of ``edges`` is starred."""
    fig, axes = new_figure(2, len(regions), title)
    for col, (level, r) in enumerate(regions.items()):
        centres = r.centres[:, :, 0]  # the A anchors of a location share its centre
        many = r.positives.shape[-1] > 1  # with one anchor per location the count is 0/1: no colour bar needed
        panels = [(r.positives[i].sum(-1).float(), "positive anchors", "autumn_r", "Main region (positives)"),
                  (r.vlr[i].amax(-1), "VLR value (IoU)", "viridis", "VLR")]
        for row, (values, label, cmap, name) in enumerate(panels):
            ax = axes[row, col]
            show_image(ax, img, f"{level} {name}: {int((values > 0).sum())} loc.", dim=0.7)
            _scatter_level(fig, ax, centres, values, label, cmap, colorbar=row == 1 or many)
            draw_boxes(ax, boxes)
            if edges is not None and edges.level == level:
                x, y = centres[edges.cell[0], edges.cell[1]].tolist()
                ax.scatter([x], [y], marker="*", s=160, c="yellow", edgecolors="black", linewidths=0.8, zorder=5)
    return fig


def figure_ld_edges(e: EdgeDistributions, title: str) -> Figure:
    """Per edge (l, t, r, b): bars of teacher vs student at tau 1, lines of the tau-softened pair Main LD compares."""
    fig, axes = new_figure(1, 4, title, width=PANEL * 1.2)
    bins = np.arange(e.teacher.shape[1])
    for k, (ax, name) in enumerate(zip(axes[0], ("left", "top", "right", "bottom"))):
        ax.bar(bins - 0.2, e.teacher[k].numpy(), width=0.4, color=DET_COLOURS["teacher"], label="teacher (tau=1)")
        ax.bar(bins + 0.2, e.student[k].numpy(), width=0.4, color=DET_COLOURS["student"], label="student (tau=1)")
        ax.plot(bins, e.teacher_soft[k].numpy(), "o-", ms=2, color="#a05a00", label=f"teacher (tau={e.tau:g})")
        ax.plot(bins, e.student_soft[k].numpy(), "s--", ms=2, color="#006070", label=f"student (tau={e.tau:g})")
        ax.set_title(f"{name}: tau^2 KL/B = {float(e.kl[k]):.3g}", fontsize=8)
        ax.set_xlabel("distance bin (x stride)", fontsize=7)
        ax.set_xticks(bins[::2])
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("probability", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    return fig


def figure_cwd(img: np.ndarray, m: CWDChannelMaps, stride: int, boxes: Tensor, title: str) -> Figure:
    """Rows teacher / student; one column per channel, both rows on the channel's common colour scale."""
    fig, axes = new_figure(2, len(m.channels), title)
    for col, c in enumerate(m.channels):
        vmax = float(max(m.teacher[col].max(), m.student[col].max()))
        for row, (who, arr) in enumerate((("teacher", m.teacher[col]), ("student", m.student[col]))):
            extra = f" tau^2 KL={float(m.kl[col]):.3g}" if who == "student" else ""
            overlay(fig, axes[row, col], img, arr, stride, boxes, f"{m.level} c{c} {who}{extra}", cmap="inferno",
                    vmin=0.0, vmax=vmax)
    return fig


def first_box(inside: Tensor) -> Tensor:
    """(B, H, W) bool inside-masks -> (H, W) float: 1 + index of the first box containing each point, 0 where none."""
    if len(inside) == 0:
        return torch.zeros(inside.shape[1:])
    rank = torch.arange(len(inside), 0, -1, dtype=torch.float32)  # B..1: the first box weighs most
    best = (inside.float() * rank[:, None, None]).amax(0)
    return torch.where(best > 0, len(inside) + 1 - best, torch.zeros_like(best))


def figure_lgd(img: np.ndarray, maps: dict[str, LGDLevelMaps], strides: dict[str, int], boxes: Tensor,
               title: str) -> Figure:
    """Rows: inside-masks (grid point (i, j) at pixel (j w / W, i h / H), coloured by the first box containing it),
    student channel mean, instructive channel mean (when available); one column per level."""
    rows = 3 if any(m.instructive_mean is not None for m in maps.values()) else 2
    fig, axes = new_figure(rows, len(maps), title)
    h_img, w_img = img.shape[:2]
    for col, (level, m) in enumerate(maps.items()):
        h, w = m.student_mean.shape
        ys, xs = torch.meshgrid(torch.arange(h) * (h_img / h), torch.arange(w) * (w_img / w), indexing="ij")
        ax = axes[0, col]
        show_image(ax, img, f"{level} inside-masks: {int(m.inside.any(0).sum())} points", dim=0.7)
        _scatter_level(fig, ax, torch.stack([xs, ys], -1), first_box(m.inside), "box #", "tab10",
                       categories=max(len(m.inside), 1))
        draw_boxes(ax, boxes, tags=[str(j + 1) for j in range(len(boxes))])
        overlay(fig, axes[1, col], img, m.student_mean, strides[level], boxes, f"{level} student channel mean",
                cmap="coolwarm")
        if m.instructive_mean is not None:
            overlay(fig, axes[2, col], img, m.instructive_mean, strides[level], boxes,
                    f"{level} instructive channel mean", cmap="coolwarm")
    return fig
