"""Training data from a shard folder: the index, the per-epoch batch plan, and a Dataset whose
item i is the whole collated micro-batch i (pixels, augmented captions, SDXL time ids)."""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from hakubooru.errors import HakubooruError
from hakubooru.images import to_rgb
from hakubooru.rng import hash64, hash64_array, uniform
from trainers.lokr.augment import augment_caption
from trainers.lokr.bucketing import assign_buckets, crop_box

# Separate streams for the randomness drawn from the same (seed, epoch, ...).
_ORDER_STREAM = 0x0DE
_BATCH_STREAM = 0xBA7
CROP_STREAM = 0xC0F

INDEX_COLUMNS = ("id", "shard", "image_offset", "image_size", "json_offset", "json_size",
                 "width", "height")


@dataclass
class ShardIndex:
    """The rows of ``index.parquet`` as NumPy columns (row i = sample i, sorted by id)."""

    ids: np.ndarray           # int64
    shard: np.ndarray         # int32 code into shard_names
    shard_names: list[str]
    image_offset: np.ndarray  # int64
    image_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    width: np.ndarray         # int32, stored image
    height: np.ndarray
    fingerprint: str          # identifies the dataset (manifest's, else sha256 of the index)

    def __len__(self) -> int:
        return len(self.ids)


def load_index(shards_dir) -> ShardIndex:
    """Read ``index.parquet`` (and the fingerprint from ``manifest.json``) of a shard folder.
    Raises HakubooruError when the folder, the index, a column or a shard file is missing or
    the index is empty or not sorted by unique id."""
    root = Path(shards_dir)
    path = root / "index.parquet"
    if not root.is_dir():
        raise HakubooruError(f"shard folder {root} does not exist")
    if not path.is_file():
        raise HakubooruError(f"{root} has no index.parquet: is it a shard folder written by "
                             f"`python -m hakubooru build`?")
    try:
        table = pq.read_table(path, columns=list(INDEX_COLUMNS), read_dictionary=["shard"])
    except (pa.ArrowException, OSError) as e:
        raise HakubooruError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise HakubooruError(f"{path} has no samples")
    shard = table.column("shard").combine_chunks()
    names = [str(s) for s in shard.dictionary.to_pylist()]
    absent = [n for n in names if not (root / n).is_file()]
    if absent:
        raise HakubooruError(f"{root}: {len(absent)} shard(s) named in index.parquet are "
                             f"missing, e.g. {absent[0]}")
    col = {c: table.column(c).to_numpy() for c in INDEX_COLUMNS if c != "shard"}
    if np.any(np.diff(col["id"]) <= 0):
        raise HakubooruError(f"{path} is not sorted by unique id")
    return ShardIndex(
        ids=col["id"].astype(np.int64), shard=shard.indices.to_numpy().astype(np.int32),
        shard_names=names,
        **{c: col[c].astype(np.int64) for c in ("image_offset", "image_size", "json_offset",
                                                "json_size")},
        width=col["width"].astype(np.int32), height=col["height"].astype(np.int32),
        fingerprint=_fingerprint(root))


