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

Peak allocated memory is reported per phase (VAE, text encoders, UNet forward, backward,
optimizer step; `trainers.lokr.observe.memory`). `--dry-run` prints the CPU-side estimate of those
peaks from the real architecture's shapes (meta device: no weights, no GPU), for the
config's batch and resolution; `--bypass on|off|both` picks the LoKr forward mode.
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

from hakubooru.clip_tokenizer import sdxl_tokenizers  # noqa: E402
from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.data.vae_encode import encode_latents  # noqa: E402
from trainers.lokr.observe.memory import PhaseMeter, flash_attention_memory  # noqa: E402
from trainers.lokr.sdxl.model import sdxl_base_architecture, tiny_sdxl  # noqa: E402
from trainers.lokr.network.lokr import create_lokr, lokr_param_groups  # noqa: E402
from trainers.lokr.data.latent_cache import cached_latents  # noqa: E402
from trainers.lokr.sdxl.text import encode_prompts  # noqa: E402
from trainers.lokr.train import check_bitsandbytes, diffusion_loss, min_snr_weights, sample_draws  # noqa: E402

CAPTION = ", ".join(["1girl", "solo", "long hair", "looking at viewer", "smile", "blue eyes"] * 12)


def build(cfg: dict, device: str, tiny: bool, checkpointing: bool):
    """The model (frozen, fp16 on CUDA and meta), its LoKr (fp32) and the Lion8bit optimizer
    (None on meta)."""
    base_dtype = torch.float16 if device.startswith("cuda") or device == "meta" else torch.float32
    if tiny:
        sdxl = tiny_sdxl(seed=0).to(device=device)
        sdxl.unet.to(dtype=base_dtype)
    else:
        sdxl = sdxl_base_architecture(device, base_dtype)
        sdxl.tokenizer_1, sdxl.tokenizer_2 = sdxl_tokenizers()
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
    if device == "meta":  # LyCORIS's meta-built modules: keep them on meta
        network.requires_grad_(True)
    network.to(device=device, dtype=torch.float32)
    oc = cfg["optimizer"]
    groups = lokr_param_groups(network, oc["lr_unet"], oc["lr_text"], oc["weight_decay"])
    if device == "meta":
        return sdxl, network, groups
    optimizer = check_bitsandbytes().optim.Lion8bit(groups, betas=tuple(oc["betas"]))
    return sdxl, network, optimizer


