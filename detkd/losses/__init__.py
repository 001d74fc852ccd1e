"""Distillation losses: one file per method, one line per method in ``LOSSES``."""

from detkd.losses.base import DistillLoss
from detkd.losses.chen import ChenDenseLoss, ChenLoss
from detkd.losses.cwd import CWDLoss
from detkd.losses.fgd import FGDLoss
from detkd.losses.hint import HintLoss
from detkd.losses.ld import VLRLD, MainKD, MainLD
from detkd.losses.lgd import LGDLoss

LOSSES: dict[str, type[DistillLoss]] = {
    cls.name: cls for cls in (CWDLoss, FGDLoss, HintLoss, MainLD, MainKD, VLRLD, ChenLoss, ChenDenseLoss, LGDLoss)
}

__all__ = ["LOSSES", "DistillLoss"]
