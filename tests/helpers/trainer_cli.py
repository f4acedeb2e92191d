"""The trainer in a new process, and the tensors of a saved state."""
import os
import subprocess
import sys

import torch

from tests.helpers import REPO


def tensors(obj, prefix=""):
    """Every tensor in a nested state, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def run_cli(args, env_extra=None):
    """The trainer in a new process, single-threaded like this one (same float sums)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "trainers.lokr", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
