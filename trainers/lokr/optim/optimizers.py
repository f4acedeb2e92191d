"""``optimizer.name``: the recipe's Lion8bit, AdamW (torch), AdamW8bit (bitsandbytes), Prodigy
(``prodigyopt``, when installed). Each takes the LoKr's parameter groups (their own learning
rates) and ``optimizer.betas`` / ``optimizer.weight_decay``."""
from __future__ import annotations

import torch

from hakubooru.errors import HakubooruError

MIN_BITSANDBYTES = (0, 41, 1)  # 0.36.0–0.41.0 have the 8-bit dynamic-map bug
NAMES = ("Lion8bit", "AdamW", "AdamW8bit", "Prodigy")


def check_bitsandbytes(name: str = "Lion8bit"):
    """Import bitsandbytes, refusing the versions whose 8-bit optimizers are broken."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise HakubooruError(f"{name} needs bitsandbytes ≥ 0.41.1: pip install 'bitsandbytes>=0.41.1'") from None
    version = tuple(int(p) for p in bnb.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        raise HakubooruError(f"bitsandbytes {bnb.__version__} has the 8-bit dynamic-map bug "
                             "(0.36.0–0.41.0): install bitsandbytes ≥ 0.41.1")
    return bnb


def prodigy_class():
    """prodigyopt's Prodigy, or one line saying how to install it."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise HakubooruError("optimizer.name = \"Prodigy\" needs prodigyopt: pip install prodigyopt "
                             "(or pip install 'hakubooru[prodigy]')") from None
    return Prodigy


def make_optimizer(groups: list[dict], oc: dict) -> torch.optim.Optimizer:
    """The optimizer ``oc["name"]`` over ``groups`` (each with its own "lr")."""
    name, betas, wd = oc["name"], tuple(oc["betas"]), oc["weight_decay"]
    if name == "Lion8bit":
        return check_bitsandbytes(name).optim.Lion8bit(groups, lr=oc["lr_unet"], betas=betas, weight_decay=wd)
    if name == "AdamW8bit":
        return check_bitsandbytes(name).optim.AdamW8bit(groups, lr=oc["lr_unet"], betas=betas, weight_decay=wd)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=oc["lr_unet"], betas=betas, weight_decay=wd)
    if name == "Prodigy":
        return prodigy_class()(groups, lr=oc["lr_unet"], betas=betas, weight_decay=wd)
    raise HakubooruError(f"optimizer.name must be one of {', '.join(NAMES)} (got {name!r})")
