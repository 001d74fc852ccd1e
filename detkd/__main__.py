"""``python -m detkd`` (used by ``torchrun --nproc-per-node K -m detkd train CONFIG``)."""

import sys

from detkd.cli import main

sys.exit(main())
