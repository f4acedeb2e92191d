"""Small shard folders in the exact format of docs/architecture.md "Shard folder", for tests.

Until (and beside) the real shard builder, trainer tests need a few dozen real samples:
real tars written by webdataset's TarWriter, an ``index.parquet`` with the members' data
offsets read back from the tar, and a ``manifest.json`` with a fingerprint.

The images carry a learnable signal: the sample's first keep tag (its "class") decides the
image's colour and shape, so a model conditioned on the caption can learn it.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw

from hakubooru.manifest import FORMAT, INDEX_SCHEMA
from hakubooru.rng import generator
from hakubooru.shardwriter import CHECKSUM, file_checksum, member_hash

# First keep tag -> (RGB colour, shape). Learnable: the caption names the picture.
CLASSES = {
    "1girl": ((220, 40, 40), "circle"),
    "1boy": ((40, 80, 220), "square"),
    "1other": ((40, 180, 60), "triangle"),
    "no humans": ((230, 200, 40), "stripes"),
}
GENERAL = ["smile", "long hair", "short hair", "looking at viewer", "outdoors", "sky", "tree",
           "hat", "open mouth", "blush", "dress", "holding", "flower", "cloud", "water", "^_^"]
META = ["highres", "absurdres", "lowres"]
QUALITY = ["masterpiece", "best quality", "great quality", "good quality", "normal quality",
           "low quality", "worst quality"]
YEARS = {"old": 2008, "early": 2012, "mid": 2016, "recent": 2019, "newest": 2022}
RATINGS = {"general": ["safe"], "sensitive": ["sensitive"], "questionable": ["nsfw"],
           "explicit": ["nsfw", "explicit"]}


@dataclass
class ShardSet:
    """What make_test_shards wrote: the folder, the sample ids (sorted) and their records."""

    dir: Path
    ids: np.ndarray
    records: dict[int, dict]


def _image(cls: str, w: int, h: int, learnable: bool, rng: np.random.Generator) -> Image.Image:
    if not learnable:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    colour, shape = CLASSES[cls]
    img = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(img)
    m = min(w, h) // 6
    if shape == "circle":
        d.ellipse([m, m, w - m, h - m], fill=colour)
    elif shape == "square":
        d.rectangle([m, m, w - m, h - m], fill=colour)
    elif shape == "triangle":
        d.polygon([(w // 2, m), (w - m, h - m), (m, h - m)], fill=colour)
    else:
        for y in range(0, h, max(2, h // 8)):
            d.rectangle([0, y, w, y + max(1, h // 16)], fill=colour)
    return img


def _record(post_id: int, cls: str, w: int, h: int, rng: np.random.Generator) -> dict:
    rating = list(RATINGS)[int(rng.integers(len(RATINGS)))]
    year_tag = list(YEARS)[int(rng.integers(len(YEARS)))]
    extra_keep = ["hatsune miku", "vocaloid"] if rng.random() < 0.5 else ["original"]
    general = sorted(rng.choice(GENERAL, size=int(rng.integers(3, 9)), replace=False).tolist())
    return {
        "id": post_id,
        "width": w,
        "height": h,
        "rating": rating,
        "score": int(rng.integers(0, 100)),
        "fav_count": int(rng.integers(0, 200)),
        "created_at": f"{YEARS[year_tag]}-06-01T12:00:00.000+00:00",
        "keep": [cls] + extra_keep,
        "general": general,
        "meta": [META[int(rng.integers(len(META)))]],
        "quality": [QUALITY[int(rng.integers(len(QUALITY)))]],
        "year": [year_tag],
        "rating_tags": list(RATINGS[rating]),
    }


def _caption(r: dict) -> str:
    return ", ".join(r["keep"] + r["general"] + r["quality"] + r["year"] + r["meta"] + r["rating_tags"])


def _encode(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "webp":
        img.save(buf, format="WEBP", quality=90, method=0)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shard_folder(dir, samples, ext: str = "png", per_shard: int = 16) -> Path:
    """Write ``samples`` — ``(record, image_bytes)`` pairs in id order, the record holding
    ``id``, ``width``, ``height`` and the caption groups — as ``shard-NNNNNN.tar`` files (via
    webdataset's TarWriter) + ``index.parquet`` (data offsets read back from the tars, member
    hashes) + ``manifest.json`` (shard sizes and checksums, fingerprint) into ``dir``."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in INDEX_SCHEMA.names}
    shards = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        name = f"shard-{s:06d}.tar"
        chunk = samples[start:start + per_shard]
        with open(out / name, "wb") as f:
            writer = wds.TarWriter(f, mtime=0)
            for rec, image in chunk:
                writer.write({"__key__": str(rec["id"]), ext: image,
                              "json": json.dumps(rec).encode(), "txt": _caption(rec).encode()})
            writer.close()
        with tarfile.open(out / name) as tar:
            members = {m.name: m for m in tar.getmembers()}
            data = {m.name: tar.extractfile(m).read() for m in members.values()}
        for rec, _ in chunk:
            rows["id"].append(rec["id"])
            rows["shard"].append(name)
            for col, suffix in (("image", ext), ("txt", "txt"), ("json", "json")):
                m = members[f"{rec['id']}.{suffix}"]
                rows[f"{col}_offset"].append(m.offset_data)
                rows[f"{col}_size"].append(m.size)
                rows[f"{col}_xxh3"].append(member_hash(data[m.name]))
            rows["width"].append(rec["width"])
            rows["height"].append(rec["height"])
            rows["ext"].append(ext)
        shards.append({"name": name, "samples": len(chunk), "size": (out / name).stat().st_size,
                       CHECKSUM: file_checksum(out / name)})
    pq.write_table(pa.table(rows, schema=INDEX_SCHEMA), out / "index.parquet")
    fp = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
    manifest = {"format": FORMAT, "fingerprint": fp, "counts": {"written": len(samples)},
                "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def make_test_shards(dir, n: int = 64, seed: int = 0, sizes=((64, 64), (96, 64), (64, 96)),
                     learnable: bool = True, per_shard: int = 16, ext: str = "png") -> ShardSet:
    """Write ``n`` samples as ``shard-NNNNNN.tar`` + ``index.parquet`` + ``manifest.json`` into
    ``dir``. Sample ``i`` has size ``sizes[i % len(sizes)]`` and class ``list(CLASSES)[i % 4]``
    (its first keep tag, which decides the picture when ``learnable``); everything else derives
    from ``seed``. Same arguments give byte-identical files."""
    rng = generator(seed, 0x5A4D)
    ids = np.sort(rng.choice(np.arange(1, 20 * n + 1), size=n, replace=False)).astype(np.int64)
    classes = list(CLASSES)
    samples = []
    for i, pid in enumerate(ids.tolist()):
        w, h = sizes[i % len(sizes)]
        srng = generator(seed, pid)
        cls = classes[i % len(classes)]
        rec = _record(pid, cls, w, h, srng)
        samples.append((rec, _encode(_image(cls, w, h, learnable, srng), ext)))
    out = write_shard_folder(dir, samples, ext=ext, per_shard=per_shard)
    return ShardSet(out, ids, {rec["id"]: rec for rec, _ in samples})
