"""Per-phase memory of one training step, measured on a GPU or estimated on the CPU.

The phases of a micro-batch, in order: VAE encoding, text encoders, UNet forward, backward,
optimizer step. `PhaseMeter` records the peak of each: on CUDA the allocator's peak
(``max_memory_allocated``, reset between phases); on the meta device a `LiveBytes` dispatch
mode counts the bytes of every tensor an operation creates while it stays alive (activations
kept for backward included) — the real architecture's shapes with no memory and no weights,
so a CPU can say what a GPU will need. On meta, `flash_attention_memory` makes attention hold
what a GPU's flash / memory-efficient kernel holds (PyTorch's meta path is the math one, which
materializes every query×key score matrix).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("VAE", "text encoders", "UNet forward", "backward", "optimizer step")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operations create, while something besides this
    counter still holds them (activations saved for backward and gradients included; views
    and in-place results share their storage); ``peak`` is the largest total since
    ``reset``. Lifetimes come from the storages' use counts, checked after every operation."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[object, int]] = {}  # StorageImpl address -> (storage, bytes)
        self.peak = 0

    @property
    def live(self) -> int:
        dead = [k for k in self.storages if torch._C._storage_Use_Count(k) <= 1]  # only our reference left
        for k in dead:
            del self.storages[k]
        return sum(n for _, n in self.storages.values())

    def reset(self):
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (storage, storage.nbytes()))
        self.peak = max(self.peak, self.live)
        return out


class _FlashAttention(torch.autograd.Function):
    """Attention's memory as flash kernels have it: forward keeps q, k, v, the output and a
    float32 log-sum-exp per query for backward; backward makes dq, dk, dv. No score matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        ctx.save_for_backward(query, key, value)
        ctx.logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        query, key, value = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextmanager
def flash_attention_memory():
    """Within: ``F.scaled_dot_product_attention`` on meta tensors holds flash-kernel memory
    (`_FlashAttention`); other devices are untouched. Masks and causality change no shape."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return original(query, key, value, *args, **kwargs)
        return _FlashAttention.apply(query, key, value)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class PhaseMeter:
    """Peak memory per phase: ``with meter.phase("VAE"): ...``; ``meter.peaks`` in bytes
    (including what was held before the phase started)."""

    def __init__(self, device: torch.device | str, held_bytes: int = 0):
        self.device = torch.device(device)
        self.peaks: dict[str, int] = {}
        self.counter = LiveBytes() if self.device.type == "meta" else None
        self.held = held_bytes  # meta: weights and optimizer state, counted by the caller

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated())
        elif self.counter is not None:  # the caller runs the whole step under ``with meter.counter``
            self.counter.reset()
            yield
            self.peaks[name] = max(self.peaks.get(name, 0), self.held + self.counter.peak)
        else:
            yield

    def table(self) -> str:
        """One line per phase: peak GiB."""
        return "\n".join(f"  {name:<16}{self.peaks[name] / 2 ** 30:8.2f} GiB" for name in PHASES if name in self.peaks)
