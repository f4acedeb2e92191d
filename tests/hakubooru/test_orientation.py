"""EXIF orientation, end to end: a pass-through JPEG whose EXIF says "rotate 90° clockwise" is
indexed, bucketed, cropped and given time ids by its displayed size, the pixels trained.

The image: stored 1600x1200 (landscape), left half red, right half blue, Orientation=6. Shown,
it is 1200x1600 (portrait) with red on top and blue below. Hand-derived with the 1024² buckets:
aspect 1200/1600 = 0.75 is nearest 896x1152 (|log .75 - log .778| = .036, next 832x1216 .092);
scaled to cover it: width 896, height round(1600 * 896 / 1200) = 1195, 43 rows over, 21 cropped
off the top (centre crop). Time ids: (1600, 1200, 21, 0, 1152, 896).
"""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from hakubooru.builder import build_shards
from hakubooru.db import open_db
from hakubooru.images import ImagePolicy, prepare
from hakubooru.selector import Selector
from tests.helpers.archives import archive_members
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.data.batches import BatchDataset, BatchPlan
from trainers.lokr.data.index import load_index

RED, BLUE = (230, 20, 20), (20, 20, 230)


def rotated_jpeg(fmt: str = "JPEG") -> bytes:
    im = Image.new("RGB", (1600, 1200), RED)
    im.paste(BLUE, (800, 0, 1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    im.save(out, fmt, quality=90, exif=exif)
    return out.getvalue()


def test_pass_through_records_the_displayed_size():
    data = rotated_jpeg()
    stored = prepare(data, "jpg", ImagePolicy())
    assert stored.data == data  # bytes untouched
    assert (stored.width, stored.height) == (1200, 1600)


def test_pass_through_webp_with_exif_records_the_displayed_size():
    stored = prepare(rotated_jpeg("WEBP"), "webp", ImagePolicy())
    assert (stored.width, stored.height) == (1200, 1600)


@pytest.fixture(scope="module")
def rotated_shards(synth_demo, tmp_path_factory):
    db_path, images = synth_demo
    post_id = sorted(archive_members(images))[0]
    tmp = tmp_path_factory.mktemp("orientation")
    (tmp / "images").mkdir()
    data = rotated_jpeg()
    with tarfile.open(tmp / "images" / "rotated.tar", "w") as tar:
        info = tarfile.TarInfo(f"{post_id}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    Selector.ids([post_id]).save(tmp / "sel.parquet", open_db(db_path))
    out = tmp / "shards"
    result = build_shards(db_path, tmp / "images", tmp / "sel.parquet", out,
                          cache_dir=tmp / "cache", progress=False)
    assert result.written == 1
    return out


def test_index_and_record_hold_the_displayed_size(rotated_shards):
    row = pq.read_table(rotated_shards / "index.parquet").to_pylist()[0]
    assert (row["width"], row["height"], row["ext"]) == (1200, 1600, "jpg")
    shard = (rotated_shards / row["shard"]).read_bytes()
    record = json.loads(shard[row["json_offset"]:row["json_offset"] + row["json_size"]])
    assert (record["width"], record["height"]) == (1200, 1600)


def test_bucket_crop_and_time_ids_follow_the_pixels_trained(rotated_shards):
    index = load_index(rotated_shards)
    plan = BatchPlan(index, 1, seed=0, epoch=0, buckets=make_buckets(1024 * 1024))
    assert plan.bucket_of(0) == (896, 1152)
    batch = BatchDataset(rotated_shards, index, plan)[0]
    assert batch["time_ids"].tolist() == [[1600.0, 1200.0, 21.0, 0.0, 1152.0, 896.0]]
    pixels = batch["pixel_values"][0]
    assert pixels.shape == (3, 1152, 896)
    # red on top, blue below: the rotation was applied before the crop
    top, bottom = pixels[:, :500].mean(dim=(1, 2)), pixels[:, -500:].mean(dim=(1, 2))
    assert top[0] > 0.7 and top[2] < -0.7
    assert bottom[2] > 0.7 and bottom[0] < -0.7
