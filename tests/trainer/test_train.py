"""The training step's pieces against hand-computed values, and a short tiny-model training."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.sdxl.model import base_model_hash, save_sdxl, tiny_sdxl, training_scheduler
from trainers.lokr.train import diffusion_loss, lr_factor, min_snr_weights, sample_draws, train


def test_min_snr_weights_by_hand():
    # Scaled-linear schedule: beta_i = (sqrt(0.00085) + i/999 * (sqrt(0.012) - sqrt(0.00085)))^2,
    # alpha_bar_t = prod_{i<=t} (1 - beta_i); SNR = alpha_bar / (1 - alpha_bar); w = min(SNR, 5) / SNR.
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    alpha_bar, expected = 1.0, {}
    for i in range(1000):
        alpha_bar *= 1 - (lo + i / 999 * (hi - lo)) ** 2
        snr = alpha_bar / (1 - alpha_bar)
        expected[i] = min(snr, 5.0) / snr
    # t = 0: alpha_bar = 0.99915, SNR = 0.99915 / 0.00085 = 1175.47, w = 5 / 1175.47 = 0.0042536
    assert expected[0] == pytest.approx(0.0042536, rel=1e-4)
    t = torch.tensor([0, 100, 300, 999])
    w = min_snr_weights(training_scheduler().alphas_cumprod, t, 5.0)
    # the scheduler keeps alpha_bar in float32: 1 - alpha_bar near t = 0 is good to ~1e-4 relative
    assert w.tolist() == pytest.approx([expected[i] for i in t.tolist()], rel=1e-4)
    assert w[-1] == 1.0  # SNR at t = 999 is far below 5: no down-weighting
    assert min_snr_weights(training_scheduler().alphas_cumprod, t, 0.0).tolist() == [1.0] * 4


def test_noise_offset_and_per_sample_draws():
    ids = torch.tensor([11, 42, 7])
    plain = sample_draws(3, 5, ids, (4, 6, 5), 1000, 0.0)
    offset = sample_draws(3, 5, ids, (4, 6, 5), 1000, 0.0357)
    # noise += 0.0357 * randn(B, C, 1, 1): the difference is one number per (sample, channel),
    # the same at every pixel, and of the size of 0.0357 * a standard normal.
    diff = offset.noise - plain.noise
    per_channel = diff[:, :, :1, :1]
    assert torch.allclose(diff, per_channel.expand_as(diff), atol=1e-6)  # (n + c) - n: float rounding only
    assert 0 < per_channel.abs().max() < 0.0357 * 5
    assert len(set(per_channel.flatten().tolist())) == 12  # differs per sample and channel
    assert torch.equal(plain.timesteps, offset.timesteps) and torch.equal(plain.latent_eps, offset.latent_eps)
    # A sample's draws depend on (seed, micro-step, post id) only: not on its batch neighbours.
    alone = sample_draws(3, 5, torch.tensor([42]), (4, 6, 5), 1000, 0.0357)
    assert torch.equal(alone.noise[0], offset.noise[1]) and alone.timesteps[0] == offset.timesteps[1]
    later = sample_draws(3, 6, ids, (4, 6, 5), 1000, 0.0357)
    assert not torch.equal(later.noise, offset.noise)
    assert ((0 <= offset.timesteps) & (offset.timesteps < 1000)).all()


def test_lr_warmup_then_constant():
    # warmup 4: (step + 1) / 4 for steps 0..3, then 1
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0


def test_weighted_mse():
    pred = torch.zeros(2, 4, 2, 2)
    noise = torch.cat([torch.ones(1, 4, 2, 2), 2 * torch.ones(1, 4, 2, 2)])
    # per-sample MSE: 1 and 4; weights 1 and 0.5 -> (1 * 1 + 4 * 0.5) / 2 = 1.5
    assert diffusion_loss(pred, noise, torch.tensor([1.0, 0.5])).item() == 1.5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("train_shards"), n=48).dir


@pytest.mark.slow
def test_tiny_loss_falls_and_files_are_written(shards, tmp_path, capsys):
    cfg = load_config("tiny", ["train.max_steps=20", "train.checkpoint_every=8"])
    summary = train(cfg, shards, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    losses = [x["loss"] for x in lines]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.85 * first, (first, last)
    assert summary["step"] == 20 and summary["skipped"] == 0
    assert "trained 20 steps (80 images)" in capsys.readouterr().err
    # warmup 2 steps: lr 0.5e-3 then 1e-3
    assert [x["lr_unet"] for x in lines[:3]] == [0.0005, 0.001, 0.001]
    # LoKr checkpoints at steps 8 and 16, the final file, states every 10 steps
    assert sorted(p.name for p in tmp_path.glob("lokr*.safetensors")) == [
        "lokr-00000008.safetensors", "lokr-00000016.safetensors", "lokr.safetensors"]
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["state-00000010.state", "state-00000020.state"]
    weights = load_file(tmp_path / "lokr.safetensors")
    w2 = [v for k, v in weights.items() if k.endswith("lokr_w2")]
    assert w2 and any(v.abs().max() > 0 for v in w2)  # w2 starts at zero: it has trained
    assert any(k.startswith("lora_te1_") for k in weights) and any(k.startswith("lora_te2_") for k in weights)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_abort(shards, tmp_path):
    # An absurd learning rate blows the weights up after the first update: every later loss is
    # non-finite, each such step is skipped and counted, and the third in a row stops the run.
    cfg = load_config("tiny", ["train.max_steps=10", "optimizer.lr_unet=1e30", "optimizer.lr_text=1e30",
                               "train.max_nonfinite_in_row=3"])
    with pytest.raises(HakubooruError, match="loss was not finite for 3 steps in a row"):
        train(cfg, shards, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["skipped"], x["loss"] is None) for x in lines] == [
        (1, 0, False), (2, 1, True), (3, 2, True)]


@pytest.mark.slow
def test_trains_a_diffusers_folder_and_records_the_base_model(shards, tmp_path):
    base = tmp_path / "base"
    save_sdxl(tiny_sdxl(seed=0), base)
    out = tmp_path / "run"
    train(load_config("tiny", [f"model.pretrained={base}", "train.max_steps=2"]), shards, out)
    with safe_open(out / "lokr.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "2" and meta["base_model"] == str(base)
    assert meta["base_model_sha256"] == base_model_hash(base) and len(meta["base_model_sha256"]) == 64
    assert json.loads(meta["config"])["train"]["max_steps"] == 2


@pytest.mark.slow
def test_grad_accum_step_gradient_is_the_mean_of_the_micro_batch_gradients(shards, tmp_path, monkeypatch):
    # grad_accum = 2, no clipping, fp32: the gradient the optimizer steps on must be
    # (g0 + g1) / 2, with g_k the gradient of micro-batch k's loss alone (each computed below)
    import trainers.lokr.train as train_mod
    from trainers.lokr.data.batches import BatchDataset
    from trainers.lokr.train import micro_batch_loss
    cfg = load_config("tiny", ["train.max_steps=1", "train.grad_accum=2", "train.max_grad_norm=0"])
    real_setup, seen = train_mod.setup, {}

    def params(run):
        return [p for g in run.optimizer.param_groups for p in g["params"]]

    def grads(run):  # a parameter no loss reaches has no gradient: count it as zeros
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params(run)]

    def spying_setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        step = run.optimizer.step

        def recording_step(*a, **k):
            seen["grads"] = grads(run)
            return step(*a, **k)
        run.optimizer.step = recording_step
        return run
    monkeypatch.setattr(train_mod, "setup", spying_setup)
    train(cfg, shards, tmp_path / "run")
    monkeypatch.undo()

    run = real_setup(cfg, shards, tmp_path / "hand")
    dc = cfg["data"]
    dataset = BatchDataset(shards, run.index, run.plan(0), seed=0, epoch=0, random_crop=dc["random_crop"],
                           shuffle_tags=dc["shuffle_tags"], tag_dropout=dc["tag_dropout"],
                           shuffle_scope=dc["shuffle_scope"])
    micro = []
    for k in range(2):
        for p in params(run):
            p.grad = None
        micro_batch_loss(run, dataset[k], micro_step=k).backward()
        micro.append(grads(run))
    expected = [(a + b) / 2 for a, b in zip(*micro)]
    assert len(seen["grads"]) == len(expected) > 0
    assert sum(float(e.abs().sum()) for e in expected) > 0
    for got, want in zip(seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_timesteps_cover_the_whole_schedule():
    # 4 timesteps, 400 samples: every value 0..3 is drawn (a draw from 1..3 or 0..2 would not be)
    draws = sample_draws(0, 0, torch.arange(400), (1, 1, 1), 4, 0.0)
    assert sorted(set(draws.timesteps.tolist())) == [0, 1, 2, 3]
    full = sample_draws(0, 0, torch.arange(20_000), (1, 1, 1), 1000, 0.0).timesteps
    assert int(full.min()) == 0 and int(full.max()) == 999


def test_weighted_mse_of_nonzero_predictions():
    # pred 1, noise 3: (1 - 3)^2 = 4 per element; weight 0.25 -> 1.0
    pred, noise = torch.ones(1, 2, 2, 2), 3 * torch.ones(1, 2, 2, 2)
    assert diffusion_loss(pred, noise, torch.tensor([0.25])).item() == 1.0


def test_draws_follow_the_documented_order():
    # per sample, one generator seeded hash64(seed, micro_step, id) draws in this order:
    # timestep, latent noise (C,H,W), offset (C,1,1), noise (C,H,W); noise += offset * noise_offset
    from hakubooru.rng import hash64
    got = sample_draws(5, 2, torch.tensor([9]), (3, 2, 2), 1000, 0.5)
    g = torch.Generator().manual_seed(hash64(5, 2, 9))
    t = torch.randint(0, 1000, (1,), generator=g)
    latent = torch.randn((3, 2, 2), generator=g)
    offset = torch.randn((3, 1, 1), generator=g)
    noise = torch.randn((3, 2, 2), generator=g)
    assert got.timesteps.tolist() == t.tolist()
    assert torch.equal(got.latent_eps[0], latent)
    assert torch.equal(got.noise[0], noise + 0.5 * offset)


def test_a_wide_bucket_trains(tmp_path):
    """Latents are (4, h/8, w/8) of the bucket: 128x32 images stay in the 128x32 bucket of the
    tiny config (area 64², sides 32-128), so a step works on 4 x 4 x 16 latents and noise."""
    shards = make_test_shards(tmp_path / "wide", n=8, sizes=[(128, 32)]).dir
    summary = train(load_config("tiny", ["train.max_steps=1"]), shards, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 1 and [x["step"] for x in lines] == [1]
    assert lines[0]["loss"] is not None and math.isfinite(lines[0]["loss"])
