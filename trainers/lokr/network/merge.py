"""Fold a trained LoKr into SDXL's weights and write a full checkpoint.

    python -m trainers.lokr merge --pretrained sdxl/ --lokr run/lokr.safetensors --out merged.safetensors
    python -m trainers.lokr merge --pretrained sdxl/ --lokr run/lokr.safetensors --out merged/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.network.metadata import MODELSPEC_IMPLEMENTATION, spec_date, training_start_time
from trainers.lokr.sdxl.prediction import MODELSPEC_TYPES, of_scheduler, prediction_keys
from trainers.lokr.sdxl.model import SDXL, load_sdxl, save_sdxl, save_sdxl_single_file, tiny_sdxl
from trainers.lokr.network.lokr import SAVE_DTYPES, load_lokr


def merge_lokr(sdxl: SDXL, lokr_path: str | os.PathLike) -> SDXL:
    """Add the LoKr's weight deltas into `sdxl`'s UNet and text encoders, in place, and return
    it: each LoKr module's `lokr_delta`, each norm module's offsets. Merge in fp32 for a
    precise result; cast afterwards."""
    from lycoris.modules.lokr import LokrModule

    network = load_lokr(sdxl, lokr_path, apply=False)
    with torch.no_grad():
        for lora in network.unet_loras + network.text_encoder_loras:
            if not isinstance(lora, LokrModule):
                lora.merge_to(1.0)  # norm offsets: weight + w_norm, bias + b_norm
                continue
            if lora.wd:
                raise HakubooruError(f"{lokr_path}: {lora.lora_name} is a DoRA LoKr (dora_scale); merge does "
                                     "not support weight-decomposed files")
            weight = lora.org_module[0].weight
            weight += lokr_delta(lora).to(weight.dtype)
    return sdxl


def lokr_delta(lora) -> torch.Tensor:
    """The weight change a LyCORIS LoKr module's forward applies: w1 ⊗ w2 · alpha / dim (scale 1
    for full matrix, where alpha = dim), w1 and w2 rebuilt from their low-rank factors where the
    file has them. LyCORIS's own `merge_to` applies alpha / dim twice (`get_diff_weight` scales
    `get_weight`, which is already scaled), so merge does not use it."""
    weight = lora.org_module[0].weight
    return lora.get_weight(weight.shape).to(weight.device) * lora.scalar * lora.multiplier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.lokr merge", description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True,
                        help='SDXL base: diffusers folder, single-file .safetensors, or "tiny"')
    parser.add_argument("--lokr", required=True, help="LoKr .safetensors (ours or sd-scripts + LyCORIS; "
                                                      "sd-scripts or diffusers module names)")
    parser.add_argument("--out", required=True,
                        help="FILE.safetensors (one original-layout checkpoint) or a new FOLDER (diffusers)")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="fp16", help="dtype of the written weights")
    parser.add_argument("--model-config", help="diffusers-layout config folder for a single-file --pretrained "
                                               "(default: the bundled SDXL 1.0 base configs)")
    parser.add_argument("--tokenizers", help="folder with tokenizer/ and tokenizer_2/ for a single-file --pretrained")
    return parser


def main(argv=None) -> int:
    """The `merge` subcommand; errors are HakubooruError (one line)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise HakubooruError(f"{out} already exists; choose a new --out")
    if not Path(args.lokr).is_file():  # before loading gigabytes of base model
        raise HakubooruError(f"LoKr file not found: {args.lokr}")
    if args.pretrained == "tiny":
        sdxl = tiny_sdxl(seed=0)
    else:
        sdxl = load_sdxl(args.pretrained, dtype=torch.float32, config=args.model_config, tokenizers=args.tokenizers)
    merge_lokr(sdxl, args.lokr)
    dtype = SAVE_DTYPES[args.dtype]
    pred = of_scheduler(sdxl.noise_scheduler)  # the base's (load_sdxl reads it); a diffusers --out keeps it
    lokr_meta = {k: v for k, v in _lokr_metadata(args.lokr).items() if k not in ("ss_tag_frequency", "lycoris_preset")}
    trained = lokr_meta.get("modelspec.prediction_type")
    if trained and trained != MODELSPEC_TYPES[pred.type]:
        print(f"warning: {args.lokr} says it was trained for {trained!r} prediction, the base predicts "
              f"{MODELSPEC_TYPES[pred.type]!r}; the merged model is marked as the base's", file=sys.stderr)
    if out.suffix == ".safetensors":
        meta = {"merged_lokr": str(Path(args.lokr).name), "base_model": str(args.pretrained),
                "lokr_metadata": json.dumps(lokr_meta, sort_keys=True),
                "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
                "modelspec.title": out.stem, "modelspec.prediction_type": MODELSPEC_TYPES[pred.type],
                # sd-scripts' sai_model_spec always writes these two: the LoKr's, else SDXL's 1024²
                "modelspec.resolution": lokr_meta.get("modelspec.resolution", "1024x1024"),
                "modelspec.date": spec_date(training_start_time()),
                "modelspec.merged_from": f"{Path(str(args.pretrained)).name}, {Path(args.lokr).name}"}
        extras = {**_base_extras(args.pretrained), **prediction_keys(pred)}
        save_sdxl_single_file(sdxl, out, dtype=dtype, metadata=meta, extras=extras)
    else:
        save_sdxl(sdxl.to(dtype=dtype), out)
    print(f"merged {args.lokr} into {args.pretrained} -> {out} ({args.dtype})")
    return 0


def _lokr_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _base_extras(pretrained) -> dict:
    """Tensors of a single-file base that no diffusers component holds (OpenCLIP's logit_scale):
    passed through unchanged into the merged file."""
    from safetensors import safe_open

    from trainers.lokr.sdxl.ldm import LOGIT_SCALE

    if not str(pretrained).endswith(".safetensors"):
        return {}
    with safe_open(str(pretrained), "pt") as f:
        return {LOGIT_SCALE: f.get_tensor(LOGIT_SCALE)} if LOGIT_SCALE in f.keys() else {}
