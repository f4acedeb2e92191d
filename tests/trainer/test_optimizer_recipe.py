"""The card's optimizer (recipe §3), as a training run builds it: bitsandbytes' Lion8bit from a
version without the 8-bit map bug of 0.36.0–0.41.0, betas (0.9, 0.95), weight decay 0.1,
lr 2e-5 for the UNet and 5e-6 for the text encoders (values typed from the card)."""
from __future__ import annotations

import pytest

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config

bnb = pytest.importorskip("bitsandbytes")


def test_bitsandbytes_with_the_8bit_map_bug_is_refused(monkeypatch):
    from trainers.lokr.train import check_bitsandbytes

    for broken in ("0.36.0", "0.40.2", "0.41.0"):
        monkeypatch.setattr(bnb, "__version__", broken)
        with pytest.raises(HakubooruError, match=f"bitsandbytes {broken} has the 8-bit dynamic-map bug"):
            check_bitsandbytes()
    for fixed in ("0.41.1", "0.45.5+cu121"):
        monkeypatch.setattr(bnb, "__version__", fixed)
        assert check_bitsandbytes() is bnb


def test_the_run_s_optimizer_is_the_card_s(tmp_path):
    from trainers.lokr.train import setup

    shards = make_test_shards(tmp_path / "shards", n=8).dir
    # the tiny model with the epsilon optimizer (tiny.toml raises the learning rates: undo that)
    cfg = load_config("tiny", ["optimizer.lr_unet=2e-5", "optimizer.lr_text=5e-6", "optimizer.warmup_steps=1000"])
    run = setup(cfg, shards, tmp_path / "run")
    opt = run.optimizer
    assert isinstance(opt, bnb.optim.Lion8bit)
    assert [(g["name"], g["betas"], g["weight_decay"]) for g in opt.param_groups] == \
        [("text", (0.9, 0.95), 0.1), ("unet", (0.9, 0.95), 0.1)]
    assert run.base_lrs == [5e-6, 2e-5]
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])


@pytest.mark.slow
def test_vae_stays_fp32_under_mixed_precision(tmp_path):
    """The card trains in FP16 mixed precision; SDXL's VAE overflows in fp16, so the run keeps it
    in fp32 while the UNet and text encoders take the reduced type (bf16 here: fp16 needs CUDA,
    and on the CPU it is one line saying so)."""
    import torch

    from trainers.lokr.train import setup

    shards = make_test_shards(tmp_path / "shards", n=8).dir
    run = setup(load_config("tiny", ["train.mixed_precision=bf16"]), shards, tmp_path / "run")
    assert run.sdxl.vae.dtype == torch.float32
    assert run.sdxl.unet.dtype == run.sdxl.text_encoder_1.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(HakubooruError, match='train.mixed_precision = "fp16" needs a CUDA GPU'):
            setup(load_config("tiny", ["train.mixed_precision=fp16"]), shards, tmp_path / "run16")
