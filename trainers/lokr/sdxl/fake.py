"""A random-weight SDXL written the way the real one is published, for exercising the real
loading paths without the real weights.

    python -m trainers.lokr.sdxl.fake --out sdxl-random/ --single-file sdxl-random.safetensors
    python -m trainers.lokr.sdxl.fake --narrow --out narrow/ --single-file narrow.safetensors

``--out`` gets a diffusers folder laid out as ``stabilityai/stable-diffusion-xl-base-1.0``:
every component in fp32 plus its fp16 ``variant`` file, the tokenizers (SDXL's, bundled) and
the configs. ``--single-file`` gets the original-layout checkpoint (fp16, the tensor names
and shapes of SDXL base 1.0). The full size is SDXL 1.0 base (3.5 B parameters: about 14 GB
for the folder's fp32 files, 7 GB each for its fp16 files and the single file).

``--narrow`` writes SDXL's real topology — every block, layer count and module name — with
the channel widths cut down (UNet 32/64/128, text encoders 32 and 64 wide with 12 and 32
layers, CLIP's vocabulary), a few MB: what CI loads, trains, and merges in seconds.

The weights are drawn in fp16 straight into the model's tensors (uniform ±1/√fan-in for
matrices and kernels, N(0, 0.02) for embeddings, ones/zeros for norms and biases), from a
generator seeded by ``--seed``, one tensor at a time: peak memory is the fp16 model, and the
files are written tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from hakubooru.clip_tokenizer import write_tokenizer_folder
from hakubooru.errors import HakubooruError, run_command
from trainers.lokr.sdxl.ldm import single_file_state
from trainers.lokr.sdxl.loading import FOLDER_FILES
from trainers.lokr.sdxl.model import SDXL_CONFIGS, sdxl_base_architecture

# Changes to the bundled SDXL 1.0 base configs that make the narrow model (topology kept).
NARROW = {
    "unet": {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4],
             "cross_attention_dim": 96, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 64, "sample_size": 32},
    "vae": {"block_out_channels": [32, 64, 128, 128], "sample_size": 256},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4,
                     "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                       "projection_dim": 64},
}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def narrow_configs(folder: str | os.PathLike) -> Path:
    """Write the narrow SDXL's config folder (the bundled configs with ``NARROW`` applied)."""
    folder = Path(folder)
    shutil.copytree(SDXL_CONFIGS, folder, dirs_exist_ok=True)
    for sub, changes in NARROW.items():
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        config = json.loads((SDXL_CONFIGS / sub / name).read_text())
        config.update(changes)
        (folder / sub / name).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def random_sdxl(config: str | os.PathLike = SDXL_CONFIGS, seed: int = 0):
    """The SDXL of ``config`` with random weights drawn in fp16 (the VAE's then held in fp32),
    no tokenizers: every value is exact in fp16, so the folder's fp32 and fp16 files and the
    fp16 single file hold the same weights."""
    sdxl = sdxl_base_architecture("meta", torch.float16, config)
    g = torch.Generator().manual_seed(seed)
    for model in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1, sdxl.text_encoder_2):
        state = {}
        for name, meta in model.state_dict().items():
            state[name] = _draw(name, meta, g)
        model.load_state_dict(state, strict=True, assign=True)
        for module in model.modules():  # CLIP's non-persistent position_ids buffer
            ids = module._buffers.get("position_ids")
            if ids is not None and ids.is_meta:
                module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape)
    return sdxl


