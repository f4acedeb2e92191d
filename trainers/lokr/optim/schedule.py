"""The learning-rate multiplier of every optimizer step: linear warmup (the recipe's), then
``optimizer.schedule``: constant (the recipe), cosine, linear, or cosine with hard restarts.

After the warmup the decays are diffusers' (``diffusers.optimization``): with
``progress = (step − warmup) / (total − warmup)`` in [0, 1), cosine is ½(1 + cos(π·progress)),
linear is 1 − progress, cosine with restarts is ½(1 + cos(π·((cycles·progress) mod 1))). A
multiplier is a function of the step alone, so a resumed run gets the same one.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts")
# ss_lr_scheduler: sd-scripts' / diffusers' names
SS_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear",
            "cosine_with_restarts": "cosine_with_restarts"}


def lr_factor(step: int, warmup_steps: int, schedule: str = "constant", total_steps: int = 0,
              cycles: int = 1) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): ``(step + 1) / warmup`` during
    the warmup, then the schedule's decay over the remaining ``total_steps − warmup`` steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if progress >= 1:
        return 0.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    if schedule == "cosine_with_restarts":
        return 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")
