"""``python -m trainers.lokr.cache``: encode every sample of a shard folder once with the VAE, at
its bucket size and centre crop, into a latent cache the trainer reads instead of the images.

    python -m trainers.lokr.cache --shards out/ --pretrained sdxl/ [--config epsilon] [--out DIR]
    torchrun --nproc-per-node 4 -m trainers.lokr.cache --shards out/ --pretrained sdxl/

The samples are cut into chunks (one bucket each, in id order); rank r of W encodes chunks
k ≡ r (mod W), decoding images in DataLoader workers. A finished chunk is kept on a rerun
when its file matches its recorded xxh3-128, so a killed build resumes where it stopped and
ends byte-identical to an uninterrupted one. When every rank is done, rank 0 writes
``index.parquet`` and ``manifest.json``. Errors in the input are one line (exit status 2).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from hakubooru import manifest as mf
from hakubooru.errors import HakubooruError, run_command
from hakubooru.shardwriter import CHECKSUM, file_checksum
from trainers.lokr.data.bucketing import assign_buckets, config_buckets
from trainers.lokr.config import BUNDLED, load_config
from trainers.lokr.data.batches import BatchDataset, make_loader
from trainers.lokr.data.index import load_index
from trainers.lokr.distributed import barrier, init_distributed, shutdown
from trainers.lokr.data.latent_cache import (DEFAULT_DIR, DTYPES, FORMAT, INDEX_SCHEMA, cache_dir, cache_settings, chunk_name,
                                        sample_hashes)
from trainers.lokr.safetensors_file import write_safetensors

KILL_AFTER_CHUNKS_ENV = "LOKR_TEST_KILL_AFTER_CHUNKS"  # tests: SIGKILL after writing this many chunks


def plan_chunks(index, buckets, chunk_size: int, assignment=None) -> list[tuple[int, np.ndarray]]:
    """``(bucket number, index rows)`` of every chunk: the rows of each bucket (buckets in
    their listed order) in id order, cut into pieces of at most ``chunk_size``."""
    bucket = assign_buckets(index.width, index.height, buckets) if assignment is None else assignment
    order = np.argsort(bucket, kind="stable")  # rows are sorted by id; stable keeps that
    chunks = []
    for b in np.unique(bucket[order]):
        rows = order[bucket[order] == b]
        chunks.extend((int(b), rows[s:s + chunk_size]) for s in range(0, len(rows), chunk_size))
    return chunks


class EncodePlan:
    """Sub-batches of chunks in the shape of a ``BatchPlan`` (``plan[i]`` rows, ``bucket_of(i)``),
    so ``BatchDataset`` reads, decodes and centre-crops them as it does for training."""

    def __init__(self, items: list[tuple[int, np.ndarray]], buckets, batch_size: int):
        self.items, self.buckets = items, buckets
        self.global_batch, self.seed, self.epoch = batch_size, 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.items[i][1]

    def bucket_of(self, i: int) -> tuple[int, int]:
        """The bucket (w, h) of item ``i``."""
        return self.buckets[self.items[i][0]]


def load_vae(cfg: dict, device: torch.device):
    """The VAE exactly as the trainer runs it: loaded with the model in the config's weight
    dtype, then float32 (so its hash, and its latents, are the trainer's)."""
    from trainers.lokr.sdxl.model import AMP_DTYPES, load_base_model

    vae = load_base_model(cfg, AMP_DTYPES[cfg["train"]["mixed_precision"]]).vae.to(device)
    if vae.dtype != torch.float32:
        vae.to(dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def finished_chunk(out: Path, k: int, verify: bool) -> dict | None:
    """Chunk ``k``'s sidecar if its file is complete (size, and with ``verify`` the xxh3-128)."""
    sidecar = mf.read_json(_sidecar_path(out, k))
    path = out / chunk_name(k)
    if sidecar is None or not path.is_file() or path.stat().st_size != sidecar["size"]:
        return None
    if verify and file_checksum(path) != sidecar[CHECKSUM]:
        return None
    return sidecar


def _sidecar_path(out: Path, k: int) -> Path:
    return out / mf.PARTS_DIR / (chunk_name(k)[:-12] + ".json")


def build_cache(cfg: dict, shards, out=None, *, dtype: str = "fp16", chunk_size: int = 256, batch_size: int = 8,
                workers: int | None = None) -> dict:
    """Encode the samples of ``shards`` this rank owns that are not already in the cache
    ``out`` (default: the config's cache folder, ``<shards>/latents``); write the index and
    manifest if the cache is then complete. Returns counts for the summary."""
    if cfg["data"]["random_crop"]:
        raise HakubooruError("data.random_crop = true draws a new crop for every epoch, so one encoding per image "
                             "cannot serve it; cache with a centre-crop config (data.random_crop = false) or train "
                             "from images")
    if dtype not in DTYPES:
        raise HakubooruError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if chunk_size < 1 or batch_size < 1:
        raise HakubooruError(f"--chunk-size and --batch-size must be ≥ 1 (got {chunk_size}, {batch_size})")
    if not cfg["model"]["pretrained"]:
        raise HakubooruError("no base model: pass --pretrained PATH (the SDXL model the LoKr will be trained on), "
                             "or --config tiny for the built-in tiny model")
    d = init_distributed(cfg["train"]["ddp_timeout"])
    try:
        return _build(cfg, shards, Path(out) if out else cache_dir(cfg, shards), d, dtype, chunk_size, batch_size,
                      cfg["data"]["workers"] if workers is None else workers)
    finally:
        shutdown(d)


def _build(cfg, shards, out: Path, d, dtype, chunk_size, batch_size, workers) -> dict:
    dc = cfg["data"]
    index = load_index(shards)
    buckets, assignment = config_buckets(dc, index.width, index.height)
    vae = load_vae(cfg, d.device)
    chunks = plan_chunks(index, buckets, chunk_size, assignment)
    plan = {**cache_settings(cfg, index, vae), "dtype": dtype, "chunk_size": chunk_size,
            "batch_size": batch_size, "chunks": len(chunks)}
    mf.check_or_write_plan(out, plan, what="latent cache")
    mine = [k for k in range(len(chunks)) if k % d.world_size == d.rank]
    for k in mine:  # temporaries of this rank's chunks left by a killed run (only this rank writes them)
        for stale in [*out.glob(f".{chunk_name(k)}.tmp*"), *(out / mf.PARTS_DIR).glob(f".{_sidecar_path(out, k).name}.*")]:
            stale.unlink(missing_ok=True)
    todo = [k for k in tqdm(mine, desc="checking finished chunks", unit="chunk", leave=False,
                            disable=not d.is_main) if finished_chunk(out, k, verify=True) is None]
    items = [(k, s) for k in todo for s in range(0, len(chunks[k][1]), batch_size)]
    encode_plan = EncodePlan([(chunks[k][0], chunks[k][1][s:s + batch_size]) for k, s in items], buckets, batch_size)
    data = BatchDataset(shards, index, encode_plan, random_crop=False, shuffle_tags=False, tag_dropout=0.0)
    kill_after = int(os.environ.get(KILL_AFTER_CHUNKS_ENV, "-1"))
    started, written = time.perf_counter(), 0
    parts: dict = {}
    bar = tqdm(total=sum(len(chunks[k][1]) for k in todo), desc="encoding latents", unit="img",
               disable=not d.is_main, dynamic_ncols=True)
    with torch.no_grad(), bar:
        for (k, _), batch in zip(items, make_loader(data, workers=workers)):
            dist = vae.encode(batch["pixel_values"].to(d.device)).latent_dist
            parts.setdefault(k, []).append((dist.mean.to("cpu", DTYPES[dtype]), dist.std.to("cpu", DTYPES[dtype]),
                                            batch["time_ids"], batch["ids"]))
            bar.update(len(batch["ids"]))
            if sum(len(p[3]) for p in parts[k]) == len(chunks[k][1]):
                _write_chunk(out, k, parts.pop(k), buckets[chunks[k][0]])
                written += 1
                if written == kill_after:  # test hook: die the hardest way right after a chunk
                    os.kill(os.getpid(), signal.SIGKILL)
    barrier(d)  # one writer of the index and manifest, after every rank's chunks are on disk
    complete = _assemble(out, plan, chunks) if d.is_main else None
    return {"rank": d.rank, "world_size": d.world_size, "chunks": len(chunks), "mine": len(mine),
            "encoded_chunks": written, "kept_chunks": len(mine) - len(todo), "samples": bar.n,
            "seconds": time.perf_counter() - started, "complete": complete, "out": str(out)}


def _write_chunk(out: Path, k: int, parts: list, bucket) -> None:
    mean, std, time_ids, ids = (torch.cat(p) for p in zip(*parts))
    path = write_safetensors(out / chunk_name(k), {"mean": mean, "std": std, "time_ids": time_ids, "ids": ids},
                             {"format": FORMAT, "bucket": f"{bucket[0]}x{bucket[1]}"})
    mf.write_atomic(_sidecar_path(out, k), mf.dump_json({
        "name": path.name, "size": path.stat().st_size, CHECKSUM: file_checksum(path), "samples": len(ids),
        "bucket": list(bucket), "ids": ids.tolist(), "xxh3_64": [int(h) for h in sample_hashes(mean, std)]},
        indent=None))


def _assemble(out: Path, plan: dict, chunks) -> bool:
    """Write index.parquet and manifest.json when every chunk is finished (sizes checked)."""
    sidecars = [finished_chunk(out, k, verify=False) for k in range(len(chunks))]
    if any(s is None for s in sidecars):
        return False
    cols = {name: [] for name in INDEX_SCHEMA.names}
    for s in sidecars:
        n = s["samples"]
        cols["id"] += s["ids"]
        cols["file"] += [s["name"]] * n
        cols["position"] += list(range(n))
        cols["bucket_w"] += [s["bucket"][0]] * n
        cols["bucket_h"] += [s["bucket"][1]] * n
        cols["xxh3_64"] += s["xxh3_64"]
    table = pa.table(cols, schema=INDEX_SCHEMA)
    mf.write_parquet(out / mf.INDEX_FILE, table.sort_by("id"))
    manifest = {**plan, "files": [{"name": s["name"], "samples": s["samples"], "size": s["size"],
                                   CHECKSUM: s[CHECKSUM]} for s in sidecars],
                "bytes": sum(s["size"] for s in sidecars)}
    mf.write_atomic(out / mf.MANIFEST_FILE, mf.dump_json(manifest))
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line of the cache builder."""
    parser = argparse.ArgumentParser(prog="python -m trainers.lokr.cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="shard folder written by `python -m hakubooru build`")
    parser.add_argument("--pretrained", help="the SDXL base model the LoKr is trained on (its VAE encodes)")
    parser.add_argument("--config", default="epsilon",
                        help=f"trainer config whose bucket settings are cached ({', '.join(BUNDLED)} or a TOML "
                             "file; default: epsilon)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, as for the trainer (repeatable)")
    parser.add_argument("--out", help=f"cache folder (default: data.latent_cache_dir, else SHARDS/{DEFAULT_DIR})")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="storage of mean and std "
                                                                                 "(default: fp16)")
    parser.add_argument("--chunk-size", type=int, default=256, help="samples per file (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per VAE call (default: 8)")
    parser.add_argument("--workers", type=int, help="DataLoader decode workers (default: data.workers)")
    return parser


def main(argv=None) -> int:
    """Entry point; returns the process exit status."""
    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.set) + ([("model.pretrained", args.pretrained)] if args.pretrained else [])
    cfg = load_config(args.config, overrides)
    r = build_cache(cfg, args.shards, args.out, dtype=args.dtype, chunk_size=args.chunk_size,
                    batch_size=args.batch_size, workers=args.workers)
    who = f"rank {r['rank']}/{r['world_size']}: " if r["world_size"] > 1 else ""
    end = {True: f"cache complete in {r['out']} ({r['chunks']} chunks)", None: "rank 0 writes the manifest",
           False: "chunks are missing; rerun to finish the cache"}[r["complete"]]
    print(f"{who}encoded {r['samples']} images into {r['encoded_chunks']} chunks in {r['seconds']:.1f} s, kept "
          f"{r['kept_chunks']} finished chunks (checksums verified); {end}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
