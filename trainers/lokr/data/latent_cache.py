"""The latent cache of a shard folder: its layout, the check that it fits a run, and the
training batches read from it (docs/latent-cache.md).

A cache folder (default ``<shards>/latents/``, written by ``python -m trainers.lokr.cache``):

- ``latents-NNNNNN.safetensors``: one chunk — up to ``chunk_size`` samples of one bucket, in id
  order — as tensors ``mean`` and ``std`` (n, 4, h/8, w/8) in the stated dtype, ``time_ids``
  float32 (n, 6) and ``ids`` int64 (n,);
- ``index.parquet``: per sample (sorted by id) its ``file``, ``position`` in it, bucket and the
  ``xxh3_64`` of its mean and std bytes (checked at every read);
- ``manifest.json``: the settings the cache was made for (VAE hash, bucket settings, centre
  crop, dataset fingerprint, dtype) and each file's size and xxh3-128; written last, so a
  folder without one is a partial build;
- ``.hakubooru-build.json`` and ``.parts/`` the build's plan and per-chunk sidecars (resume).
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import xxhash
from safetensors import safe_open

from hakubooru import manifest as mf
from hakubooru.errors import HakubooruError
from trainers.lokr.data.integrity import CorruptMember
from trainers.lokr.data.batches import BatchDataset

FORMAT = "hakubooru-latents/1"
DEFAULT_DIR = "latents"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INDEX_SCHEMA = pa.schema([("id", pa.int64()), ("file", pa.string()), ("position", pa.int32()),
                          ("bucket_w", pa.int32()), ("bucket_h", pa.int32()), ("xxh3_64", pa.uint64())])
# What a cache must agree on with a run to serve it (the manifest's keys; see cache_settings).
MATCH_KEYS = ("format", "vae", "scaling_factor", "buckets", "crop", "dataset_fingerprint", "samples")
BUILD_COMMAND = "python -m trainers.lokr.cache"


def chunk_name(k: int) -> str:
    """File name of chunk number ``k``."""
    return f"latents-{k:06d}.safetensors"


def cache_dir(cfg: dict, shards) -> Path:
    """Where the cache of ``shards`` for ``cfg`` lives: ``data.latent_cache_dir``, else ``<shards>/latents``."""
    return Path(cfg["data"]["latent_cache_dir"] or Path(shards) / DEFAULT_DIR)


def vae_hash(vae) -> str:
    """xxh3-128 of the VAE encoder's weights as they are used (name, dtype, shape, bytes, in
    name order): the decoder plays no part in the latents, and the same weights loaded from a
    diffusers folder or a single file give the same hash."""
    h = xxhash.xxh3_128()
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            t = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy())
    return "xxh3_128:" + h.hexdigest()


def cache_settings(cfg: dict, index, vae) -> dict:
    """What the latents depend on: a cache serves a run only if these agree."""
    dc = cfg["data"]
    return {"format": FORMAT, "vae": vae_hash(vae), "scaling_factor": float(vae.config.scaling_factor),
            "buckets": {**{k: dc[k] for k in ("resolution", "bucket_min", "bucket_max", "bucket_step")},
                        **({"no_upscale": True} if dc.get("bucket_no_upscale") else {})},
            "crop": "centre", "dataset_fingerprint": index.fingerprint, "samples": len(index)}


def sample_hashes(mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Per sample, the xxh3-64 of its ``mean`` bytes followed by its ``std`` bytes (uint64)."""
    out = np.empty(len(mean), dtype=np.uint64)
    for i in range(len(mean)):
        h = xxhash.xxh3_64()
        h.update(_bytes(mean[i]))
        h.update(_bytes(std[i]))
        out[i] = h.intdigest()
    return out


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


@dataclass
class LatentCache:
    """A cache checked against a run: row i of the shard index is ``position[i]`` of ``files[file[i]]``."""

    dir: Path
    files: list[str]
    file: np.ndarray      # int32 code into files, per index row
    position: np.ndarray  # int32
    checksum: np.ndarray  # uint64, xxh3-64 of mean + std bytes
    dtype: str

    def read(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, std, time_ids)`` float32 of index rows ``rows`` (all of one bucket), each
        sample's bytes checked against its recorded xxh3-64."""
        means, stds, times = [], [], []
        for row in rows:
            name = self.files[self.file[row]]
            pos = int(self.position[row])
            with safe_open(str(self.dir / name), "pt") as f:
                mean, std = f.get_slice("mean")[pos:pos + 1], f.get_slice("std")[pos:pos + 1]
                times.append(f.get_slice("time_ids")[pos:pos + 1])
            if sample_hashes(mean, std)[0] != self.checksum[row]:
                raise HakubooruError(f"latent cache {self.dir}: sample {pos} of {name} fails its checksum (a "
                                     f"damaged file); rerun `{BUILD_COMMAND}` with the same arguments to rebuild "
                                     "it, or train from images with --set data.latent_cache=off")
            means.append(mean)
            stds.append(std)
        return torch.cat(means).float(), torch.cat(stds).float(), torch.cat(times)


