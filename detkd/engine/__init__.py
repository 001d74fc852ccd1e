"""Training engine: the loop, checkpoints, optimizer/schedule, logging and DDP helpers."""

from detkd.engine.checkpoint import atomic_save, load_checkpoint, save_student
from detkd.engine.distributed import DistInfo, init_distributed
from detkd.engine.loop import FitResult, fit
from detkd.engine.task import TaskModel

__all__ = ["DistInfo", "FitResult", "TaskModel", "atomic_save", "fit", "init_distributed", "load_checkpoint",
           "save_student"]
