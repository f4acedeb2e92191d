"""Loading SDXL weights without a second copy of them, from an original-layout ("ldm")
single file or a diffusers folder: the architecture is built on the meta device from a
config folder, then each tensor is read from the file on its own and assigned as the
parameter (cast to its dtype first). Peak host memory is the loaded model plus one tensor;
diffusers' ``from_single_file`` holds the whole file, then the converted copy, then the model.

The single-file name mapping is the inverse of :func:`trainers.lokr.sdxl.ldm.sdxl_to_ldm` (which
writes these files); every parameter must be in the file with its shape, else one error line
names it.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from hakubooru.errors import HakubooruError
from trainers.lokr.sdxl import ldm

# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsReader:
    """Reads tensors of one ``.safetensors`` file one at a time with plain file reads (no
    mmap, so pages of tensors already read do not stay mapped), each into a fresh tensor of
    its stored dtype."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            (length,) = struct.unpack("<Q", self.file.read(8))
            self.header = json.loads(self.file.read(length))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
            self.file.close()
            raise HakubooruError(f"{path} is not a safetensors file (unreadable header)") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + length

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        """The stored tensor ``key`` (CPU, its stored dtype)."""
        info = self.header[key]
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        raw = out.reshape(-1).view(torch.uint8)
        if raw.numel() != end - start:
            raise HakubooruError(f"{self.path}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        if raw.numel():
            self.file.seek(self.base + start)
            if self.file.readinto(raw.numpy()) != raw.numel():
                raise HakubooruError(f"{self.path} is cut short inside tensor {key}; download it again")
        return out


def _te2_source(key: str) -> tuple[str, callable]:
    """Where diffusers' text encoder 2 parameter ``key`` lies in the OpenCLIP layout, and how
    to get it from that tensor (inverse of ``ldm.openclip_state_dict``)."""
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    if key in fixed:
        return fixed[key], None
    if key == "text_projection.weight":
        return "text_projection", lambda t: t.T
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        part = "qkv".index(m[2])
        return (f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}",
                lambda t: t.chunk(3, dim=0)[part])
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
        rest = m[2]
        for new, old in ldm._CLIP_LAYER:
            rest = rest.replace(new, old)
        return f"transformer.resblocks.{m[1]}.{rest}", None
    raise KeyError(f"no OpenCLIP name for text encoder 2 parameter {key}")


def _sources(name: str, model) -> dict[str, tuple[str, callable]]:
    """{model state-dict key: (file key, transform or None)} of one SDXL component."""
    keys = model.state_dict().keys()
    if name == "unet":
        return {k: (ldm.UNET + ldm.unet_key(k, model.config), None) for k in keys}
    if name == "vae":
        return {k: (ldm.VAE + ldm.vae_key(k, model.config), None) for k in keys}
    if name == "text_encoder_1":
        flat = not hasattr(model, "text_model")  # transformers ≥ 5.6 dropped the level
        return {k: (ldm.TE1 + ("text_model." if flat else "") + k, None) for k in keys}
    return {k: (ldm.TE2 + _te2_source(k)[0], _te2_source(k)[1]) for k in keys}


COMPONENTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")
# diffusers folder: SDXL attribute -> (subfolder, weights file name without ".safetensors")
FOLDER_FILES = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
                "text_encoder_1": ("text_encoder", "model"), "text_encoder_2": ("text_encoder_2", "model")}


def load_components(sdxl, path: Path, dtype: torch.dtype) -> None:
    """Fill the meta-device ``sdxl`` (UNet, VAE, both text encoders) from the single file
    ``path``, in place: UNet and text encoders in ``dtype``, the VAE in fp32."""
    with SafetensorsReader(path) as reader:
        for name in COMPONENTS:
            model = getattr(sdxl, name)
            _fill(model, reader, _sources(name, model), torch.float32 if name == "vae" else dtype)


def folder_files(folder: Path, dtype: torch.dtype) -> dict[str, Path] | None:
    """The one safetensors file per component of a diffusers folder: the fp16 ``variant``
    when loading in half precision and it is there (half the bytes to read), else the full
    file; the VAE's full (fp32) file first. None when some component has neither (sharded or
    ``.bin`` weights: then diffusers' own loader is used)."""
    half = dtype in (torch.float16, torch.bfloat16)
    files = {}
    for name, (sub, stem) in FOLDER_FILES.items():
        full, variant = folder / sub / f"{stem}.safetensors", folder / sub / f"{stem}.fp16.safetensors"
        order = (variant, full) if half and name != "vae" else (full, variant)
        found = [p for p in order if p.is_file()]
        if not found:
            return None
        files[name] = found[0]
    return files


def load_folder_components(sdxl, files: dict[str, Path], dtype: torch.dtype) -> None:
    """Fill the meta-device ``sdxl`` from a diffusers folder's files (``folder_files``)."""
    for name in COMPONENTS:
        model = getattr(sdxl, name)
        flat = name == "text_encoder_1" and not hasattr(model, "text_model")
        with SafetensorsReader(files[name]) as reader:
            sources = {k: (f"text_model.{k}" if flat and f"text_model.{k}" in reader.header else k, None)
                       for k in model.state_dict()}
            _fill(model, reader, sources, torch.float32 if name == "vae" else dtype)


def _fill(model, reader: SafetensorsReader, sources: dict, target: torch.dtype) -> None:
    path = reader.path
    absent = sorted(f for f, _ in sources.values() if f not in reader.header)
    if absent:
        raise HakubooruError(f"{path} is not an SDXL checkpoint of this architecture: "
                             f"{len(absent)} tensors missing, e.g. {absent[0]}")
    expected = model.state_dict()
    state = {}
    for key, (file_key, transform) in sources.items():
        tensor = reader.read(file_key)
        tensor = transform(tensor) if transform else tensor
        if tensor.ndim == 4 and expected[key].ndim == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]  # the VAE's attention linears, stored as 1x1 convolutions
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise HakubooruError(
                f"{path}: tensor {file_key} has shape {tuple(reader.shape(file_key))} in the file, "
                f"{tuple(expected[key].shape)} in the model; check the config folder")
        want = target if expected[key].is_floating_point() else expected[key].dtype
        state[key] = tensor.to(want).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    _fill_position_ids(model)


def _fill_position_ids(model) -> None:
    """CLIP's ``position_ids`` is a non-persistent buffer: not in any file, left on the meta
    device; it is ``arange(max positions)``."""
    for module in model.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape)
    left = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise HakubooruError(f"{type(model).__name__}: {left[0]} was not loaded")
