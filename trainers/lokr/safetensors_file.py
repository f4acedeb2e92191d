"""Writing `.safetensors` files byte-reproducibly, atomically, and streaming; sd-scripts' hashes.

The `safetensors` library stores `__metadata__` in hash-map order, which differs from process
to process, and builds the whole file in memory. Here the header is written with sorted keys and
the tensors one after another in name order, so the same tensors and metadata always give the
same bytes, and a 7 GB checkpoint needs no second copy in memory. The format is the library's:
8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8,
then the tensor data; `safetensors.safe_open` reads these files (tests check it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import torch

from hakubooru.errors import HakubooruError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def header_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                 dtype: torch.dtype | None = None) -> bytes:
    """The length prefix and JSON header for `tensors` (floating ones cast to `dtype` if given)
    laid out in sorted name order."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name]
        kind = stored_dtype(t, dtype)
        if kind not in DTYPES:
            raise ValueError(f"tensor {name}: dtype {kind} cannot be stored in safetensors here")
        size = t.numel() * kind.itemsize
        header[name] = {"dtype": DTYPES[kind], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def stored_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` is stored in when a file is written in `dtype`: integer tensors (e.g.
    CLIP's position_ids) keep theirs."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def tensor_bytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> memoryview:
    """The bytes `t` (if floating, cast to `dtype` if given) has in a safetensors file."""
    t = t.detach().to("cpu", stored_dtype(t, dtype)).contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def file_chunks(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                dtype: torch.dtype | None = None):
    """The bytes of the safetensors file of `tensors`, in order: the header, then one tensor
    at a time (only one converted tensor in memory)."""
    yield memoryview(header_bytes(tensors, metadata, dtype))
    for name in sorted(tensors):
        yield tensor_bytes(tensors[name], dtype)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, *, dtype: torch.dtype | None = None) -> Path:
    """Write `tensors` (cast to `dtype` if given, + string `metadata`) to `path`: reproducible
    bytes, one tensor converted at a time, through a temporary file in the same folder renamed into place. The file gets the
    process's normal permissions (umask), like any other output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            for chunk in file_chunks(tensors, metadata, dtype):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            need = len(header_bytes(tensors, metadata, dtype)) + sum(
                t.numel() * (dtype or t.dtype).itemsize for t in tensors.values())
            raise HakubooruError(f"no space left on the device of {path}: it needs about {need / 1e6:.0f} MB "
                                 "free; free some space and run again") from None
        raise HakubooruError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def sd_scripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as kohya-ss/sd-scripts computes them before saving
    (library/train_util.py, `precalculate_safetensors_hashes`): of the file serialized with only
    the `ss_*` metadata, the model hash is the sha256 of everything after the header, the legacy
    hash the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB. Computed here on the
    reproducible layout, tensor by tensor (the same bytes `safetensors` writes when all tensors
    share one dtype, as a LoKr's do: tests check it)."""
    head = header_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model, legacy = hashlib.sha256(), hashlib.sha256()
    lo, hi, pos = 0x100000, 0x110000, 0

    def feed(chunk, into_model):
        nonlocal pos
        if into_model:
            model.update(chunk)
        a, b = max(lo, pos), min(hi, pos + len(chunk))
        if a < b:
            legacy.update(chunk[a - pos:b - pos])
        pos += len(chunk)

    feed(memoryview(head), False)
    for name in sorted(tensors):
        feed(tensor_bytes(tensors[name]), True)
    return model.hexdigest(), legacy.hexdigest()[:8]