def step(sdxl, optimizer, scaler, cfg, batch: int, size: int, device: str, i: int,
         meter: PhaseMeter | None = None, cached: bool = False) -> None:
    """One micro-batch and one optimizer step, as train.py does it (fp32 VAE in sub-batches,
    autocast), each phase under ``meter``. On meta, ``optimizer`` is the parameter groups. With
    ``cached`` the latents come from a mean and std as a latent cache gives them (no VAE)."""
    meter = meter or PhaseMeter("cpu")
    tc = cfg["train"]
    cuda, meta = device.startswith("cuda"), device == "meta"
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    draws = sample_draws(tc["seed"], i, torch.arange(batch), (4, size // 8, size // 8),
                         sdxl.noise_scheduler.config.num_train_timesteps, tc["noise_offset"])
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    with meter.phase("VAE"):
        if cached:
            mean, std = torch.randn_like(draws.noise, device=device), torch.full_like(draws.noise, 0.01, device=device)
            latents = cached_latents({"latent_mean": mean, "latent_std": std}, draws.latent_eps,
                                     sdxl.vae.config.scaling_factor, device)
        else:
            latents = encode_latents(sdxl.vae, pixels, draws.latent_eps.to(device), cfg["data"]["vae_batch_size"])
        del pixels
    noisy = sdxl.noise_scheduler.add_noise(latents, noise, timesteps)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)
    amp = dict(device_type="cuda" if cuda else "cpu", dtype=torch.float16, enabled=cuda)
    with torch.autocast(**amp):
        with meter.phase("text encoders"):
            context, pooled = encode_prompts(sdxl, [CAPTION] * batch, max_windows=cfg["data"]["max_windows"])
        if meta:  # no autocast on meta: the fp16 model takes fp16 inputs
            noisy, time_ids = noisy.half(), time_ids.half()
        with meter.phase("UNet forward"):
            pred = sdxl.unet(noisy, timesteps, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    alphas = sdxl.noise_scheduler.alphas_cumprod.to(device)
    with meter.phase("backward"):
        loss = diffusion_loss(pred, noise, min_snr_weights(alphas, timesteps, tc["min_snr_gamma"]))
        scaler.scale(loss).backward()
        del pred, context, pooled, noisy, latents
    with meter.phase("optimizer step"):
        if meta:  # Lion8bit has no meta kernels: its state is counted by the caller
            for g in optimizer:
                for p in g["params"]:
                    p.grad = None
            return
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], tc["max_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)


def estimate(cfg, batch: int, size: int, checkpointing: bool = True) -> tuple[PhaseMeter, dict]:
    """The per-phase peaks on the real SDXL architecture (meta device): weights (fp16 UNet and
    text encoders, fp32 VAE), fp32 LoKr and Lion8bit state (1 byte a parameter, plus one fp32
    scale per 256) held throughout, plus every activation and gradient alive; attention counted
    as a GPU's flash kernels hold it (`flash_attention_memory`)."""
    sdxl, network, groups = build(cfg, "meta", False, checkpointing)
    weights = sum(p.numel() * p.element_size() for m in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1,
                                                          sdxl.text_encoder_2) for p in m.parameters())
    lokr = sum(p.numel() for g in groups for p in g["params"])
    held = {"base weights": weights, "LoKr (fp32)": 4 * lokr, "Lion8bit state": lokr + 4 * -(-lokr // 256)}
    meter = PhaseMeter("meta", held_bytes=sum(held.values()))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with meter.counter, flash_attention_memory():
        step(sdxl, groups, scaler, cfg, batch, size, "meta", 0, meter)
    return meter, held


def measure(cfg, device: str, tiny: bool, checkpointing: bool, batch: int, size: int, steps: int,
            cached: bool = False) -> dict:
    """Seconds per step (after one warm-up step) and peak memory of one configuration."""
    sdxl, network, optimizer = build(cfg, device, tiny, checkpointing)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=device.startswith("cuda"))
    cuda = device.startswith("cuda")
    step(sdxl, optimizer, scaler, cfg, batch, size, device, 0, cached=cached)
    meter = PhaseMeter(device)
    start = time.perf_counter()
    for i in tqdm(range(1, steps + 1), desc=f"checkpointing {'on' if checkpointing else 'off'}", leave=False):
        step(sdxl, optimizer, scaler, cfg, batch, size, device, i, meter, cached=cached)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = max(meter.peaks.values()) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del sdxl, network, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {"s_per_step": seconds, "peak_gib": peak / 2 ** 30, "phases": meter}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (a smoke run, e.g. on the CPU)")
    parser.add_argument("--config", default="epsilon")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="square side (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without checkpointing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the per-phase memory estimate on the real architecture (meta device), then stop")
    parser.add_argument("--bypass", choices=("on", "off", "both"), default=None,
                        help="LoKr bypass mode (default: the config's); both = time each (GPU comparison)")
    parser.add_argument("--latent-cache", action="store_true",
                        help="also measure the step fed by a latent cache (no VAE encode; docs/latent-cache.md)")
    args = parser.parse_args(argv)
    size = args.resolution or (64 if args.tiny else 1024)
    cfg = load_config(args.config)
    if args.dry_run:
        meter, held = estimate(cfg, args.batch, size)
        print(f"estimated peak memory per phase, SDXL 1.0 base architecture (meta device), batch {args.batch}, "
              f"{size}x{size}, fp16 weights, config {args.config}, vae_batch_size {cfg['data']['vae_batch_size']}")
        for name, n in held.items():
            print(f"  held: {name:<16}{n / 2 ** 30:8.2f} GiB")
        print(meter.table())
        peak = max(meter.peaks.values()) / 2 ** 30
        print(f"estimated peak {peak:.2f} GiB (target <= 22 GiB; moonshot <= 16 GiB); the allocator's "
              "fragmentation and CUDA context come on top")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or use --device cpu --tiny for a smoke run")
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    model = "tiny SDXL" if args.tiny else "SDXL 1.0 base architecture, random weights"
    print(f"{model} on {name}: batch {args.batch}, {size}x{size}, "
          f"{'fp16 autocast' if args.device.startswith('cuda') else 'fp32'}, config {args.config}")
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    modes = {"on": [True], "off": [False], "both": [True, False]}.get(args.bypass, [cfg["lokr"]["bypass_mode"]])
    for k, bypass in enumerate(modes):
        cfg["lokr"]["bypass_mode"] = bypass
        ours = measure(cfg, args.device, args.tiny, True, args.batch, size, args.steps)
        print(f"LoKr bypass {'on' if bypass else 'off'}, gradient checkpointing on: {ours['s_per_step']:.3f} s/step, "
              f"{args.batch / ours['s_per_step']:.2f} images/s, {memory} {ours['peak_gib']:.2f} GiB"
              f" (x{cfg['train']['grad_accum']} accumulation: {ours['s_per_step'] * cfg['train']['grad_accum']:.1f} s "
              "per optimizer step per GPU)")
        if ours["phases"].peaks:
            print("peak allocated per phase:\n" + ours["phases"].table())
        if k == 0:
            first = ours
    ours = first
    cfg["lokr"]["bypass_mode"] = modes[0]
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
