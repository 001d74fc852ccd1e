"""detkd: knowledge distillation for object detectors.

``detkd.models.build(...)`` builds detectors; ``detkd.distill(teacher, student, data=..., methods=[...])`` distils
one into the other and returns the run's metrics (the plain student weights are in ``result.run_dir / "last.pt"``).
"""

__version__ = "0.1.0"

from detkd import models  # noqa: E402
from detkd.api import distill, train_student  # noqa: E402  (binds detkd.distill to the function, see api.py)

__all__ = ["__version__", "distill", "models", "train_student"]
