"""``python -m trainers.lokr captions --config C --shards out/ [--epoch E] [--limit N]
[--format text|jsonl]``: the captions the model sees — each sample's caption at epoch E, built
by the trainer's own dataset (``BatchDataset.sample_caption``: the same record or ``.txt`` read,
the same augmentation and the same (seed, epoch, post id) randomness as a training batch), one
per sample in id order. ``text``: ``id<TAB>epoch<TAB>caption``; ``jsonl``:
``{"id": …, "epoch": …, "caption": …}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from hakubooru.errors import HakubooruError
from trainers.lokr.config import BUNDLED, load_config
from trainers.lokr.data.batches import BatchDataset, BatchPlan, dataset_options
from trainers.lokr.data.bucketing import make_buckets
from trainers.lokr.data.index import load_index
from trainers.lokr.data.integrity import CorruptMember

FORMATS = ("text", "jsonl")
EXAMPLE_EPOCHS = (0, 1, 2)  # the dataset report's examples of one sample


def epoch_dataset(shards, cfg: dict, epoch: int, index=None) -> BatchDataset:
    """The dataset a one-GPU run of ``cfg`` reads in ``epoch`` (its batch plan included)."""
    dc, tc = cfg["data"], cfg["train"]
    index = load_index(shards) if index is None else index
    buckets = make_buckets(area=dc["resolution"] ** 2, min_side=dc["bucket_min"],
                           max_side=dc["bucket_max"], step=dc["bucket_step"])
    plan = BatchPlan(index, tc["batch_size"], tc["seed"], epoch, buckets)
    return BatchDataset(Path(shards), index, plan, epoch=epoch, **dataset_options(cfg))


def captions(shards, cfg: dict, epoch: int = 0, limit: int | None = None, progress: bool = False):
    """``(post id, caption)`` of the first ``limit`` samples (all: None) by id, at ``epoch``; a
    damaged member stops with one line, or under ``data.on_corrupt = "skip"`` leaves its sample
    out, as training does."""
    dataset = epoch_dataset(shards, cfg, epoch)
    n = len(dataset.index) if limit is None else min(limit, len(dataset.index))
    for row in tqdm(range(n), unit="caption", desc="captions", disable=None if progress else True,
                    file=sys.stderr):
        try:
            caption = dataset.sample_caption(row)
        except CorruptMember:
            if dataset.on_corrupt == "error":
                raise
            continue
        yield int(dataset.index.ids[row]), caption


def caption_examples(shards, cfg: dict, config_name: str, epochs=EXAMPLE_EPOCHS) -> dict:
    """The dataset report's section: the first sample's caption at each of ``epochs``."""
    first = epoch_dataset(shards, cfg, epochs[0])
    index = first.index
    # a caption depends on the epoch, not on the batch plan: one plan (seconds at 5M rows) serves
    rows = [[e, BatchDataset(first.root, index, first.plan, epoch=e, **dataset_options(cfg)).sample_caption(0)]
            for e in epochs]
    return {"config": config_name, "id": int(index.ids[0]), "rows": rows,
            "shuffle_scope": cfg["data"]["shuffle_scope"], "tag_dropout": cfg["data"]["tag_dropout"]}


def main(argv) -> int:
    """``python -m trainers.lokr captions ...``."""
    ap = argparse.ArgumentParser(prog="python -m trainers.lokr captions",
                                 description="Print each sample's caption as the trainer's data loader feeds "
                                             "it at one epoch (docs/training-data.md).")
    ap.add_argument("--config", default="epsilon",
                    help=f"trainer config ({', '.join(BUNDLED)} or a TOML file; default: epsilon)")
    ap.add_argument("--shards", required=True, help="shard folder written by `python -m hakubooru build` "
                                                    "(or indexed by `python -m hakubooru index`)")
    ap.add_argument("--epoch", type=int, default=0, help="0-based epoch (default: 0)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N samples by id (default: all)")
    ap.add_argument("--format", choices=FORMATS, default="text",
                    help="text: id, epoch, caption separated by tabs; jsonl: one JSON object a line")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config key, e.g. --set data.shuffle_scope=all (repeatable)")
    args = ap.parse_args(argv)
    if args.epoch < 0:
        raise HakubooruError(f"--epoch must be ≥ 0, got {args.epoch}")
    if args.limit is not None and args.limit < 0:
        raise HakubooruError(f"--limit must be ≥ 0, got {args.limit}")
    cfg = load_config(args.config, args.set)
    count = 0
    try:
        for post_id, caption in captions(args.shards, cfg, args.epoch, args.limit, progress=True):
            if args.format == "jsonl":
                line = json.dumps({"id": post_id, "epoch": args.epoch, "caption": caption}, ensure_ascii=False)
            else:
                line = f"{post_id}\t{args.epoch}\t{caption}"
            sys.stdout.write(line + "\n")
            count += 1
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    print(f"{count:,} captions at epoch {args.epoch} (shuffle scope {cfg['data']['shuffle_scope']}, "
          f"tag dropout {cfg['data']['tag_dropout']})", file=sys.stderr)
    return 0
