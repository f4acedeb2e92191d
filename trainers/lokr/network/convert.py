"""Rename a LoKr file's modules between sd-scripts' SDXL names and diffusers-path names.

    python -m trainers.lokr convert --lokr lokr.safetensors --to diffusers --out lokr-diffusers.safetensors
    python -m trainers.lokr convert --lokr lokr-diffusers.safetensors --to sd-scripts --out lokr.safetensors

Tensors and metadata are kept (the hashes are recomputed); only the module names change. The
UNet's module tree comes from the bundled SDXL 1.0 configs on the meta device (no weights), or
from `--pretrained tiny` for files of the built-in tiny model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hakubooru.errors import HakubooruError
from trainers.lokr.network import naming
from trainers.lokr.network.lokr import read_lokr
from trainers.lokr.safetensors_file import sd_scripts_hashes, write_safetensors


def convert_lokr(src, dst, to: str, unet) -> tuple[str, int]:
    """Write `src` renamed to naming `to` as `dst`; returns (naming found, modules)."""
    tensors, meta, found = read_lokr(src, unet)
    out = naming.to_naming(tensors, unet, to)
    meta = {**meta, "lokr_naming": to}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sd_scripts_hashes(out, meta)
    write_safetensors(dst, out, meta)
    return found, len({naming.module_name(k) for k in out})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.lokr convert", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lokr", required=True, help="LoKr .safetensors in either naming")
    parser.add_argument("--to", required=True, choices=naming.NAMINGS, help="naming of the written file")
    parser.add_argument("--out", required=True, help="new .safetensors file")
    parser.add_argument("--pretrained", default="sdxl",
                        help='"sdxl" (SDXL 1.0 base architecture, no weights) or "tiny" (the built-in tiny model)')
    return parser


def main(argv=None) -> int:
    """The `convert` subcommand; errors are HakubooruError (one line)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise HakubooruError(f"{out} already exists; choose a new --out")
    if args.pretrained == "tiny":
        from trainers.lokr.sdxl.model import tiny_sdxl
        unet = tiny_sdxl(seed=0).unet
    elif args.pretrained == "sdxl":
        from trainers.lokr.sdxl.model import sdxl_on_meta
        unet = sdxl_on_meta().unet
    else:
        raise HakubooruError(f'--pretrained must be "sdxl" or "tiny", got {args.pretrained!r}')
    found, modules = convert_lokr(args.lokr, out, args.to, unet)
    print(f"{args.lokr} ({found} naming) -> {out} ({args.to} naming, {modules} modules)")
    return 0
