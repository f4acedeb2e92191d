"""``[ema]``: an exponential moving average of the trained weights, ``ema ← decay·ema +
(1 − decay)·w`` every ``ema.every`` optimizer steps, kept in fp32 on the CPU (or the GPU), part
of the training state (a resumed run ends with the same average), written as
``lokr-ema.safetensors`` beside each LoKr."""
from __future__ import annotations

import contextlib

import torch


class EMA:
    """The moving average of a module's trainable parameters (by name)."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1, device="cpu"):
        self.decay, self.every, self.device = float(decay), int(every), torch.device(device)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().to(self.device, torch.float32, copy=True) for n in self.names]

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, just done) updates the average."""
        return step % self.every == 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """ema ← ema + (1 − decay)·(w − ema) (= decay·ema + (1 − decay)·w), in fp32."""
        params = dict(module.named_parameters())
        current = [params[n].detach().to(self.device, torch.float32) for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average as CPU fp32 tensors by parameter name (for the training state)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[0]}")
        self.shadow = [state[n].to(self.device, torch.float32, copy=True) for n in self.names]

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, module: torch.nn.Module):
        """The average in ``module``'s parameters for the block (to save it), then the trained
        weights back, bit for bit."""
        params = dict(module.named_parameters())
        saved = [params[n].detach().to("cpu", copy=True) for n in self.names]
        try:
            for n, t in zip(self.names, self.shadow):
                params[n].copy_(t)
            yield module
        finally:
            for n, t in zip(self.names, saved):
                params[n].copy_(t)
