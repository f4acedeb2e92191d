"""TensorBoard logging (``train.log_with = "tensorboard"``): the scalars of each metrics.jsonl
line also go to event files in ``RUN/tensorboard/``. Needs the ``tensorboard`` package."""
from __future__ import annotations

from pathlib import Path

from hakubooru.errors import HakubooruError

SCALARS = ("loss", "lr_unet", "lr_text", "grad_norm", "images_per_s", "skipped", "val_loss")


class ScalarLog:
    """Where the metrics lines go besides metrics.jsonl: nowhere, or TensorBoard (rank 0)."""

    def __init__(self, cfg: dict, output: Path, is_main: bool, first_step: int):
        self.writer = None
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
        if self.writer is None:
            return
        for key in SCALARS:
            if line.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", line[key], global_step=line["step"])

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
