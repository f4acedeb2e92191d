"""Sample images during training (config ``[sample]``): every ``sample.every`` optimizer steps
and at the end (``sample.at_end``), rank 0 renders the configured prompts with the current LoKr
applied and writes ``samples/<step>-<k>.png`` plus a contact sheet ``samples/<step>-sheet.png``.

The images come from diffusers' ``StableDiffusionXLPipeline`` built on the training components
themselves (no second copy of any model); the prompts are encoded by the trainer's own
conditioning (``text.encode_prompts``, 3 × 75-token windows) and the UNet runs in the training
precision, the VAE decodes in fp32 (tiled for large images). Nothing a training step uses is
touched: every draw comes from the prompt's own generator inside ``torch.random.fork_rng``,
module train/eval modes are put back, and it all runs under ``no_grad`` — so a run with
sampling ends bitwise identical to one without.

A render says what it renders (one line, then a progress bar per image on a terminal) and stops
within one UNet or VAE block when the run is asked to stop (SIGINT/SIGTERM): a forward pre-hook
on those blocks ends it, leaving the images already finished and no sheet.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from hakubooru.errors import HakubooruError
from trainers.lokr.distributed import all_reduce_sum
from trainers.lokr.sdxl.prediction import sampler_config
from trainers.lokr.sdxl.text import encode_prompts

PROMPT_KEYS = ("prompt", "seed", "width", "height", "steps", "guidance", "negative_prompt")
TILE_ABOVE = 1024 * 1024  # pixels: decode larger images tile by tile
STOP_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # where a render checks for a stop


def prompt_settings(sample_cfg: dict) -> list[dict]:
    """Each prompt of ``[sample]`` with every setting filled in from the section's defaults
    (seed default: the prompt's position)."""
    out = []
    for k, p in enumerate(sample_cfg["prompts"]):
        full = {key: p.get(key, sample_cfg.get(key)) for key in PROMPT_KEYS}
        full["seed"] = p.get("seed", k)
        out.append(full)
    return out


def sampler(cfg: dict, sdxl):
    """The ``sample.sampler`` scheduler on the training schedule: same prediction type (ε or v)
    and betas (zero-terminal SNR rescaled, then "trailing" timesteps)."""
    return _scheduler(cfg["sample"]["sampler"], sdxl)


def _scheduler(name: str, sdxl):
    scheduler_class = getattr(importlib.import_module("diffusers"), name)
    return scheduler_class.from_config(sampler_config(scheduler_class, sdxl.noise_scheduler))


def is_due(cfg: dict, step: int, total_steps: int) -> bool:
    """Whether samples are rendered after optimizer step ``step``."""
    s = cfg["sample"]
    return s["every"] > 0 and bool(s["prompts"]) and (step % s["every"] == 0 or (s["at_end"] and step == total_steps))


def maybe_render(run, step: int, stopping=lambda: False) -> tuple[dict, bool]:
    """Render the samples of ``step`` if due (rank 0; the other ranks wait), stopping early
    once ``stopping()`` is true. Returns what to add to the step's metrics line
    (``{"samples": [...], "sample_sheet": ...}``, paths relative to the run folder, or ``{}``) and
    whether any rank was asked to stop meanwhile (the same answer on every rank)."""
    if not is_due(run.cfg, step, run.total_steps):
        return {}, False
    logged = {}
    if run.dist.is_main:
        paths = render(run.sdxl, run.cfg, run.output / "samples", step, run.dist.device, stopping)
        if paths is not None:
            logged = {"samples": [str(p.relative_to(run.output)) for p in paths[:-1]],
                      "sample_sheet": str(paths[-1].relative_to(run.output))}
    stop = torch.tensor([float(stopping())], dtype=torch.float64, device=run.dist.device)
    all_reduce_sum(stop, run.dist)  # the other ranks wait here, and every rank learns of a stop
    return logged, bool(stop.item() > 0)


class _Stopped(Exception):
    """Raised inside the UNet or the VAE to end a render early."""


@contextlib.contextmanager
def _stop_points(stopping, *models):
    """Forward pre-hooks on each model and its ``STOP_BLOCKS`` that raise ``_Stopped`` once
    ``stopping()`` is true (a real SDXL step on a CPU takes a minute; a block, seconds)."""
    def check(_module, _args):
        if stopping():
            raise _Stopped

    handles = [m.register_forward_pre_hook(check) for model in models for m in model.modules()
               if m is model or type(m).__name__ in STOP_BLOCKS]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def announce(cfg: dict, step: int, folder: Path) -> str:
    """The line printed before a render: prompts, sizes, steps, sampler, step, model, folder."""
    settings = prompt_settings(cfg["sample"])
    sizes = ", ".join(dict.fromkeys(f"{p['width']}x{p['height']}" for p in settings))
    steps = ", ".join(dict.fromkeys(str(p["steps"]) for p in settings))
    return (f"rendering {len(settings)} sample prompt{'s' if len(settings) != 1 else ''} ({sizes}; {steps} steps, "
            f"{cfg['sample']['sampler']}) with the LoKr at step {step} on {cfg['model']['pretrained']} -> {folder}/")


@contextlib.contextmanager
def _inference_modes(*models):
    """Every submodule in eval mode for the block, then each back in its own mode."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def autocast_args(cfg: dict, device: torch.device) -> dict:
    """``torch.autocast`` arguments of the training precision (``train.mixed_precision``)."""
    mixed = cfg["train"]["mixed_precision"]
    return dict(device_type=device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed),
                enabled=mixed != "no")


def sdxl_pipeline(sdxl, sampler: str):
    """diffusers' SDXL pipeline on the parts of ``sdxl`` (no copies), with scheduler class ``sampler``."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder_1, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer_1, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=_scheduler(sampler, sdxl), add_watermarker=False)


def render(sdxl, cfg: dict, folder: Path, step: int, device, stopping=lambda: False) -> list[Path] | None:
    """Render the prompts of ``cfg["sample"]`` into ``folder``: ``<step>-<k>.png`` for each
    prompt, then ``<step>-sheet.png``; returns those paths (sheet last), or None when
    ``stopping()`` turned true first (the finished images stay, no sheet is written)."""
    device = torch.device(device)
    amp = autocast_args(cfg, device)
    pipe = sdxl_pipeline(sdxl, cfg["sample"]["sampler"])
    folder.mkdir(parents=True, exist_ok=True)
    tqdm.write(announce(cfg, step, folder), file=sys.stderr)
    max_windows = cfg["data"]["max_windows"]
    settings = prompt_settings(cfg["sample"])
    images, paths = [], []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                _inference_modes(sdxl.unet, sdxl.text_encoder_1, sdxl.text_encoder_2, sdxl.vae), \
                _stop_points(stopping, sdxl.unet, sdxl.vae.decoder):
            for k, p in enumerate(settings):
                pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), leave=False,
                                             desc=f"sample {k + 1}/{len(settings)}")
                images.append(render_one(pipe, sdxl, p, amp, max_windows))
                paths.append(folder / f"{step:08d}-{k}.png")
                images[-1].save(paths[-1])
    except _Stopped:
        return None
    sheet = folder / f"{step:08d}-sheet.png"
    contact_sheet(images, [f"step {step} · {k}" for k in range(len(images))]).save(sheet)
    return paths + [sheet]