def _draw(name: str, meta: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = torch.empty(meta.shape, dtype=torch.float16)
    leaf = name.rsplit(".", 1)[-1]
    if "embedding" in name and meta.ndim == 2 and "linear" not in name:
        out.normal_(0, 0.02, generator=g)
    elif meta.ndim >= 2:
        bound = 1 / math.sqrt(meta[0].numel())
        out.uniform_(-bound, bound, generator=g)
    else:
        out.fill_(1.0 if leaf == "weight" else 0.0)
    return out.to(meta.dtype)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (cast to ``dtype`` when given, integer tensors as they are) as one
    safetensors file, one tensor at a time (no copy of the whole dict), atomically."""
    items = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        want = dtype if dtype is not None and t.is_floating_point() else t.dtype
        size = t.numel() * want.itemsize
        items.append((key, t, want, offset, offset + size))
        offset += size
    header = {k: {"dtype": SAFETENSORS_DTYPES[w], "shape": list(t.shape), "data_offsets": [a, b]}
              for k, t, w, a, b in items}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, t, want, _, _ in items:
            f.write(t.detach().to(want).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return path


def write_folder(sdxl, config: Path, out: Path, bar=None) -> Path:
    """The diffusers folder: configs, tokenizers, fp32 weights and fp16 ``variant`` weights."""
    if out.exists():
        raise HakubooruError(f"{out} already exists; choose a new --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.copytree(config, tmp)
    write_tokenizer_folder(tmp / "tokenizer", 1)
    write_tokenizer_folder(tmp / "tokenizer_2", 2)
    for attr, (sub, stem) in FOLDER_FILES.items():
        state = _diffusers_state(getattr(sdxl, attr), attr)
        write_safetensors(tmp / sub / f"{stem}.safetensors", state, torch.float32, {"format": "pt"})
        write_safetensors(tmp / sub / f"{stem}.fp16.safetensors", state, torch.float16, {"format": "pt"})
        if bar is not None:
            bar.update(1)
    os.replace(tmp, out)
    return out


def _diffusers_state(model, attr: str) -> dict[str, torch.Tensor]:
    """The state dict under the names of the published files (transformers ≥ 5.6 dropped
    CLIPTextModel's ``text_model.`` level; its files still have it)."""
    state = model.state_dict()
    if attr == "text_encoder_1" and not hasattr(model, "text_model"):
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


def write_single_file(sdxl, path: Path) -> Path:
    """The original-layout single file, fp16 (VAE included, as the published one)."""
    if path.exists():
        raise HakubooruError(f"{path} already exists; choose a new --single-file")
    return write_safetensors(path, single_file_state(sdxl), torch.float16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers.lokr.sdxl.fake", description=__doc__.splitlines()[0],
                                     epilog="Real size: about 35 GB of disk and 8 GB of memory.")
    parser.add_argument("--out", required=True, help="new folder for the diffusers layout")
    parser.add_argument("--single-file", help="also write this original-layout .safetensors checkpoint")
    parser.add_argument("--narrow", action="store_true", help="SDXL's topology with narrow channels (tests)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    """Entry point; returns the exit status (errors: one line, status 2)."""
    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    single = Path(args.single_file) if args.single_file else None
    if single is not None and single.suffix != ".safetensors":
        raise HakubooruError(f"--single-file {single}: the name must end in .safetensors")
    for path in (out, single):
        if path is not None and path.exists():
            raise HakubooruError(f"{path} already exists; choose a new path")
    config_tmp = None
    config = SDXL_CONFIGS
    if args.narrow:
        config = config_tmp = narrow_configs(out.with_name(f".{out.name}.configs{os.getpid()}"))
    try:
        with tqdm(total=4 + 1 + (single is not None), desc="fake SDXL", unit="part") as bar:
            sdxl = random_sdxl(config, args.seed)
            bar.update(1)
            write_folder(sdxl, config, out, bar)
            if single is not None:
                write_single_file(sdxl, single)
                bar.update(1)
    finally:
        if config_tmp is not None:
            shutil.rmtree(config_tmp, ignore_errors=True)
    params = sum(p.numel() for m in (sdxl.unet, sdxl.vae, sdxl.text_encoder_1, sdxl.text_encoder_2)
                 for p in m.parameters())
    print(f"wrote {'narrow ' if args.narrow else ''}SDXL, {params / 1e6:,.1f} M random parameters: {out}"
          + (f" and {single}" if single else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
