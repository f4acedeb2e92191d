"""Tiny-model training steps/s from the latent cache and from images (the baseline), in one run.

    python benchmarks/bench_cache.py [--n 48] [--size 512x512] [--steps 8] [--rounds 2]

Data: ``--n`` synthetic samples of ``--size`` pixels (PNG, tests/shardfactory), the tiny config
(64² buckets, batch 2 × accumulation 2). The cache build (fp16) is timed once; then training
from images and from the cache alternate for ``--rounds`` rounds of ``--steps`` optimizer steps
each, one torch thread, and the better round of each is kept. On a GPU with the real SDXL VAE the
saving per step is the VAE encode at 1024² (not measured here: no GPU on the dev machine).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.shards import make_test_shards  # noqa: E402
from trainers.lokr.data.latent_cache_build import build_cache  # noqa: E402
from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.train import train  # noqa: E402


def steps_per_s(cfg: dict, shards: Path, out: Path) -> float:
    """Optimizer steps per second of the training loop (set-up excluded)."""
    shutil.rmtree(out, ignore_errors=True)
    summary = train(cfg, shards, out)
    return summary["steps_this_run"] / summary["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    w, h = map(int, args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_test_shards(Path(tmp) / "shards", n=args.n, sizes=((w, h),)).dir
        start = time.perf_counter()
        build_cache(load_config("tiny"), shards, dtype="fp16", workers=0)
        build_s = time.perf_counter() - start
        common = [f"train.max_steps={args.steps}", "train.save_every=1000", "train.checkpoint_every=1000"]
        images, cached = [], []
        for _ in range(args.rounds):
            images.append(steps_per_s(load_config("tiny", common + ["data.latent_cache=off"]), shards, Path(tmp) / "a"))
            cached.append(steps_per_s(load_config("tiny", common + ["data.latent_cache=require"]), shards, Path(tmp) / "b"))
    print(f"data: {args.n} PNG of {w}x{h} -> 64x64 bucket, tiny config (4 images per step), "
          f"{args.rounds} rounds of {args.steps} steps, 1 thread")
    print(f"cache build (fp16): {build_s:.2f} s for {args.n} images ({args.n / build_s:.1f} images/s, incl. model set-up)")
    print(f"from images: {max(images):.2f} steps/s; from the cache: {max(cached):.2f} steps/s; "
          f"ratio {max(cached) / max(images):.2f}x")


if __name__ == "__main__":
    main()
