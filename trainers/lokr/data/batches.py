"""Training batches from a shard folder: the per-epoch batch plan, and a Dataset whose item i is
the whole collated micro-batch i (pixels, augmented captions, SDXL time ids)."""
from __future__ import annotations

import functools
import gc
import io
import json
import multiprocessing
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from hakubooru.errors import HakubooruError
from hakubooru.images import to_rgb
from hakubooru.procs import forking, worker_start
from hakubooru.rng import hash64, hash64_array, uniform
from trainers.lokr.data.augment import GROUPS, augment_caption, augment_text
from trainers.lokr.data.bucketing import assign_buckets, crop_box
from trainers.lokr.data.index import ShardIndex
from trainers.lokr.data.integrity import ON_CORRUPT, CorruptMember, check_member

# Separate streams for the randomness drawn from the same (seed, epoch, ...).
_ORDER_STREAM = 0x0DE
_BATCH_STREAM = 0xBA7
CROP_STREAM = 0xC0F


class BatchPlan:
    """The global batches of one epoch: ``plan[i]`` is an int64 array of ``global_batch`` row
    indices, all from bucket ``plan.bucket_of(i)``.

    A pure function of (index ids and sizes, buckets, global_batch, seed, epoch): within each
    bucket the rows are ordered by hash(seed, epoch, id) and cut into batches; the leftover
    rows of each bucket (fewer than a batch) sit out this epoch and are counted in ``dropped``;
    the batches are then ordered by hash(seed, epoch, bucket, batch number). Rank r of W takes
    ``plan[i][r*b:(r+1)*b]`` with b = global_batch / W."""

    def __init__(self, index: ShardIndex, global_batch: int, seed: int, epoch: int, buckets,
                 assignment: np.ndarray | None = None, keep: np.ndarray | None = None,
                 counts: np.ndarray | None = None):
        if global_batch <= 0:
            raise HakubooruError(f"batch size must be positive, got {global_batch}")
        if len(buckets) > np.iinfo(np.uint16).max:
            raise HakubooruError(f"too many buckets ({len(buckets)})")
        self.global_batch, self.seed, self.epoch = int(global_batch), int(seed), int(epoch)
        self.buckets = [tuple(map(int, b)) for b in buckets]
        # each row's bucket: the nearest aspect ratio, unless given (bucketing.config_buckets)
        bucket = (assign_buckets(index.width, index.height, self.buckets) if assignment is None
                  else assignment).astype(np.uint16)
        # The hash is a bijection of the (unique) ids, so the keys have no ties and any sort
        # algorithm gives the same order; the stable sort by bucket keeps it (radix sort).
        keys = hash64_array(hash64(seed, epoch, _ORDER_STREAM), index.ids)
        if counts is None:
            by_key = np.argsort(keys)
            if keep is not None:  # a mask of the rows to plan (held-out validation samples are not)
                by_key = by_key[keep[by_key]]
        else:  # several copies of a row (data/mixing.py): copy c > 0 ordered by its own key
            counts = counts if keep is None else np.where(keep, counts, 0)
            copies = [np.flatnonzero(counts > c) for c in range(int(counts.max(initial=0)))]
            all_keys = np.concatenate([keys[r] if c == 0 else
                                       hash64_array(hash64(seed, epoch, _ORDER_STREAM, c), index.ids[r])
                                       for c, r in enumerate(copies)] or [np.zeros(0, np.uint64)])
            all_rows = np.concatenate(copies or [np.zeros(0, np.int64)])
            by_key = all_rows[np.argsort(all_keys, kind="stable")]
        rows = by_key[np.argsort(bucket[by_key], kind="stable")]
        sorted_bucket = bucket[rows]
        counts = np.bincount(sorted_bucket, minlength=len(self.buckets))
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(len(rows)) - starts[sorted_bucket]
        usable = pos < (counts // self.global_batch * self.global_batch)[sorted_bucket]
        batches = rows[usable].reshape(-1, self.global_batch)
        first = np.flatnonzero(usable)[:: self.global_batch]
        batch_bucket = sorted_bucket[first].astype(np.int64)
        number = pos[first] // self.global_batch
        order = np.argsort(hash64_array(hash64(seed, epoch, _BATCH_STREAM),
                                        (batch_bucket << 32) + number))
        self.batches = batches[order].astype(np.int64)
        self.batch_bucket = batch_bucket[order]
        self.dropped = int(len(rows) - self.batches.size)  # rows planned (copies counted) that sit out

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.batches[i]

    def bucket_of(self, i: int) -> tuple[int, int]:
        """The bucket (w, h) of global batch ``i``."""
        return self.buckets[self.batch_bucket[i]]


class PlanView:
    """One rank's view of a ``BatchPlan`` read in batches of ``global_batch`` rows instead of the
    plan's own (elastic resume: a run resumed on another GPU count or per-GPU batch keeps the
    plan of its first start). Batch ``i`` is rows ``[i·global_batch, (i+1)·global_batch)`` of the
    plan's batches laid end to end; rank ``rank`` takes ``rank_rows`` of them, which lie in one
    plan batch (``rank_rows`` divides the plan's batch), so ``bucket_of`` is that batch's bucket."""

    def __init__(self, plan: BatchPlan, global_batch: int, rank: int, rank_rows: int):
        if plan.global_batch % rank_rows:
            raise HakubooruError(f"a per-GPU batch of {rank_rows} does not divide the plan's batch {plan.global_batch}")
        self.plan, self.global_batch, self.rank, self.rank_rows = plan, int(global_batch), rank, rank_rows
        self.seed, self.epoch, self.buckets = plan.seed, plan.epoch, plan.buckets
        self.flat = plan.batches.reshape(-1)

    def __len__(self) -> int:
        return len(self.flat) // self.global_batch

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[i * self.global_batch:(i + 1) * self.global_batch]

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self.plan.bucket_of((i * self.global_batch + self.rank * self.rank_rows) // self.plan.global_batch)


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is this rank's collated micro-batch of global batch ``i``
    — ``pixel_values`` float32 (b,3,H,W) in [-1,1], ``captions`` list[str] (augmented),
    ``time_ids`` float32 (b,6) = (original h, original w, crop top, crop left, target h,
    target w), ``ids`` int64 (b,), ``corrupt`` int (samples left out, below). Items are pure
    functions of ``i``, so any number of DataLoader workers, and a resume at any batch, give the
    same batches.

    Each member read is checked against its build-time hash; ``on_corrupt="error"`` raises
    CorruptMember, ``"skip"`` leaves the sample out of its micro-batch (which gets smaller, or
    empty) and counts it in ``corrupt``: the batch plan is unchanged, so which samples the other
    ranks and batches hold does not depend on the damage."""

    def __init__(self, shards_dir, index: ShardIndex, plan: BatchPlan, *, rank: int = 0,
                 world_size: int = 1, seed: int | None = None, epoch: int | None = None,
                 random_crop: bool = False, shuffle_tags: bool = True, tag_dropout: float = 0.15,
                 shuffle_scope: str = "general", separator: str = ", ",
                 keep_tokens: int = 0, keep_separator: str | None = "|||", on_corrupt: str = "error"):
        if on_corrupt not in ON_CORRUPT:
            raise HakubooruError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise HakubooruError(f"rank {rank} is not in a world of size {world_size}")
        if plan.global_batch % world_size:
            raise HakubooruError(f"global batch {plan.global_batch} does not split over "
                                 f"{world_size} ranks")
        self.root = Path(shards_dir)
        self.index, self.plan = index, plan
        self.per_rank = plan.global_batch // world_size
        self.rank = rank
        self.seed = plan.seed if seed is None else int(seed)
        self.epoch = plan.epoch if epoch is None else int(epoch)
        self.random_crop = random_crop
        self.on_corrupt = on_corrupt
        self.caption_options = dict(shuffle=shuffle_tags, drop=tag_dropout,
                                    scope=shuffle_scope,
                                    separator=separator)
        # for samples with a caption text and no caption record (webdataset folders from
        # other tools, indexed by `python -m hakubooru index`)
        self.text_options = dict(shuffle=shuffle_tags, drop=tag_dropout, keep_tokens=keep_tokens,
                                 keep_separator=keep_separator, separator=separator)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        rows = self.plan[i][self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        bw, bh = self.plan.bucket_of(i)
        samples = []
        for row in rows.tolist():
            try:
                samples.append((row, *self._read(row)))
            except CorruptMember:
                if self.on_corrupt == "error":
                    raise
        rows = np.array([s[0] for s in samples], dtype=np.int64)
        pixels = torch.empty((len(rows), 3, bh, bw), dtype=torch.float32)
        time_ids = torch.empty((len(rows), 6), dtype=torch.float32)
        captions = []
        for j, (row, record, image) in enumerate(samples):
            captions.append(self.caption(row, record))
            u = uniform(self.seed, self.epoch, int(self.index.ids[row]), CROP_STREAM)
            pixels[j] = self._crop(image, bw, bh, u, time_ids[j])
        pixels.div_(127.5).sub_(1.0)
        return {"pixel_values": pixels, "captions": captions, "time_ids": time_ids,
                "ids": torch.from_numpy(self.index.ids[rows]), "corrupt": self.per_rank - len(rows)}

    def sample_caption(self, row: int) -> str:
        """This epoch's caption of the sample at `row`, read (hash-checked, no image) and built
        as a batch builds it: what `python -m trainers.lokr captions` prints."""
        return self.caption(row, self._read(row, image=False)[0])

    def captions_from(self, row: int = 0) -> str:
        """Where the sample at `row` gets its caption: ``"record"`` (its caption record) or
        ``"text"`` (its `.txt`, or a webdataset ``.json`` caption string)."""
        return "text" if isinstance(self._read(row, image=False)[0], str) else "record"

    def caption(self, row: int, record: dict | str) -> str:
        """This epoch's caption of the sample at `row`, from its record or its caption text."""
        if isinstance(record, str):
            return augment_text(record, seed=self.seed, epoch=self.epoch, sample_id=int(self.index.ids[row]),
                                **self.text_options)
        return augment_caption(record, seed=self.seed, epoch=self.epoch, **self.caption_options)

    def _read(self, row: int, image: bool = True) -> tuple[dict | str, Image.Image | None]:
        """The sample's caption record (a dict) — or, without one, its caption text — and image
        (None without `image`); each member checked against its build-time hash."""
        want_image = image
        ix = self.index
        name = ix.shard_names[ix.shard[row]]
        where = f"post {ix.ids[row]} in {name}"
        record = raw_text = None
        post = int(ix.ids[row])

        def check(data: bytes, hashes, ext: str) -> None:  # against the build-time hash
            if hashes is not None:
                check_member(data, int(hashes[row]), name, post, f"{post}.{ext}")

        with open(self.root / name, "rb") as f:
            if ix.json_size[row] >= 0:
                f.seek(ix.json_offset[row])
                raw_json = f.read(ix.json_size[row])
                check(raw_json, ix.json_hash, "json")
                try:
                    record = json.loads(raw_json)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise HakubooruError(f"{where}: its .json record is not valid JSON") from None
            if not _is_record(record) and ix.txt_size is not None and ix.txt_size[row] >= 0:
                f.seek(ix.txt_offset[row])
                raw_text = f.read(ix.txt_size[row])
                check(raw_text, ix.txt_hash, "txt")
            if want_image:
                f.seek(ix.image_offset[row])
                raw_image = f.read(ix.image_size[row])
                check(raw_image, ix.image_hash, ix.ext_names[ix.ext[row]] if ix.ext_names else "image")
        if not _is_record(record):
            record = _caption_text(raw_text, record, where)
        if not want_image:
            return record, None
        try:
            image = Image.open(io.BytesIO(raw_image))
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise HakubooruError(f"{where}: cannot decode its image ({e})") from None
        image = to_rgb(image)  # the index holds the displayed size (EXIF orientation applied)
        if image.size != (ix.width[row], ix.height[row]):
            raise HakubooruError(f"{where}: image is {image.size[0]}x{image.size[1]} but "
                                 f"index.parquet says {ix.width[row]}x{ix.height[row]}")
        return record, image

    def _crop(self, image: Image.Image, bw: int, bh: int, u: float, time_ids: torch.Tensor):
        """Resize to cover the bucket and crop; fill this sample's time ids; return the CHW
        uint8 tensor. torch's antialiased bicubic on uint8 is PIL's BICUBIC filter (within one
        grey level) at a fraction of the time."""
        w, h = image.size
        rw, rh, top, left = crop_box(w, h, bw, bh, random_crop=self.random_crop, u=u)
        resized = F.interpolate(_pixels(image).permute(2, 0, 1)[None], size=(rh, rw),
                                mode="bicubic", antialias=True)
        time_ids.copy_(torch.tensor([h, w, top, left, bh, bw], dtype=torch.float32))
        return resized[0, :3, top:top + bh, left:left + bw]


def dataset_options(cfg: dict) -> dict:
    """The keyword arguments of BatchDataset that a trainer config sets (seed, crop, caption
    augmentation, corrupt members): one mapping for the training loop and the `captions` command."""
    dc = cfg["data"]
    return dict(seed=cfg["train"]["seed"], random_crop=dc["random_crop"], shuffle_tags=dc["shuffle_tags"],
                tag_dropout=dc["tag_dropout"], shuffle_scope=dc["shuffle_scope"], keep_tokens=dc["keep_tokens"],
                keep_separator=dc["keep_separator"] or None, on_corrupt=dc["on_corrupt"])


def _is_record(record) -> bool:
    """A caption record (hakubooru's .json): a dict with every caption group."""
    return isinstance(record, dict) and all(g in record for g in GROUPS)


def _caption_text(raw_text: bytes | None, other_json, where: str) -> str:
    """The caption of a sample without a caption record: its .txt, else a "caption" string in
    its .json (img2dataset writes one), else empty."""
    if raw_text is not None:
        try:
            return raw_text.decode("utf-8")
        except UnicodeDecodeError:
            raise HakubooruError(f"{where}: its .txt caption is not UTF-8 text") from None
    caption = other_json.get("caption") if isinstance(other_json, dict) else None
    return caption if isinstance(caption, str) else ""


def _pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as an (H, W, C) uint8 tensor. Pillow stores RGB as 4 bytes a pixel and
    exports it through Arrow without a copy (C = 4, the 4th byte unused) when the image is one
    memory block; otherwise (very large images) this copies (C = 3)."""
    w, h = image.size
    try:
        hwc = pa.array(image).values.to_numpy(zero_copy_only=True).reshape(h, w, -1)
    except ValueError:
        hwc = np.asarray(image)
    with warnings.catch_warnings():  # both are read-only views; we only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(hwc)


def make_loader(dataset: BatchDataset, start: int = 0, workers: int = 0):
    """An iterable over batches ``start, start+1, …`` of ``dataset`` (a DataLoader with
    ``batch_size=None``: they come collated). Resuming at batch k costs O(1): nothing before k is
    read. A HakubooruError raised in a worker process arrives as its own one line; a worker
    ends at once when this process dies, even by SIGKILL."""
    # forked workers (Linux's default before Python 3.14): their parent is this process, which
    # worker_start checks; under forkserver it would be the server
    context = multiprocessing.get_context("fork") if workers and sys.platform.startswith("linux") else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                                         num_workers=workers, multiprocessing_context=context,
                                         worker_init_fn=functools.partial(_init_worker, os.getpid()))
    return _one_line_errors(loader) if workers else loader


def _init_worker(parent_pid: int, worker_id: int) -> None:
    worker_start(parent_pid)


def _one_line_errors(loader):
    """torch re-raises a worker's exception with the worker's traceback as its message; give a
    HakubooruError back its own message (the traceback's last line, after the class name).
    The workers are forked with the garbage collector's objects frozen: a collection in a
    worker would otherwise write to every tracked object's header and so copy each page of the
    parent's objects into each worker (149 MiB a worker at 5.2M samples, benchmarks/bench_scale.py)."""
    gc.freeze()
    try:
        with forking():
            batches = iter(loader)  # forks the workers
    finally:
        gc.unfreeze()  # this process collects as before; its writes copy pages for it alone
    try:
        yield from batches
    except HakubooruError as e:
        lines = str(e).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught "):
            raise type(e)(lines[-1].split(": ", 1)[-1]) from None
        raise
