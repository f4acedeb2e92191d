"""VAE encoding in sub-batches (data.vae_batch_size): the latents of the whole micro-batch,
encoded at once with the VAE directly, are what every sub-batch size gives."""
from __future__ import annotations

import pytest
import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.config import load_config
from trainers.lokr.data.vae_encode import encode_latents
from trainers.lokr.sdxl.model import tiny_sdxl


def test_default_is_one_image_at_a_time_and_zero_is_refused():
    assert load_config("epsilon")["data"]["vae_batch_size"] == 1
    with pytest.raises(HakubooruError, match="'data.vae_batch_size' must be ≥ 1"):
        load_config("epsilon", ["data.vae_batch_size=0"])


@pytest.mark.parametrize("vae_batch_size", [1, 2, 3, 5, 8])
def test_sub_batches_give_the_full_batch_latents(vae_batch_size):
    vae = tiny_sdxl().vae.eval()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((5, 3, 64, 96), generator=g) * 2 - 1
    eps = torch.randn((5, 4, 8, 12), generator=g)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        expected = (dist.mean + dist.std * eps) * 0.13025  # the tiny VAE's scaling factor
    got = encode_latents(vae, pixels, eps, vae_batch_size)
    assert got.shape == (5, 4, 8, 12)
    # The same arithmetic per image; CPU convolutions may round differently by batch size
    # (seen: 1.8e-7), so the tolerance is a few fp32 ulps of values of order 1.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # ...and each image's latent really is its own: a wrong eps slice would be off by O(0.1)
    assert not torch.allclose(got[1:], expected[:-1], atol=1e-2)
