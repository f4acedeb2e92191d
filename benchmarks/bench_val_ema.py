"""The cost of [validation] and [ema] per optimizer step on the narrow real-topology SDXL (every
block, layer count and module name of SDXL, narrow channels: `python -m trainers.lokr.sdxl.fake
--narrow`), with the baseline — a training step of the same run — measured alongside.

    python benchmarks/bench_val_ema.py [--steps 3] [--val-samples 4] [--resolution 128] [--work /tmp/bench_val_ema]

Prints: seconds per training step (median over the steps of a short run; batch 1, no
accumulation, fp32, 128² buckets, the recipe's LoKr); one EMA update of the whole LoKr on the CPU
(`ema.device = "cpu"`; median of 5) and the same on the training device; one validation pass over
`--val-samples` held-out samples and per sample; each as a share of a step, and
what `validation.every = 500` makes of it per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers.shards import make_test_shards  # noqa: E402
from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.optim.ema import EMA  # noqa: E402
from trainers.lokr.train import setup, train, validation_loss  # noqa: E402


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--val-samples", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128, help="bucket area = resolution² (default 128)")
    parser.add_argument("--work", default="/tmp/bench_val_ema")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "sdxl"
    if not folder.is_dir():
        subprocess.run([sys.executable, "-m", "trainers.lokr.sdxl.fake", "--narrow", "--out", str(folder)],
                       cwd=ROOT, check=True)
    shards = work / "shards"
    if not (shards / "index.parquet").is_file():
        make_test_shards(shards, n=24, sizes=((128, 128), (160, 96), (96, 160)))
    overrides = [f"model.pretrained={folder}", "train.batch_size=1", "train.grad_accum=1",
                 "train.mixed_precision=no", "data.workers=0", f"data.resolution={args.resolution}",
                 "data.bucket_min=64", "data.bucket_max=512", "data.bucket_step=32", "optimizer.warmup_steps=0", "sample.every=0", "sample.at_end=false",
                 "train.save_every=1000", "train.checkpoint_every=1000"]
    print(f"narrow SDXL, CPU, {torch.get_num_threads()} torch threads; batch 1, fp32, {args.resolution}² buckets")

    out = work / "run"
    train(load_config("epsilon", overrides + [f"train.max_steps={args.steps}"]), shards, out, resume=None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(1 / x["images_per_s"] for x in lines[1:] or lines)  # 1 image per step
    print(f"baseline: training step {step:.3f} s (median of {len(lines[1:] or lines)} steps)")

    run = setup(load_config("epsilon", overrides + [f"validation.samples={args.val_samples}"]), shards, work / "val")
    params = sum(p.numel() for p in run.network.parameters() if p.requires_grad)
    for device in ("cpu", run.dist.device):
        ema = EMA(run.network, 0.999, 1, device)
        seconds = median_seconds(lambda: ema.update(run.network), 5)
        print(f"EMA update on {device} ({params / 1e6:.1f} M LoKr parameters, fp32): {seconds * 1000:.1f} ms "
              f"= {100 * seconds / step:.2f} % of a step (ema.every = 1)")
    seconds = median_seconds(lambda: validation_loss(run), 1)
    n = len(run.validation.rows)
    print(f"validation over {n} held-out samples: {seconds:.3f} s ({seconds / n:.3f} s a sample = "
          f"{100 * seconds / n / step:.1f} % of a training step per sample); with validation.every = 500: "
          f"{100 * seconds / 500 / step:.3f} % per step")


if __name__ == "__main__":
    main()
