"""Index reader, batch plan and BatchDataset on real shard folders (tests/helpers/shards.py)."""
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from hakubooru.errors import HakubooruError
from hakubooru.rng import uniform
from hakubooru.shardwriter import member_hash
from tests.helpers.shards import make_test_shards
from trainers.lokr.data.augment import augment_caption
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.data.batches import CROP_STREAM, BatchDataset, BatchPlan, make_loader
from trainers.lokr.data.index import ShardIndex, load_index

# make_buckets(64*64, 32, 128, 16), written out: (64,64) images go to (64,64); 96x64
# (ln 1.5 = 0.405) to (80,48) (ln 1.667 = 0.511, 0.105 away; the square is 0.405 away);
# 64x96 to (48,80).
BUCKETS = [(32, 128), (32, 112), (32, 96), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32),
           (128, 32)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("shards"), n=64, seed=0)


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory):
    """Noise pictures, so that a crop one pixel off shows in the pixels."""
    return make_test_shards(tmp_path_factory.mktemp("noise"), n=8, seed=1,
                            sizes=[(200, 100), (100, 200)], learnable=False)


def test_shardfactory_folder_reads_with_webdataset(shards):
    names = sorted(p.name for p in shards.dir.glob("shard-*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    samples = list(wds.WebDataset([str(shards.dir / n) for n in names], shardshuffle=False))
    assert [int(s["__key__"]) for s in samples] == shards.ids.tolist()
    first = samples[0]
    assert json.loads(first["json"]) == shards.records[int(shards.ids[0])]
    r = shards.records[int(shards.ids[0])]
    assert first["txt"].decode() == ", ".join(r["keep"] + r["general"] + r["quality"] + r["year"]
                                              + r["meta"] + r["rating_tags"])


def test_load_index(shards):
    ix = load_index(shards.dir)
    assert len(ix) == 64
    assert ix.ids.tolist() == shards.ids.tolist()
    assert ix.ids.dtype == np.int64
    assert ix.width.tolist() == [shards.records[i]["width"] for i in shards.ids.tolist()]
    assert ix.fingerprint == json.loads((shards.dir / "manifest.json").read_text())["fingerprint"]
    # the offsets point at the members' data
    row = 10
    with open(shards.dir / ix.shard_names[ix.shard[row]], "rb") as f:
        f.seek(ix.json_offset[row])
        assert json.loads(f.read(ix.json_size[row]))["id"] == ix.ids[row]


def test_load_index_errors(shards, tmp_path):
    with pytest.raises(HakubooruError, match="does not exist"):
        load_index(tmp_path / "nope")
    with pytest.raises(HakubooruError, match="no index.parquet"):
        load_index(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(shards.dir, folder)
    (folder / "shard-000002.tar").unlink()
    with pytest.raises(HakubooruError, match="shard-000002.tar"):
        load_index(folder)
    table = pq.read_table(shards.dir / "index.parquet")
    pq.write_table(table.drop_columns(["image_offset"]), folder / "index.parquet")
    with pytest.raises(HakubooruError, match="cannot read"):
        load_index(folder)
    shutil.copy(shards.dir / "shard-000002.tar", folder)
    pq.write_table(table.take(list(range(63, -1, -1))), folder / "index.parquet")
    with pytest.raises(HakubooruError, match="not sorted"):
        load_index(folder)
    (folder / "index.parquet").write_bytes(b"not parquet")
    with pytest.raises(HakubooruError, match="cannot read"):
        load_index(folder)


def test_plan_one_bucket_per_batch_no_repeats(shards):
    ix = load_index(shards.dir)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    # Sizes cycle (64,64), (96,64), (64,96) over 64 samples: 22, 21, 21 per bucket.
    # Batches of 4: 5 + 5 + 5 = 15 batches; leftovers 2 + 1 + 1 = 4 dropped.
    assert len(plan) == 15 and plan.dropped == 4
    seen = np.concatenate([plan[i] for i in range(len(plan))])
    assert len(seen) == len(set(seen.tolist())) == 60
    for i in range(len(plan)):
        rows = plan[i]
        assert rows.dtype == np.int64 and len(rows) == 4
        sizes = {(int(ix.width[r]), int(ix.height[r])) for r in rows}
        expected = {(64, 64): (64, 64), (96, 64): (80, 48), (64, 96): (48, 80)}
        assert len(sizes) == 1 and expected[sizes.pop()] == plan.bucket_of(i)
    assert sorted(plan.bucket_of(i) for i in range(15)) == sorted([(48, 80)] * 5 + [(64, 64)] * 5
                                                                  + [(80, 48)] * 5)


def test_plan_is_pure_and_epoch_dependent(shards):
    ix = load_index(shards.dir)
    a = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    b = BatchPlan(load_index(shards.dir), 4, seed=0, epoch=0, buckets=BUCKETS)
    assert np.array_equal(a.batches, b.batches)
    assert [a.bucket_of(i) for i in range(len(a))] == [b.bucket_of(i) for i in range(len(b))]
    for other in (BatchPlan(ix, 4, seed=0, epoch=1, buckets=BUCKETS),
                  BatchPlan(ix, 4, seed=1, epoch=0, buckets=BUCKETS)):
        assert len(other) == len(a)
        assert not np.array_equal(other.batches, a.batches)
        # different groupings too, not just a different batch order
        assert {frozenset(x.tolist()) for x in other.batches} != {frozenset(x.tolist()) for x in a.batches}


@pytest.mark.slow
def test_plan_on_five_million_rows():
    n = 5_000_000
    rng = np.random.default_rng(0)
    sizes = np.array([(1024, 1024), (2000, 1000), (1000, 1500), (2300, 1700)], dtype=np.int32)
    pick = rng.integers(0, len(sizes), n)
    zeros = np.zeros(n, dtype=np.int64)
    ix = ShardIndex(ids=np.arange(1, n + 1, dtype=np.int64) * 3, shard=np.zeros(n, np.int32),
                    shard_names=["shard-000000.tar"], image_offset=zeros, image_size=zeros,
                    json_offset=zeros, json_size=zeros, width=sizes[pick, 0],
                    height=sizes[pick, 1], fingerprint="synthetic")
    plan = BatchPlan(ix, 16, seed=0, epoch=0, buckets=make_buckets())
    # 4 sizes -> 4 buckets; each bucket drops (count mod 16) rows, so 0..60 in all.
    counts = np.bincount(pick, minlength=4)
    assert plan.dropped == int((counts % 16).sum())
    assert len(plan) == int((counts // 16).sum())
    assert np.bincount(plan.batches.ravel(), minlength=n).max() == 1  # no row twice
    w = ix.width[plan.batches]
    assert (w == w[:, :1]).all()  # one bucket (here: one size) per batch


def test_dataset_batches(shards):
    ix = load_index(shards.dir)
    plan = BatchPlan(ix, 4, seed=5, epoch=2, buckets=BUCKETS)
    ds = BatchDataset(shards.dir, ix, plan, seed=5, epoch=2)
    assert len(ds) == len(plan)
    for i in range(len(ds)):
        item = ds[i]
        bw, bh = plan.bucket_of(i)
        px = item["pixel_values"]
        assert px.dtype == torch.float32 and px.shape == (4, 3, bh, bw)
        assert px.min() >= -1 and px.max() <= 1
        assert item["ids"].dtype == torch.int64
        assert item["ids"].tolist() == ix.ids[plan[i]].tolist()
        assert item["captions"] == [augment_caption(shards.records[p], seed=5, epoch=2)
                                    for p in item["ids"].tolist()]
        assert item["time_ids"].dtype == torch.float32 and item["time_ids"].shape == (4, 6)
        for p, t in zip(item["ids"].tolist(), item["time_ids"].tolist()):
            r = shards.records[p]
            # 64x64 -> 64x64 bucket: no crop. 96x64 -> 80x48: 96·48 < 80·64, relatively
            # taller, scale 80/96 -> 80 x round(53.3) = 53, 5 rows over, centre top 2.
            # 64x96 -> 48x80: 64·80 > 48·96, relatively wider -> 53 x 80, left 2.
            crop = {(64, 64): (0, 0), (96, 64): (2, 0), (64, 96): (0, 2)}[(r["width"], r["height"])]
            assert t == [r["height"], r["width"], *crop, bh, bw]
    # the learnable signal survives: 1girl pictures are a red disc on grey (centre pixel red)
    item = ds[0]
    for p, img in zip(item["ids"].tolist(), item["pixel_values"]):
        if shards.records[p]["keep"][0] == "1girl":
            r, g, b = ((img[:, img.shape[1] // 2, img.shape[2] // 2] + 1) * 127.5).tolist()
            assert abs(r - 220) < 3 and abs(g - 40) < 3 and abs(b - 40) < 3


def _original(folder, ix, row):
    with open(folder / ix.shard_names[ix.shard[row]], "rb") as f:
        f.seek(ix.image_offset[row])
        return Image.open(io.BytesIO(f.read(ix.image_size[row]))).convert("RGB")


@pytest.mark.parametrize("random_crop", [False, True])
def test_crop_offsets_in_time_ids_and_pixels(noise_shards, random_crop):
    ix = load_index(noise_shards.dir)
    plan = BatchPlan(ix, 1, seed=3, epoch=1, buckets=[(64, 48), (48, 64)])
    ds = BatchDataset(noise_shards.dir, ix, plan, random_crop=random_crop)
    for i in range(len(ds)):
        item = ds[i]
        row = int(plan[i][0])
        pid = int(ix.ids[row])
        w, h = int(ix.width[row]), int(ix.height[row])
        # 200x100 into 64x48 (ratio 2 vs 1.33: wider): scale 48/100 -> 96 x 48, 32 columns
        # over. 100x200 into 48x64: 48 x 96, 32 rows over. Centre offset 16; random offset
        # ⌊u·33⌋ with u from (seed 3, epoch 1, post id, crop stream).
        offset = int(uniform(3, 1, pid, CROP_STREAM) * 33) if random_crop else 16
        top, left = (0, offset) if w > h else (offset, 0)
        bw, bh = (64, 48) if w > h else (48, 64)
        assert item["time_ids"][0].tolist() == [h, w, top, left, bh, bw]
        # and the pixels are that crop of the resized picture (PIL bicubic as reference)
        rw, rh = (96, 48) if w > h else (48, 96)
        ref = np.asarray(_original(noise_shards.dir, ix, row).resize((rw, rh), Image.Resampling.BICUBIC))
        ref = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
        got = item["pixel_values"][0]
        assert (got - ref[:, top:top + bh, left:left + bw]).abs().max() <= 1.01 / 127.5
        step = 1 if offset < 32 else -1
        dy, dx = (0, step) if w > h else (step, 0)
        shifted = ref[:, top + dy:top + dy + bh, left + dx:left + dx + bw]
        assert (got - shifted).abs().mean() > 0.1  # one pixel off would show


def test_workers_and_resume_give_identical_batches(shards):
    ix = load_index(shards.dir)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    ds = BatchDataset(shards.dir, ix, plan, random_crop=True)
    serial = list(make_loader(ds, workers=0))
    parallel = list(make_loader(ds, workers=2))
    resumed = list(make_loader(ds, start=11, workers=2))
    assert len(serial) == len(parallel) == 15 and len(resumed) == 4
    for a, b in zip(serial, parallel):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["time_ids"], b["time_ids"]) and torch.equal(a["ids"], b["ids"])
        assert a["captions"] == b["captions"]
    for a, b in zip(serial[11:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]


class _FreezeReport(BatchDataset):
    def __getitem__(self, i):
        import gc
        return {"frozen_in_worker": gc.get_freeze_count()}


def test_workers_start_with_the_parents_objects_frozen(shards):
    """Forked workers inherit the parent's objects in the collector's permanent generation (so
    a collection in a worker does not write to them and copy their pages); the parent itself
    collects as before once they are started."""
    import gc

    ix = load_index(shards.dir)
    ds = _FreezeReport(shards.dir, ix, BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS))
    batches = make_loader(ds, workers=1)
    first = next(iter(batches))
    assert first["frozen_in_worker"] > 1000 and gc.get_freeze_count() == 0
    batches.close()


def test_ranks_split_each_global_batch(shards):
    ix = load_index(shards.dir)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    whole = BatchDataset(shards.dir, ix, plan)
    halves = [BatchDataset(shards.dir, ix, plan, rank=r, world_size=2) for r in (0, 1)]
    for i in (0, 7):
        a, b0, b1 = whole[i], halves[0][i], halves[1][i]
        assert b0["ids"].tolist() == a["ids"][:2].tolist() and b1["ids"].tolist() == a["ids"][2:].tolist()
        assert torch.equal(torch.cat([b0["pixel_values"], b1["pixel_values"]]), a["pixel_values"])
        assert b0["captions"] + b1["captions"] == a["captions"]
    with pytest.raises(HakubooruError, match="does not split"):
        BatchDataset(shards.dir, ix, plan, rank=0, world_size=3)
    with pytest.raises(HakubooruError, match="rank 2"):
        BatchDataset(shards.dir, ix, plan, rank=2, world_size=2)


def _rehash(folder, column, row, data):
    """index.parquet with ``column`` of ``row`` set to member_hash(data): damage the index cannot see."""
    table = pq.read_table(folder / "index.parquet")
    values = table.column(column).to_pylist()
    values[row] = member_hash(data)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column,
                                    pa.array(values, pa.uint64())), folder / "index.parquet")


def test_undecodable_image_is_a_clear_error(shards, tmp_path):
    # bytes that pass the member hash (recorded from them) but are not an image: a builder bug
    folder = tmp_path / "copy"
    shutil.copytree(shards.dir, folder)
    ix = load_index(folder)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    row = int(plan[0][1])
    zeros = b"\0" * int(ix.image_size[row])
    with open(folder / ix.shard_names[ix.shard[row]], "r+b") as f:
        f.seek(ix.image_offset[row])
        f.write(zeros)
    _rehash(folder, "image_xxh3", row, zeros)
    with pytest.raises(HakubooruError, match=f"post {ix.ids[row]} in shard-.*cannot decode"):
        BatchDataset(folder, load_index(folder), plan)[0]
    assert tarfile.is_tarfile(folder / ix.shard_names[ix.shard[row]])


def test_index_size_mismatch_and_bad_record_are_clear_errors(shards, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shards.dir, folder)
    table = pq.read_table(folder / "index.parquet")
    ix = load_index(folder)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    row = int(plan[0][0])
    widths = table.column("width").to_pylist()
    widths[row] += 1
    pq.write_table(table.set_column(table.schema.get_field_index("width"), "width",
                                    pa.array(widths, pa.int32())), folder / "index.parquet")
    wrong = load_index(folder)
    with pytest.raises(HakubooruError, match=f"post {ix.ids[row]} .*index.parquet says"):
        BatchDataset(folder, wrong, plan)[0]
    shard = folder / ix.shard_names[ix.shard[row]]
    with open(shard, "r+b") as f:
        f.seek(ix.json_offset[row])
        f.write(b"x")  # the record began with "{"
        f.seek(ix.json_offset[row])
        record = f.read(ix.json_size[row])
    pq.write_table(table, folder / "index.parquet")
    _rehash(folder, "json_xxh3", row, record)
    with pytest.raises(HakubooruError, match=f"post {ix.ids[row]} .*not valid JSON"):
        BatchDataset(folder, load_index(folder), plan)[0]


def test_dataset_inputs_by_name_options_by_keyword_and_rank_range(shards):
    """BatchDataset(shards_dir, index, plan, *, rank=..., ...): the three inputs may be given by
    name, the options only by keyword; rank must lie in 0 .. world_size - 1 (-1 is refused)."""
    ix = load_index(shards.dir)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    by_name = BatchDataset(shards_dir=shards.dir, index=ix, plan=plan)
    assert by_name[0]["ids"].tolist() == ix.ids[plan[0]].tolist()
    with pytest.raises(TypeError):
        BatchDataset(shards.dir, ix, plan, 0)
    with pytest.raises(HakubooruError, match="rank -1 is not in a world of size 2"):
        BatchDataset(shards.dir, ix, plan, rank=-1, world_size=2)


def test_caption_text_without_a_record_is_the_txt(tmp_path):
    """A webdataset folder of image + .txt members only (no .json record), indexed by
    `python -m hakubooru index`: each sample's caption is its .txt (no shuffle, no dropout)."""
    from hakubooru.wdsindex import index_webdataset

    root = tmp_path / "txt_only"
    root.mkdir()
    texts = {i: f"tag{i}, sky, tree" for i in range(4)}
    with wds.TarWriter(str(root / "part-a.tar")) as sink:
        for i, text in texts.items():
            png = io.BytesIO()
            Image.new("RGB", (64, 64), (10 * i, 20, 30)).save(png, "PNG")
            sink.write({"__key__": f"pic_{i}", "png": png.getvalue(), "txt": text})
    index_webdataset(root, progress=False)
    ix = load_index(root)
    plan = BatchPlan(ix, 4, seed=0, epoch=0, buckets=BUCKETS)
    item = BatchDataset(root, ix, plan, shuffle_tags=False, tag_dropout=0.0)[0]
    # free-form keys get ids 0..3 in key order
    assert sorted(zip(item["ids"].tolist(), item["captions"])) == sorted(texts.items())


def test_image_larger_than_one_pillow_block_is_read(tmp_path):
    """A decoded image over Pillow's 16 MiB allocation block (2100 x 2100 x 4 bytes = 17.6 MB)
    is not one memory block, so its pixels are copied instead of shared: the crop is still
    PIL's bicubic resize of the picture (within one grey level), here 2100² -> the 64² bucket."""
    big = make_test_shards(tmp_path / "big", n=1, sizes=[(2100, 2100)])
    ix = load_index(big.dir)
    plan = BatchPlan(ix, 1, seed=0, epoch=0, buckets=[(64, 64)])
    got = BatchDataset(big.dir, ix, plan)[0]["pixel_values"][0]
    ref = np.asarray(_original(big.dir, ix, 0).resize((64, 64), Image.Resampling.BICUBIC))
    ref = torch.from_numpy(ref.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (got - ref).abs().max() <= 1.01 / 127.5
