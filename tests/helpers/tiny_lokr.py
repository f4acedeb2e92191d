"""A tiny SDXL with a LoKr whose weights are non-zero (as after training), and the model outputs
that tests compare across loaders, merges and files."""
from __future__ import annotations

import torch

from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.network.lokr import create_lokr
from trainers.lokr.sdxl.text import encode_prompts

FACTORS = {"Attention": 4, "FeedForward": 4, "ResnetBlock2D": 8, "CLIPAttention": 2, "CLIPMLP": 4}
CAPTIONS = ["1girl, solo, long hair, smile", "no humans, scenery, sky"]


def outputs(sdxl):
    """(UNet prediction, context, pooled) from the model's own text conditioning: exercises all three LoKrs."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        context, pooled = encode_prompts(sdxl, CAPTIONS)
        pred = sdxl.unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 900]),
                         encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled,
                                            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}).sample
    return pred, context, pooled


def trained_lokr(seed: int = 1):
    """(tiny SDXL with the LoKr hooked in, the network, its outputs); the LoKr changes the
    prediction by more than 0.1 (checked), so comparisons against it cannot pass trivially."""
    sdxl = tiny_sdxl(seed=0)
    base = outputs(sdxl)[0]
    network = create_lokr(sdxl, {"full_matrix": True, "factors": FACTORS})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    expected = outputs(sdxl)
    assert (expected[0] - base).abs().max() > 0.1
    return sdxl, network, expected
