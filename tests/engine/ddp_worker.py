"""One rank of the 2-process gloo job of test_distributed.py, configured through torchrun's env variables.

test_distributed.py forks the ranks (:func:`run_rank`: no second torch import); by hand:
``torchrun --nproc-per-node 2 tests/engine/ddp_worker.py OUT_DIR``. Writes OUT_DIR/rank{r}.json (steps, per-step
losses, image ids seen per step) and OUT_DIR/params{r}.pt; rank r's run folder is OUT_DIR/run{r} (only rank 0 may
create it).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from engine_helpers import TinyTrainable, ToyDetection, make_loader  # noqa: E402

from detkd.config import TrainConfig  # noqa: E402
from detkd.engine import fit, init_distributed  # noqa: E402
from detkd.engine.distributed import cleanup  # noqa: E402


class Recording(TinyTrainable):
    def __init__(self):
        super().__init__()
        self.step, self.seen, self.losses = 0, {}, {}

    def set_step(self, step):
        self.step = step

    def forward(self, images, targets):
        out = super().forward(images, targets)
        self.seen.setdefault(self.step, []).extend(int(t["image_id"]) for t in targets)
        self.losses[self.step] = out["loss"].item()
        return out


class FreezingConnector(Recording):
    """Like LGD's warm-up: the connector is frozen for the first step (no gradient), then trains."""

    def set_step(self, step):
        super().set_step(step)
        self.connector.requires_grad_(step >= 1)

    def leaves_parameters_unused(self) -> bool:
        return True


def main(out_dir: Path, mode: str = "plain") -> None:
    info = init_distributed("cpu")
    torch.manual_seed(100 + info.rank)  # different initial weights: DDP must broadcast rank 0's
    trainable = {"plain": Recording, "freeze": FreezingConnector}[mode]()
    data = ToyDetection(8)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, seed=0)
    loader = make_loader(data, batch_size=2, sampler=sampler)
    cfg = TrainConfig(epochs=2, lr=0.05, warmup_steps=0, log_every=1, eval_every=1, progress=False, device="cpu")
    res = fit(trainable, loader, cfg, out_dir / f"run{info.rank}", evaluate=lambda student: {"AP": 0.25})
    params = torch.cat([p.detach().flatten() for p in trainable.parameters()])
    torch.save(params, out_dir / f"params{info.rank}.pt")
    record = {"rank": info.rank, "world_size": info.world_size, "steps": res.steps, "epochs": res.epochs,
              "best": res.best_metric, "last_metrics": res.last_metrics, "seen": trainable.seen,
              "losses": trainable.losses}
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(record))
    cleanup()


def run_rank(rank: int, world_size: int, port: int, out_dir: Path, mode: str = "plain") -> None:
    """Entry point of a forked rank: torchrun's variables, one thread, errors written to OUT_DIR/error{rank}.txt."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    try:
        main(out_dir, mode)
    except BaseException:
        (out_dir / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