def _fingerprint(root: Path) -> str:
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            fp = json.loads(manifest.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise HakubooruError(f"{manifest} is not a valid JSON object") from None
        if fp:
            return str(fp)
    digest = hashlib.sha256()
    with open(root / "index.parquet", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BatchPlan:
    """The global batches of one epoch: ``plan[i]`` is an int64 array of ``global_batch`` row
    indices, all from bucket ``plan.bucket_of(i)``.

    A pure function of (index ids and sizes, buckets, global_batch, seed, epoch): within each
    bucket the rows are ordered by hash(seed, epoch, id) and cut into batches; the leftover
    rows of each bucket (fewer than a batch) sit out this epoch and are counted in ``dropped``;
    the batches are then ordered by hash(seed, epoch, bucket, batch number). Rank r of W takes
    ``plan[i][r*b:(r+1)*b]`` with b = global_batch / W."""

    def __init__(self, index: ShardIndex, global_batch: int, seed: int, epoch: int, buckets):
        if global_batch <= 0:
            raise HakubooruError(f"batch size must be positive, got {global_batch}")
        if len(buckets) > np.iinfo(np.uint16).max:
            raise HakubooruError(f"too many buckets ({len(buckets)})")
        self.global_batch, self.seed, self.epoch = int(global_batch), int(seed), int(epoch)
        self.buckets = [tuple(map(int, b)) for b in buckets]
        bucket = assign_buckets(index.width, index.height, self.buckets).astype(np.uint16)
        # The hash is a bijection of the (unique) ids, so the keys have no ties and any sort
        # algorithm gives the same order; the stable sort by bucket keeps it (radix sort).
        by_key = np.argsort(hash64_array(hash64(seed, epoch, _ORDER_STREAM), index.ids))
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
        self.dropped = int(len(rows) - self.batches.size)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.batches[i]

    def bucket_of(self, i: int) -> tuple[int, int]:
        """The bucket (w, h) of global batch ``i``."""
        return self.buckets[self.batch_bucket[i]]


class BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is this rank's collated micro-batch of global batch ``i``
    — ``pixel_values`` float32 (b,3,H,W) in [-1,1], ``captions`` list[str] (augmented),
    ``time_ids`` float32 (b,6) = (original h, original w, crop top, crop left, target h,
    target w), ``ids`` int64 (b,). Items are pure functions of ``i``, so any number of
    DataLoader workers, and a resume at any batch, give the same batches."""

    def __init__(self, shards_dir, index: ShardIndex, plan: BatchPlan, *, rank: int = 0,
                 world_size: int = 1, seed: int | None = None, epoch: int | None = None,
                 random_crop: bool = False, shuffle_tags: bool = True, tag_dropout: float = 0.15,
                 protect_quality_year_rating: bool = False, separator: str = ", "):
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
        self.caption_options = dict(shuffle=shuffle_tags, drop=tag_dropout,
                                    protect_quality_year_rating=protect_quality_year_rating,
                                    separator=separator)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict:
        rows = self.plan[i][self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        bw, bh = self.plan.bucket_of(i)
        pixels = torch.empty((len(rows), 3, bh, bw), dtype=torch.float32)
        time_ids = torch.empty((len(rows), 6), dtype=torch.float32)
        captions = []
        for j, row in enumerate(rows):
            record, image = self._read(int(row))
            captions.append(augment_caption(record, seed=self.seed, epoch=self.epoch,
                                            **self.caption_options))
            u = uniform(self.seed, self.epoch, int(self.index.ids[row]), CROP_STREAM)
            pixels[j] = self._crop(image, bw, bh, u, time_ids[j])
        pixels.div_(127.5).sub_(1.0)
        return {"pixel_values": pixels, "captions": captions, "time_ids": time_ids,
                "ids": torch.from_numpy(self.index.ids[rows])}

    def _read(self, row: int) -> tuple[dict, Image.Image]:
        ix = self.index
        name = ix.shard_names[ix.shard[row]]
        where = f"post {ix.ids[row]} in {name}"
        with open(self.root / name, "rb") as f:
            f.seek(ix.json_offset[row])
            raw_json = f.read(ix.json_size[row])
            f.seek(ix.image_offset[row])
            raw_image = f.read(ix.image_size[row])
        try:
            record = json.loads(raw_json)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HakubooruError(f"{where}: its .json record is not valid JSON") from None
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
    """A DataLoader over batches ``start, start+1, …`` of ``dataset`` (already collated, so
    ``batch_size=None``). Resuming at batch k costs O(1): nothing before k is read."""
    return torch.utils.data.DataLoader(dataset, batch_size=None,
                                       sampler=range(start, len(dataset)),
                                       num_workers=workers)
