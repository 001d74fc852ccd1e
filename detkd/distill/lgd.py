"""LGD's label-guided teacher (Zhang et al., AAAI'22, arXiv 2109.11496; docs/methods.md §5.1).

There is no pretrained teacher: an "instructive" FPN pyramid is built from the labels and the *current* student
features, and learns only through the student's own detection head (the LGDLoss ``tea/*`` terms):

    label descriptors -> LabelEncoder (PointNet) -> label_proj       = label embeddings      (T, C)
    student level l -> appearance_proj -> mask_pool over inside-masks = appearance embeddings (T, C) per level
    MultiheadAttention(query = appearance, key = value = label embeddings, cross-image pairs blocked)
    -> KnowledgeMapper -> instructive level l (B, C, H_l, W_l)

As in the reference, one set of modules is shared by all levels (one projection, one attention, one mapper).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detkd.distill.lgd_modules import (
    KnowledgeMapper,
    LabelEncoder,
    cross_image_mask,
    encode_descriptors,
    label_boxes,
    mask_pool,
)
from detkd.regions.inside import inside_masks


class LGDTeacher(nn.Module):
    """Label encoder + inter-object relation adapter + intra-object knowledge mapper.

    Args:
        channels: FPN width C (every level must have it).
        num_classes: K real classes (labels 1..K).
        add_context: append the whole-image context box per image (official ADD_CONTEXT_BOX).
        detach_appearance: pool appearance from detached student features (official DETACH_APPEARANCE_EMBED).
        num_heads: attention heads; must divide ``channels``.
        relation: which label embeddings a box's appearance query may attend to. ``"image"`` (official
            'stuGuided'): every box of its image (and the context row). ``"self"``: only its own, so each box renders
            its own label embedding (an ablation, not the reference: it shows what a branch whose attention never
            mixes objects gives; ``benchmarks/lgd_relations.py`` measures how much the official one mixes).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        *,
        add_context: bool = True,
        detach_appearance: bool = False,
        num_heads: int = 8,
        relation: str = "image",
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"LGDTeacher: num_heads={num_heads} must divide the FPN channels ({channels})")
        if relation not in ("image", "self"):
            raise ValueError(f"LGDTeacher: relation must be 'image' or 'self', got {relation!r}")
        self.relation = relation
        self.channels = channels
        self.num_classes = num_classes
        self.add_context = add_context
        self.detach_appearance = detach_appearance
        self.label_encoder = LabelEncoder(4 + num_classes, out=channels)
        # canoni_proj_1D / student_proj_2D in the reference
        self.label_proj = nn.Sequential(
            nn.Linear(channels, channels), nn.LayerNorm(channels, elementwise_affine=False), nn.ReLU()
        )
        self.appearance_proj = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False), nn.ReLU()
        )
        self.attention = nn.MultiheadAttention(channels, num_heads)
        self.mapper = KnowledgeMapper(channels, add_context=add_context)

    def forward(
        self, features: dict[str, Tensor], targets: list[dict[str, Tensor]], batch_shape: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Student pyramid {level: (B, C, H_l, W_l)} + targets in input coordinates -> instructive pyramid.

        The output has exactly the keys and shapes of ``features``. ``batch_shape`` is the padded batch (h, w).
        """
        rows = self._rows(features, targets, batch_shape)
        out = {}
        for name, feat in features.items():
            masks, related, _ = self._relate(feat, rows, batch_shape, need_weights=False)
            out[name] = self.mapper(related, masks, rows["image_index"], rows["bias_row"], len(targets))
        return out

    def relations(
        self, features: dict[str, Tensor], targets: list[dict[str, Tensor]], batch_shape: tuple[int, int]
    ) -> dict[str, Tensor]:
        """What the relation adapter did, for diagnosis (no effect on training).

        Returns ``labels`` (T,) (0: context or dummy row), ``image_index`` (T,), ``is_context`` (T,), the label
        embeddings ``labels_emb`` (T, C) (the attention's keys and values before its projections), and per level
        ``weights/<level>``: the (T, T) attention weights averaged over heads (row i: how box i's appearance query
        spreads over the label embeddings of the boxes of its image; each row sums to 1, cross-image entries are 0)
        and ``points/<level>``: (T,) grid points inside each box's mask.
        """
        rows = self._rows(features, targets, batch_shape)
        out = {k: rows[k] for k in ("labels", "image_index", "is_context", "labels_emb")}
        for name, feat in features.items():
            masks, _, weights = self._relate(feat, rows, batch_shape, need_weights=True)
            out[f"weights/{name}"] = weights
            out[f"points/{name}"] = masks.flatten(1).sum(1)
        return out

    def _rows(
        self, features: dict[str, Tensor], targets: list[dict[str, Tensor]], batch_shape: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Per-box rows of the batch shared by every level: boxes, labels, label embeddings, masks of the attention."""
        num_images = len(targets)
        for name, f in features.items():
            if f.dim() != 4 or f.shape[0] != num_images or f.shape[1] != self.channels:
                raise ValueError(
                    f"LGDTeacher: level {name!r} has shape {tuple(f.shape)}, expected ({num_images}, {self.channels},"
                    " H, W) (batch size from targets, channels from the config)"
                )
        boxes, labels, image_index, is_context = label_boxes(
            targets, batch_shape, self.num_classes, add_context=self.add_context
        )
        desc = encode_descriptors(boxes, labels, batch_shape, self.num_classes)
        return {
            "boxes": boxes,
            "labels": labels,
            "image_index": image_index,
            "is_context": is_context,
            "labels_emb": self.label_proj(self.label_encoder(desc, image_index, num_images)),
            "blocked": self._blocked(image_index),
            "bias_row": self._bias_rows(targets, image_index, is_context),
        }

    def _blocked(self, image_index: Tensor) -> Tensor:
        """(T, T) True where the attention may not look: other images' rows (``"self"``: every row but its own)."""
        if self.relation == "self":
            return ~torch.eye(len(image_index), dtype=torch.bool, device=image_index.device)
        return cross_image_mask(image_index)

    def _relate(
        self, feat: Tensor, rows: dict[str, Tensor], batch_shape: tuple[int, int], *, need_weights: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One level: inside-masks, and the relation adapter's output (and its head-averaged weights if asked)."""
        if self.detach_appearance:
            feat = feat.detach()
        masks = inside_masks(rows["boxes"], batch_shape, (feat.shape[-2], feat.shape[-1]))
        appearance = mask_pool(self.appearance_proj(feat), masks, rows["image_index"])
        # unbatched MHA: (T, C) query over (T, C) keys; every row sees at least itself, so no row is all-blocked
        related, weights = self.attention(
            appearance, rows["labels_emb"], rows["labels_emb"], attn_mask=rows["blocked"], need_weights=need_weights
        )
        return masks, related, weights

    def _bias_rows(self, targets: list[dict[str, Tensor]], image_index: Tensor, is_context: Tensor) -> Tensor:
        """Rows whose mapper output is a per-image bias instead of being painted.

        With a context box that is the last row of every image. The reference takes "the last row" literally, so for
        an image without boxes its dummy row plays that role (nothing is painted, the dummy gives the bias); we keep
        that, which also gives every image exactly one bias row.
        """
        if not self.add_context:
            return is_context
        empty = image_index.new_tensor([len(t["boxes"]) == 0 for t in targets], dtype=bool)
        return is_context | empty[image_index]
