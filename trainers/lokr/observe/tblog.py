"""TensorBoard logging (``train.log_with = "tensorboard"``): the scalars of each metrics.jsonl
line also go to event files in ``RUN/tensorboard/``. Needs the ``tensorboard`` package.
``train.log_with = "wandb"``: the same scalars to a Weights & Biases run (the ``wandb`` extra) in
``RUN/wandb/``, one run per output folder (resumed runs continue it); ``WANDB_MODE=offline``
keeps it on disk, ``WANDB_PROJECT`` names the project (default ``hakubooru-lokr``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hakubooru.errors import HakubooruError

SCALARS = ("loss", "lr_unet", "lr_text", "grad_norm", "images_per_s", "skipped", "val_loss")


class ScalarLog:
    """Where the metrics lines go besides metrics.jsonl: nowhere, or TensorBoard (rank 0)."""

    def __init__(self, cfg: dict, output: Path, is_main: bool, first_step: int):
        self.writer = self.wandb = None
        if cfg["train"]["log_with"] == "wandb" and is_main:
            self.wandb = _wandb_run(cfg, Path(output))
            return
        if cfg["train"]["log_with"] != "tensorboard" or not is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise HakubooruError('train.log_with = "tensorboard" needs the tensorboard package: '
                                 "pip install tensorboard") from None
        # purge_step: a resumed run drops the events a killed run logged past its last state
        self.writer = SummaryWriter(str(Path(output) / "tensorboard"), purge_step=first_step + 1)

    def write(self, line: dict) -> None:
        """Log the scalars of one metrics line at its step (non-finite ones are None: left out)."""
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": line[k] for k in SCALARS if line.get(k) is not None}, step=line["step"])
        if self.writer is None:
            return
        for key in SCALARS:
            if line.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", line[key], global_step=line["step"])

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(cfg: dict, output: Path):
    """A wandb run for ``output``: its id from the folder's absolute path, so a resume continues it."""
    try:
        import wandb
    except ImportError:
        raise HakubooruError('train.log_with = "wandb" needs the wandb package: pip install wandb '
                             "(or pip install 'hakubooru[wandb]')") from None
    output.mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "hakubooru-lokr"), dir=str(output), name=output.name,
                      id=run_id, resume="allow", config=cfg)
