"""Student -> teacher feature connectors, sized from FeatureSpec alone (no dummy forward pass).

Connectors train with the student (they live in the Distiller) and are saved apart from the student's weights.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from detkd.structures import FeatureSpec


class Connector(nn.Module):
    """1x1 conv from student to teacher channels, optional norm, optional resize to the teacher's map size.

    ``resize`` is off by default: feature methods require equal strides, and a silent resize would hide a wiring
    mistake. With ``resize=True`` the student map is bilinearly resized to the size passed at call time.
    """

    def __init__(self, student: FeatureSpec, teacher: FeatureSpec, *, norm: str | None = None, resize: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(student.channels, teacher.channels, kernel_size=1)
        if norm is None:
            self.norm: nn.Module = nn.Identity()
        elif norm == "bn":
            self.norm = nn.BatchNorm2d(teacher.channels)
        elif norm == "gn":
            self.norm = nn.GroupNorm(min(32, teacher.channels), teacher.channels)
        else:
            raise ValueError(f"unknown connector norm {norm!r} (use None, 'bn' or 'gn')")
        self.resize = resize
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        x = self.norm(self.conv(x))
        if self.resize and size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def make_connector(
    student: FeatureSpec, teacher: FeatureSpec, *, always: bool = False, norm: str | None = None, resize: bool = False
) -> nn.Module:
    """A Connector when channels differ (or ``always``, e.g. FitNet's adaptation layer), else Identity."""
    if always or student.channels != teacher.channels or norm is not None:
        return Connector(student, teacher, norm=norm, resize=resize)
    return nn.Identity()
