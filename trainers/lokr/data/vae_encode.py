"""VAE encoding of a micro-batch in sub-batches: the fp32 VAE's activations at 1024² are the
largest transient of a step (≈2.5 GiB per image), so encoding a few images at a time bounds
the peak without changing the latents."""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, latent_eps: torch.Tensor, vae_batch_size: int) -> torch.Tensor:
    """Scaled latents ``(mean + std · latent_eps) · scaling_factor`` of ``pixels`` (B,3,H,W),
    encoded ``vae_batch_size`` images at a time (the VAE treats each image on its own, so the
    result is the full batch's)."""
    parts = []
    for start in range(0, len(pixels), vae_batch_size):
        dist = vae.encode(pixels[start:start + vae_batch_size]).latent_dist
        eps = latent_eps[start:start + vae_batch_size].to(dist.mean.device)
        parts.append(dist.mean + dist.std * eps)
    return torch.cat(parts) * vae.config.scaling_factor
