"""``python -m trainers.lokr report --dataset SHARDS --config NAME [--gpus N]``: the dataset
report of ``python -m hakubooru report`` with the trainer's section added — the samples per
training bucket, the full global batches and the samples that sit out each epoch, by the
trainer's own bucket assignment and batch plan, so its numbers are those a run would see —
and one sample's caption in three epochs, as the trainer's data loader builds it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hakubooru.commands.report import add_page_arguments, write_report
from hakubooru.errors import HakubooruError
from trainers.lokr.config import BUNDLED, load_config
from trainers.lokr.data.batches import BatchPlan
from trainers.lokr.data.bucketing import config_buckets
from trainers.lokr.data.index import load_index
from trainers.lokr.observe.captions import caption_examples


def bucket_stats(root: Path, cfg: dict, config_name: str, world_size: int = 1) -> dict:
    """Samples per training bucket, full global batches per bucket and the samples that sit
    out each epoch, by the trainer's bucket assignment and batch plan (epoch 0)."""
    dc, tc = cfg["data"], cfg["train"]
    index = load_index(root)
    buckets, assignment = config_buckets(dc, index.width, index.height)
    global_batch = tc["batch_size"] * world_size
    plan = BatchPlan(index, global_batch, tc["seed"], 0, buckets, assignment)
    samples = np.bincount(assignment, minlength=len(buckets))
    batches = np.bincount(plan.batch_bucket, minlength=len(buckets))
    rows = [[f"{w}×{h}", w, h, int(s), int(nb), int(s - nb * global_batch)]
            for (w, h), s, nb in zip(buckets, samples, batches) if s]
    return {"config": config_name, "world_size": world_size, "batch_size": tc["batch_size"],
            "global_batch": global_batch, "grad_accum": tc["grad_accum"],
            "images_per_step": global_batch * tc["grad_accum"],
            "buckets_defined": len(buckets), "buckets_used": len(rows), "rows": rows,
            "batches_per_epoch": len(plan), "steps_per_epoch": len(plan) // tc["grad_accum"],
            "sit_out": plan.dropped,
            # full batches past the last whole optimizer step are not trained either
            "sit_out_batches": len(plan) % tc["grad_accum"] * global_batch}


def main(argv) -> int:
    """``python -m trainers.lokr report --dataset SHARDS ...``."""
    ap = argparse.ArgumentParser(prog="python -m trainers.lokr report",
                                 description="The dataset report of a shard folder with the training buckets "
                                             "a trainer config fills (docs/report.md).")
    ap.add_argument("--dataset", dest="shards", required=True,
                    help="shard folder written by `python -m hakubooru build`")
    ap.add_argument("--config", default="epsilon",
                    help=f"trainer config ({', '.join(BUNDLED)} or a TOML file; default: epsilon)")
    ap.add_argument("--gpus", type=int, default=1,
                    help="GPUs of that training (global batch = GPUs × train.batch_size; default 1)")
    add_page_arguments(ap)
    args = ap.parse_args(argv)
    if args.gpus < 1:
        raise HakubooruError(f"--gpus must be ≥ 1, got {args.gpus}")
    cfg = load_config(args.config)
    return write_report(args, max_windows=cfg["data"]["max_windows"],
                        sections={"buckets": lambda root: bucket_stats(root, cfg, args.config, args.gpus),
                                  "captions": lambda root: caption_examples(root, cfg, args.config)})
