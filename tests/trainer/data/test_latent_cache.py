"""The latent cache: chunks and time ids by hand, latents equal to the VAE's, byte-identical
resume after a kill and across 2 ranks, refusals, and training from it = training from images."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
import torch
from PIL import Image
from safetensors.torch import load_file

from hakubooru.errors import HakubooruError
from tests.helpers import REPO, free_port
from tests.helpers.shards import make_test_shards
from trainers.lokr.data.latent_cache_build import KILL_AFTER_CHUNKS_ENV, build_cache
from trainers.lokr.config import load_config
from trainers.lokr.data.index import load_index
from trainers.lokr.sdxl.model import tiny_sdxl
from trainers.lokr.train import train

# 20 samples of sizes 64x64, 96x64, 128x32 in turn. Tiny buckets (area 64², sides 32–128, step 32):
# (32,128) (32,96) (64,64) (96,32) (128,32). 96x64 (ln 1.5 = 0.41) is nearer 64x64 (0) than 96x32
# (ln 3 = 1.10), so 14 samples go to 64x64 and the 6 of 128x32 to 128x32. Chunks of 4, buckets
# in their listed order: 64x64 -> 4, 4, 4, 2; 128x32 -> 4, 2.
SIZES = ((64, 64), (96, 64), (128, 32))
CHUNKS = [(4, (64, 64)), (4, (64, 64)), (4, (64, 64)), (2, (64, 64)), (4, (128, 32)), (2, (128, 32))]
BUILD = dict(chunk_size=4, batch_size=3)
CLI_BUILD = ["--config", "tiny", "--chunk-size", "4", "--batch-size", "3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("cache_shards"), n=20, sizes=SIZES).dir


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted fp32 build, in this process."""
    out = tmp_path_factory.mktemp("ref") / "latents"
    r = build_cache(load_config("tiny"), shards, out, dtype="fp32", **BUILD)
    assert r["complete"] and r["encoded_chunks"] == 6
    return out


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args, env_extra=None, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **(env_extra or {}))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "trainers.lokr.cache", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_chunks_time_ids_and_latents_by_hand(shards, reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [(f["samples"]) for f in manifest["files"]] == [n for n, _ in CHUNKS]
    assert manifest["dtype"] == "fp32" and manifest["crop"] == "centre" and manifest["samples"] == 20
    assert manifest["buckets"] == {"resolution": 64, "bucket_min": 32, "bucket_max": 128, "bucket_step": 32}
    index = load_index(shards)
    vae = tiny_sdxl(seed=0).vae.eval()
    seen = 0
    for k, (n, (bw, bh)) in enumerate(CHUNKS):
        chunk = load_file(reference / f"latents-{k:06d}.safetensors")
        assert chunk["mean"].shape == (n, 4, bh // 8, bw // 8) and chunk["std"].dtype == torch.float32
        assert chunk["ids"].tolist() == sorted(chunk["ids"].tolist())  # id order within a chunk
        seen += n
        for j, post_id in enumerate(chunk["ids"].tolist()):
            row = int(np.flatnonzero(index.ids == post_id)[0])
            w, h = int(index.width[row]), int(index.height[row])
            # 96x64 into 64x64: height fits, width 96 overhangs by 32 -> left 16; the others fit exactly
            expected = {(64, 64): [64, 64, 0, 0, 64, 64], (96, 64): [64, 96, 0, 16, 64, 64],
                        (128, 32): [32, 128, 0, 0, 32, 128]}[(w, h)]
            assert chunk["time_ids"][j].tolist() == expected
            if (w, h) != (96, 64):  # no resize or crop: the stored image itself, through the VAE alone
                with open(shards / index.shard_names[index.shard[row]], "rb") as f:
                    f.seek(index.image_offset[row])
                    img = np.asarray(Image.open(io.BytesIO(f.read(index.image_size[row]))).convert("RGB"))
                pixels = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
                with torch.no_grad():
                    dist = vae.encode(pixels).latent_dist
                assert torch.allclose(chunk["mean"][j], dist.mean[0], atol=1e-5)
                assert torch.allclose(chunk["std"][j], dist.std[0], atol=1e-5)
    assert seen == 20


@pytest.mark.slow
def test_killed_build_resumes_byte_identical_and_partial_is_refused(shards, reference, tmp_path):
    out = tmp_path / "latents"
    args = [*CLI_BUILD, "--shards", str(shards), "--out", str(out), "--dtype", "fp32"]
    killed = cli(args, {KILL_AFTER_CHUNKS_ENV: "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / ".parts").iterdir()) == ["latents-000000.json", "latents-000001.json"]
    assert not (out / "manifest.json").exists()
    cfg = load_config("tiny", ["train.max_steps=1", "data.latent_cache=auto", f"data.latent_cache_dir='{out}'"])
    with pytest.raises(HakubooruError, match=r"is partial \(2 of 6 chunks built"):
        train(cfg, shards, tmp_path / "run")
    damaged = out / "latents-000000.safetensors"  # a finished chunk damaged on disk: rebuilt, not kept
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / ".latents-000003.safetensors.tmp999").write_bytes(b"left by a killed writer")
    rerun = cli(args + ["--workers", "2"])  # decode workers change nothing
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "encoded 16 images into 5 chunks" in rerun.stderr and "kept 1 finished chunks" in rerun.stderr
    assert files(out) == files(reference)  # no temporaries left, every byte as an uninterrupted build


@pytest.mark.slow
def test_two_ranks_build_the_same_cache(shards, reference, tmp_path):
    out = tmp_path / "latents"
    run = cli([*CLI_BUILD, "--shards", str(shards), "--out", str(out), "--dtype", "fp32"], torchrun=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("cache complete") == 1  # rank 0 alone assembles, after every rank is done
    assert "rank 1/2: " in run.stderr and "rank 0 writes the manifest" in run.stderr
    assert files(out) == files(reference)


@pytest.mark.slow
def test_two_nodes_build_the_same_cache(shards, reference, tmp_path):
    """docs/latent-cache.md's multi-node command: two torchrun launches with --nnodes 2 (here on
    one machine, meeting at a c10d rendezvous on the loopback address), one process each."""
    out = tmp_path / "latents"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-id", "cache", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "-m", "trainers.lokr.cache", *CLI_BUILD, "--shards", str(shards), "--out", str(out),
         "--dtype", "fp32"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    assert "".join(errs).count("cache complete") == 1  # global rank 0 alone assembles
    assert files(out) == files(reference)


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_from_the_cache_gives_the_loss_of_training_from_images(shards, reference, tmp_path, capsys):
    steps = ["train.max_steps=3"]
    train(load_config("tiny", steps + ["data.latent_cache=off"]), shards, tmp_path / "images")
    assert "latent cache: off" in capsys.readouterr().err
    train(load_config("tiny", steps + ["data.latent_cache=require", f"data.latent_cache_dir='{reference}'"]),
          shards, tmp_path / "fp32")
    assert f"latent cache: using {reference}" in capsys.readouterr().err
    fp16 = tmp_path / "fp16"
    build_cache(load_config("tiny"), shards, fp16, dtype="fp16", **BUILD)
    train(load_config("tiny", steps + [f"data.latent_cache_dir='{fp16}'"]), shards, tmp_path / "fp16run")  # auto
    images, from_fp32, from_fp16 = (losses(tmp_path / d) for d in ("images", "fp32", "fp16run"))
    assert len(images) == 3
    # fp32 storage: the same numbers up to float summation order (VAE batches of 3 vs 2): measured ≤ 2.1e-7
    assert from_fp32 == pytest.approx(images, rel=1e-5)
    # fp16 storage rounds mean and std to 11 significant bits: measured ≤ 1.5e-5 relative in 3 steps
    assert from_fp16 == pytest.approx(images, rel=1e-3)
    assert from_fp16 != pytest.approx(images, rel=1e-7)  # the fp16 run did read the fp16 cache
    # ss_cache_latents says which runs read the cache (sd-scripts' --cache_latents)
    cached = {d: safe_open(str(tmp_path / d / "lokr.safetensors"), "pt").metadata()["ss_cache_latents"]
              for d in ("images", "fp32", "fp16run")}
    assert cached == {"images": "False", "fp32": "True", "fp16run": "True"}


def test_refusals_name_what_differs(shards, reference, tmp_path):
    use = [f"data.latent_cache_dir='{reference}'", "train.max_steps=1"]
    cases = [
        (["train.mixed_precision=bf16"], "made for another VAE"),  # VAE weights rounded to bf16
        (["data.bucket_step=16"], "made for another bucket set"),
        (["data.random_crop=true"], "holds centre crops but data.random_crop = true"),
    ]
    for extra, message in cases:
        with pytest.raises(HakubooruError, match=message):
            train(load_config("tiny", use + extra), shards, tmp_path / "run")
    other = make_test_shards(tmp_path / "other", n=20, sizes=SIZES, seed=1).dir
    with pytest.raises(HakubooruError, match="made for another dataset"):
        train(load_config("tiny", use), other, tmp_path / "run")
    with pytest.raises(HakubooruError, match='"require" but there is no latent cache'):
        train(load_config("tiny", ["data.latent_cache=require", "train.max_steps=1"]), other, tmp_path / "run")
    with pytest.raises(HakubooruError, match="random_crop = true draws a new crop"):
        build_cache(load_config("tiny", ["data.random_crop=true"]), shards, tmp_path / "rc")
    with pytest.raises(HakubooruError, match=r"was built from other inputs \(different batch_size, dtype\)"):
        build_cache(load_config("tiny"), shards, reference, dtype="fp16", chunk_size=4, batch_size=2)


@pytest.mark.slow
def test_gpu_step_benchmark_runs_the_cached_step():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu_step

    assert bench_gpu_step.main(["--device", "cpu", "--tiny", "--steps", "1", "--batch", "1", "--no-baseline",
                                "--latent-cache"]) == 0


def test_a_damaged_sample_stops_training_with_one_line(shards, reference, tmp_path):
    cache = tmp_path / "latents"
    shutil.copytree(reference, cache)
    chunk = cache / "latents-000004.safetensors"  # 128x32 bucket: every training batch of it reads sample 0..3
    data = bytearray(chunk.read_bytes())
    header = int.from_bytes(data[:8], "little")
    for pos in range(8 + header, len(data), 64):  # damage every sample's mean, keep the size
        data[pos] ^= 0x55
    chunk.write_bytes(bytes(data))
    cfg = load_config("tiny", [f"data.latent_cache_dir='{cache}'", "train.max_steps=8"])
    with pytest.raises(HakubooruError, match="of latents-000004.safetensors fails its checksum"):
        train(cfg, shards, tmp_path / "run")


def test_python_defaults_are_the_command_line_defaults(shards, tmp_path):
    """docs/latent-cache.md: --chunk-size 256 and --batch-size 8 by default; build_cache has the
    same defaults (recorded in the manifest). 14 samples in the 64x64 bucket and 6 in 128x32
    are fewer than 256: one chunk per bucket."""
    r = build_cache(load_config("tiny"), shards, tmp_path / "latents", dtype="fp32")
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert r["complete"] and (manifest["chunk_size"], manifest["batch_size"]) == (256, 8)
    assert [f["samples"] for f in manifest["files"]] == [14, 6]


def _cache_setup(shards, cache):
    from trainers.lokr.data.latent_cache import open_cache

    cfg = load_config("tiny", [f"data.latent_cache_dir='{cache}'"])
    return lambda shard_dir=shards: open_cache(cfg, shard_dir, load_index(shard_dir), tiny_sdxl(seed=0).vae,
                                               log=False)


def test_missing_or_cut_chunk_is_refused(shards, reference, tmp_path):
    """A complete cache whose chunk file is gone, or has another size than the manifest's, is
    refused with one line naming the file (never read as if whole)."""
    cache = tmp_path / "latents"
    shutil.copytree(reference, cache)
    open_it = _cache_setup(shards, cache)
    assert open_it() is not None  # whole: accepted
    (cache / "latents-000003.safetensors").unlink()
    with pytest.raises(HakubooruError, match=r"latents-000003.safetensors is missing \(partial or damaged\)"):
        open_it()
    shutil.copy(reference / "latents-000003.safetensors", cache)
    chunk = cache / "latents-000005.safetensors"
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[:-8])
    with pytest.raises(HakubooruError, match=f"latents-000005.safetensors has {size - 8} bytes, "
                                             f"the manifest says {size}"):
        open_it()


def test_long_values_in_a_refusal_are_cut_to_24_characters(shards, reference, tmp_path):
    """A refusal quotes each side's value, strings longer than 24 characters as their first 24
    and "…": a 25-character crop name "centre-crop-of-25-chars!!" shows as
    "centre-crop-of-25-chars!…"; the run's "centre" (6) as it is."""
    cache = tmp_path / "latents"
    shutil.copytree(reference, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["crop"] = "centre-crop-of-25-chars!!"
    assert len(manifest["crop"]) == 25
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HakubooruError, match=r"made for another crop \(crop: centre-crop-of-25-chars!…, "
                                             r"this run: centre\)"):
        _cache_setup(shards, cache)()


def test_cached_batches_skip_or_stop_at_a_damaged_record(shards, reference, tmp_path):
    """Training from the cache still reads each sample's .json record (hash-checked):
    data.on_corrupt = "skip" leaves a damaged one out of its micro-batch and counts it;
    "error" stops with CorruptMember."""
    from trainers.lokr.data.bucketing import make_buckets
    from trainers.lokr.data.batches import BatchPlan
    from trainers.lokr.data.integrity import CorruptMember
    from trainers.lokr.data.latent_cache import CachedBatchDataset

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    index = load_index(copy)
    plan = BatchPlan(index, 2, seed=0, epoch=0, buckets=make_buckets(64 * 64, 32, 128, 32))
    row = int(plan[0][0])
    with open(copy / index.shard_names[index.shard[row]], "r+b") as f:  # same size, other bytes
        f.seek(index.json_offset[row])
        f.write(b"[")  # the record began with "{"
    cache = _cache_setup(copy, reference)(copy)
    kept = CachedBatchDataset(copy, index, plan, cache=cache, on_corrupt="skip")[0]
    assert kept["ids"].tolist() == [int(index.ids[plan[0][1]])] and kept["corrupt"] == 1
    assert kept["latent_mean"].shape[0] == 1 and len(kept["captions"]) == 1
    with pytest.raises(CorruptMember):
        CachedBatchDataset(copy, index, plan, cache=cache, on_corrupt="error")[0]