def render_one(pipe, sdxl, p: dict, amp: dict, max_windows: int) -> Image.Image:
    """One prompt's image (``p``: the keys of ``PROMPT_KEYS``): denoise under the autocast
    ``amp``, decode in fp32."""
    with torch.autocast(**amp):
        context, pooled = encode_prompts(sdxl, [p["prompt"], p["negative_prompt"]], max_windows=max_windows)
        latents = pipe(prompt_embeds=context[:1], pooled_prompt_embeds=pooled[:1],
                       negative_prompt_embeds=context[1:], negative_pooled_prompt_embeds=pooled[1:],
                       width=p["width"], height=p["height"], num_inference_steps=p["steps"],
                       guidance_scale=p["guidance"], output_type="latent",
                       generator=torch.Generator().manual_seed(p["seed"])).images
    image = _decode(sdxl.vae, latents, p["width"] * p["height"] > TILE_ABOVE)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _decode(vae, latents: torch.Tensor, tiled: bool) -> torch.Tensor:
    """VAE decode in fp32 (SDXL's VAE overflows in fp16), tile by tile for large images."""
    latents = latents.to(dtype=torch.float32) / vae.config.scaling_factor
    if not tiled:
        return vae.decode(latents).sample
    was = vae.use_tiling
    vae.use_tiling = True
    try:
        return vae.decode(latents).sample
    finally:
        vae.use_tiling = was


def contact_sheet(images: list[Image.Image], labels: list[str], columns: int = 4) -> Image.Image:
    """The images in a grid of ``columns``, each cell as large as the largest image, a label
    line above each."""
    if not images:
        raise HakubooruError("no sample images to put on a contact sheet")
    cw = max(im.width for im in images)
    ch = max(im.height for im in images) + 14
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = i % cols * cw, i // cols * ch
        draw.text((x + 2, y + 1), label, fill=(0, 0, 0))
        sheet.paste(im, (x, y + 14))
    return sheet
