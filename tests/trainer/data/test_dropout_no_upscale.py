"""Caption dropout (whole caption → empty prompt, from (seed, id, step)) and no-upscale buckets
(an image smaller than the bucket area gets a bucket inside it), by hand and in a tiny run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hakubooru.rng import uniform
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.data.bucketing import assign_buckets, assign_no_upscale, config_buckets, make_buckets
from trainers.lokr.data.caption_dropout import CAPTION_DROPOUT_STREAM, drop_captions
from trainers.lokr.train import setup, train


def test_caption_dropout_draws_per_seed_id_and_step():
    ids = torch.arange(1, 2001)
    captions = [f"tag{i}" for i in range(2000)]
    assert drop_captions(captions, ids, seed=3, micro_step=5, rate=0.0) == captions
    assert drop_captions(captions, ids, seed=3, micro_step=5, rate=1.0) == [""] * 2000
    got = drop_captions(captions, ids, seed=3, micro_step=5, rate=0.25)
    # sample i is dropped iff uniform(seed, micro step, id, stream) < rate
    expected = ["" if uniform(3, 5, i, 0xDC0) < 0.25 else f"tag{i - 1}" for i in range(1, 2001)]
    assert CAPTION_DROPOUT_STREAM == 0xDC0 and got == expected
    assert 0.22 < got.count("") / 2000 < 0.28
    # a sample's draw does not depend on its neighbours; another step draws anew
    assert drop_captions(captions[7:8], ids[7:8], seed=3, micro_step=5, rate=0.25) == got[7:8]
    assert drop_captions(captions, ids, seed=3, micro_step=6, rate=0.25) != got


def test_no_upscale_by_hand():
    buckets = make_buckets()  # 1024², sides 256–4096, step 64
    w, h = np.array([500, 2000, 1230]), np.array([700, 2000, 840])
    out, idx = assign_no_upscale(w, h, buckets, area=1024 ** 2, min_side=256, max_side=4096, step=64)
    # 500×700 (ratio 0.714) would go to 832×1216 (ratio 0.684), enlarged ×1.74. Its own size,
    # √350000 = 591.6 → the 576² set: nearest ratio there is 512×640 (0.8; |ln .714 − ln .8| = 0.113
    # against 448×704's 0.116), which is wider than 500: next, the 512² set, where 448×576 (0.778,
    # 262144 // 448 = 585 → 576) is nearest and fits inside 500×700.
    assert out[idx[0]] == (448, 576)
    # 2000² has more than the bucket area: scaled down as usual. 1230×840 (1 033 200 px < 1024²)
    # keeps its usual bucket 1216×832 (ratio 1.4615 against its 1.464), which already fits inside it
    usual = [buckets[i] for i in assign_buckets(w, h, buckets)]
    assert out[idx[1]] == usual[1] == (1024, 1024)
    assert out[:len(buckets)] == buckets  # the usual buckets first, the smaller ones after
    assert out[idx[2]] == usual[2] == (1216, 832)


def test_no_upscale_buckets_fit_inside_their_images():
    rng = np.random.default_rng(0)
    w, h = rng.integers(256, 1400, 3000), rng.integers(256, 1400, 3000)
    dc = {"resolution": 1024, "bucket_min": 256, "bucket_max": 4096, "bucket_step": 64, "bucket_no_upscale": True}
    out, idx = config_buckets(dc, w, h)
    b = np.asarray(out)[idx]
    small = w * h < 1024 ** 2
    assert ((b[small, 0] <= w[small]) & (b[small, 1] <= h[small])).all()
    usual, uidx = config_buckets({**dc, "bucket_no_upscale": False}, w, h)
    assert (idx[~small] == uidx[~small]).all()  # large images: as before (scaled down)
    ladder = {b for s in range(960, 255, -64) for b in make_buckets(area=s * s, min_side=256, step=64)}
    assert set(out[len(usual):]) <= ladder  # the extra buckets come from the ladder's sets, shared


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("small"), n=8, sizes=((40, 40), (48, 72))).dir


def test_a_run_puts_small_images_in_buckets_that_fit(small_shards, tmp_path):
    # tiny: 64² area, sides 32–128 step 32. 40×40 and 48×72 would be enlarged into 64×64; their own
    # sizes (√1600 = 40, √3456 = 58.8) fall to the 32² set, whose only bucket is 32×32
    run = setup(load_config("tiny", ["data.bucket_no_upscale=true"]), small_shards, tmp_path / "a")
    assert {run.plan(0).bucket_of(i) for i in range(len(run.plan(0)))} == {(32, 32)}
    run = setup(load_config("tiny"), small_shards, tmp_path / "b")
    assert {run.plan(0).bucket_of(i) for i in range(len(run.plan(0)))} == {(64, 64)}


@pytest.mark.slow
def test_caption_dropout_and_no_upscale_train(small_shards, tmp_path):
    base = ["train.max_steps=2", "data.bucket_no_upscale=true"]
    train(load_config("tiny", base), small_shards, tmp_path / "plain")
    train(load_config("tiny", base + ["data.caption_dropout=1.0"]), small_shards, tmp_path / "uncond")
    plain, uncond = ([json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                     for r in ("plain", "uncond"))
    assert plain[0] != uncond[0]  # the first step's text conditioning differs: the captions were dropped
    with safe_open(tmp_path / "uncond" / "lokr.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_caption_dropout_rate"] == "1.0" and meta["ss_bucket_no_upscale"] == "True"