def open_cache(cfg: dict, shards, index, vae, log: bool = True) -> LatentCache | None:
    """The run's latent cache per ``data.latent_cache``: "off" → None; "auto" → the cache if
    there is one, None if there is none; "require" → the cache. A cache that is there but does
    not fit (partial, damaged, another VAE, bucket set, crop or dataset) is refused with one
    line in both modes — never silently replaced by the images. Logs the path taken (if ``log``)."""
    mode, root = cfg["data"]["latent_cache"], cache_dir(cfg, shards)
    if mode == "off":
        _log("latent cache: off (data.latent_cache); encoding images with the VAE every step", log)
        return None
    found = (root / mf.MANIFEST_FILE).is_file() or (root / mf.PLAN_FILE).is_file()
    if not found:
        if mode == "require":
            raise HakubooruError(f"data.latent_cache = \"require\" but there is no latent cache at {root}; build "
                                 f"it with `{BUILD_COMMAND} --shards {shards} --pretrained ...`")
        _log(f"latent cache: none at {root}; encoding images with the VAE every step", log)
        return None
    cache = _check(cfg, root, index, vae)
    _log(f"latent cache: using {root} ({len(index)} samples, {cache.dtype}); images and the VAE are not used", log)
    return cache


def _check(cfg: dict, root: Path, index, vae) -> LatentCache:
    fix = f"rerun `{BUILD_COMMAND}` with the same arguments, or train from images with --set data.latent_cache=off"
    if cfg["data"]["random_crop"]:
        raise HakubooruError(f"latent cache {root} holds centre crops but data.random_crop = true draws a new "
                             "crop each epoch; train with --set data.latent_cache=off (or without random crops)")
    manifest = mf.read_json(root / mf.MANIFEST_FILE)
    if manifest is None:
        plan = mf.read_json(root / mf.PLAN_FILE) or {}
        done = len(list((root / mf.PARTS_DIR).glob("latents-*.json")))
        raise HakubooruError(f"latent cache {root} is partial ({done} of {plan.get('chunks', '?')} chunks built, "
                             f"no {mf.MANIFEST_FILE}); finish it: {fix}")
    wanted = cache_settings(cfg, index, vae)
    for key in MATCH_KEYS:
        if manifest.get(key) != wanted[key]:
            what = {"vae": "another VAE", "buckets": "another bucket set", "dataset_fingerprint": "another dataset",
                    "samples": "another dataset", "crop": "another crop", "scaling_factor": "another VAE"}.get(key, key)
            raise HakubooruError(f"latent cache {root} was made for {what} ({key}: {_short(manifest.get(key))}, "
                                 f"this run: {_short(wanted[key])}); build a cache for this run with "
                                 f"`{BUILD_COMMAND} --out DIR` and set data.latent_cache_dir, or "
                                 "--set data.latent_cache=off")
    for entry in manifest["files"]:
        path = root / entry["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            state = "is missing" if size is None else f"has {size} bytes, the manifest says {entry['size']}"
            raise HakubooruError(f"latent cache {root}: {entry['name']} {state} (partial or damaged); {fix}")
    try:
        table = pq.read_table(root / mf.INDEX_FILE, read_dictionary=["file"])
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"latent cache {root}: cannot read {mf.INDEX_FILE} ({str(e).splitlines()[0]}); "
                             f"{fix}") from None
    ids = table.column("id").to_numpy()
    if len(ids) != len(index) or not np.array_equal(ids, index.ids):
        raise HakubooruError(f"latent cache {root}: its {mf.INDEX_FILE} lists other samples than the shards; {fix}")
    file = table.column("file").combine_chunks()
    return LatentCache(root, [str(s) for s in file.dictionary.to_pylist()], file.indices.to_numpy().astype(np.int32),
                       table.column("position").to_numpy().astype(np.int32),
                       table.column("xxh3_64").to_numpy().astype(np.uint64), manifest["dtype"])


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text[:24] + "…" if isinstance(value, str) and len(text) > 24 else text


def _log(line: str, log: bool) -> None:
    if not log:
        return
    print(line, file=sys.stderr)


class CachedBatchDataset(BatchDataset):
    """A ``BatchDataset`` whose items carry ``latent_mean`` and ``latent_std`` float32
    (b, 4, H/8, W/8) from the cache instead of ``pixel_values``; captions, time ids and ids as
    before. Only the ``.json`` records are read from the shards."""

    def __init__(self, *args, cache: LatentCache, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def __getitem__(self, i: int) -> dict:
        rows = self.plan[i][self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        kept, captions = [], []
        for j, row in enumerate(rows.tolist()):
            try:
                record, _ = self._read(row, image=False)  # caption members only, hash-checked
            except CorruptMember:
                if self.on_corrupt == "error":
                    raise
                continue
            kept.append(j)
            captions.append(self.caption(row, record))
        rows = rows[kept]
        mean, std, time_ids = self.cache.read(rows)
        return {"latent_mean": mean, "latent_std": std, "captions": captions, "time_ids": time_ids,
                "ids": torch.from_numpy(self.index.ids[rows]), "corrupt": self.per_rank - len(rows)}


def batch_dataset(cache: LatentCache | None):
    """The dataset class a run uses: ``BatchDataset`` (images), or the cached one bound to ``cache``."""
    return BatchDataset if cache is None else functools.partial(CachedBatchDataset, cache=cache)


def cached_latents(batch: dict, latent_eps: torch.Tensor, scaling_factor: float, device) -> torch.Tensor:
    """The latent sample of a cached batch, as the VAE path draws it: (mean + std · ε) · scale."""
    mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    return (mean + std * latent_eps.to(device)) * scaling_factor
