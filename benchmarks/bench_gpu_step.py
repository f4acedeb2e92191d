"""One training step of the epsilon recipe on the real SDXL architecture (random weights):
seconds per micro-batch and peak GPU memory at batch 4, 1024², fp16 autocast, gradient
checkpointing, LoKr (epsilon factors) in fp32, Lion8bit. Target: peak ≤ 22 GiB (a 24 GB card).

    python benchmarks/bench_gpu_step.py                       # CUDA, real SDXL architecture
    python benchmarks/bench_gpu_step.py --device cpu --tiny   # smoke run of the same code
    python benchmarks/bench_gpu_step.py --latent-cache        # also: the step fed by a latent cache

The baseline in the same run is the same step with gradient checkpointing off (what the
checkpointing buys in memory, and costs in time). The original epsilon run, for reference:
about 49–50 s per 256-image optimizer step on 4× RTX 3090, i.e. ~3.1 s per 4-image
micro-batch per GPU (recipe §3).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.models import sdxl_base_architecture, tiny_sdxl, tiny_tokenizers  # noqa: E402
from trainers.lokr.network import create_lokr, lokr_param_groups  # noqa: E402
from trainers.lokr.latent_cache import cached_latents  # noqa: E402
from trainers.lokr.text import encode_prompts  # noqa: E402
from trainers.lokr.train import check_bitsandbytes, diffusion_loss, min_snr_weights, sample_draws  # noqa: E402

CAPTION = ", ".join(["1girl", "solo", "long hair", "looking at viewer", "smile", "blue eyes"] * 12)


def build(cfg: dict, device: str, tiny: bool, checkpointing: bool):
    """The model (frozen, fp16 on CUDA), its LoKr (fp32) and the Lion8bit optimizer."""
    base_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if tiny:
        sdxl = tiny_sdxl(seed=0).to(device=device)
        sdxl.unet.to(dtype=base_dtype)
    else:
        sdxl = sdxl_base_architecture(device, base_dtype)
        # The real tokenizers' vocabulary is not shipped; the tiny byte-level ones give valid
        # ids, and with a fixed number of windows the text encoders' cost is the same.
        sdxl.tokenizer_1, sdxl.tokenizer_2 = tiny_tokenizers()
    for model in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1, sdxl.text_encoder_2):
        model.requires_grad_(False)
    if checkpointing:
        sdxl.unet.enable_gradient_checkpointing()
        for te in (sdxl.text_encoder_1, sdxl.text_encoder_2):  # as train.py does
            te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for model in (sdxl.unet, sdxl.text_encoder_1, sdxl.text_encoder_2):
            model.train()
    with torch.device(device):
        network = create_lokr(sdxl, cfg["lokr"])
    network.to(device=device, dtype=torch.float32)
    oc = cfg["optimizer"]
    optimizer = check_bitsandbytes().optim.Lion8bit(
        lokr_param_groups(network, oc["lr_unet"], oc["lr_text"], oc["weight_decay"]), betas=tuple(oc["betas"]))
    return sdxl, network, optimizer


def step(sdxl, optimizer, scaler, cfg, batch: int, size: int, device: str, i: int, cached: bool = False) -> None:
    """One micro-batch and one optimizer step, as train.py does it (fp32 VAE, autocast); with
    ``cached`` the latents come from a mean and std as a latent cache gives them (no VAE)."""
    tc = cfg["train"]
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    draws = sample_draws(tc["seed"], i, torch.arange(batch), (4, size // 8, size // 8),
                         sdxl.noise_scheduler.config.num_train_timesteps, tc["noise_offset"])
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    if cached:
        mean, std = torch.randn_like(draws.noise, device=device), torch.full_like(draws.noise, 0.01, device=device)
        latents = cached_latents({"latent_mean": mean, "latent_std": std}, draws.latent_eps,
                                 sdxl.vae.config.scaling_factor, device)
    else:
        with torch.no_grad():
            latents = sdxl.vae.encode(pixels).latent_dist.sample() * sdxl.vae.config.scaling_factor
    noisy = sdxl.noise_scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)
    amp = dict(device_type="cuda" if device.startswith("cuda") else "cpu",
               dtype=torch.float16, enabled=device.startswith("cuda"))
    with torch.autocast(**amp):
        context, pooled = encode_prompts(sdxl, [CAPTION] * batch, max_windows=cfg["data"]["max_windows"])
        pred = sdxl.unet(noisy, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    alphas = sdxl.noise_scheduler.alphas_cumprod.to(device)
    loss = diffusion_loss(pred, noise, min_snr_weights(alphas, timesteps, tc["min_snr_gamma"]))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], tc["max_grad_norm"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def measure(cfg, device: str, tiny: bool, checkpointing: bool, batch: int, size: int, steps: int,
            cached: bool = False) -> dict:
    """Seconds per step (after one warm-up step) and peak memory of one configuration."""
    sdxl, network, optimizer = build(cfg, device, tiny, checkpointing)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=device.startswith("cuda"))
    cuda = device.startswith("cuda")
    step(sdxl, optimizer, scaler, cfg, batch, size, device, 0, cached)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in tqdm(range(1, steps + 1), desc=f"checkpointing {'on' if checkpointing else 'off'}", leave=False):
        step(sdxl, optimizer, scaler, cfg, batch, size, device, i, cached)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del sdxl, network, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"s_per_step": seconds, "peak_gib": peak / 2 ** 30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (a smoke run, e.g. on the CPU)")
    parser.add_argument("--config", default="epsilon")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="square side (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without checkpointing")
    parser.add_argument("--latent-cache", action="store_true",
                        help="also measure the step fed by a latent cache (no VAE encode; docs/latent-cache.md)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or use --device cpu --tiny for a smoke run")
        return 2
    size = args.resolution or (64 if args.tiny else 1024)
    cfg = load_config(args.config)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    model = "tiny SDXL" if args.tiny else "SDXL 1.0 base architecture, random weights"
    print(f"{model} on {name}: batch {args.batch}, {size}x{size}, "
          f"{'fp16 autocast' if args.device.startswith('cuda') else 'fp32'}, config {args.config}")
    ours = measure(cfg, args.device, args.tiny, True, args.batch, size, args.steps)
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"gradient checkpointing on : {ours['s_per_step']:.3f} s/step, {args.batch / ours['s_per_step']:.2f} images/s, "
          f"{memory} {ours['peak_gib']:.2f} GiB"
          f" (x{cfg['train']['grad_accum']} accumulation: {ours['s_per_step'] * cfg['train']['grad_accum']:.1f} s "
          "per optimizer step per GPU)")
    if not args.no_baseline:
        base = measure(cfg, args.device, args.tiny, False, args.batch, size, args.steps)
        print(f"baseline, checkpointing off: {base['s_per_step']:.3f} s/step, {memory} {base['peak_gib']:.2f} GiB; "
              f"ratio time {ours['s_per_step'] / base['s_per_step']:.2f}x, memory {ours['peak_gib'] / base['peak_gib']:.2f}x")
    if args.latent_cache:
        fed = measure(cfg, args.device, args.tiny, True, args.batch, size, args.steps, cached=True)
        print(f"from a latent cache (no VAE encode): {fed['s_per_step']:.3f} s/step, {memory} {fed['peak_gib']:.2f} GiB; "
              f"ratio to the VAE step: time {fed['s_per_step'] / ours['s_per_step']:.2f}x, "
              f"memory {fed['peak_gib'] / ours['peak_gib']:.2f}x")
    if args.device.startswith("cuda") and not args.tiny:
        verdict = "meets" if ours["peak_gib"] <= 22 else "MISSES"
        print(f"{verdict} the target: peak {ours['peak_gib']:.2f} GiB vs 22 GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
