"""The images and CCIP scores of ``python -m trainers.lokr eval``, one (model, character) at a
time, resumable.

For each model (the base, then the base with each LoKr at weight 1, loaded by
``network.lokr.load_lokr``) each rank takes the characters ``rank, rank + world, ...`` that have
no result yet, renders their images with diffusers' SDXL pipeline (``observe.sampling``:
``[sample]`` sampler, size, steps, guidance and negative prompt; one seeded generator per
image), writes them under ``images/<model>/<character>/<k>.png``, scores them against the
character's references and writes ``parts/<model>/<character>.parquet`` last, renamed into
place: a killed eval starts again at the first character without a part, and since every image
depends only on its own seed, the table it ends with is the one an uninterrupted run writes.

Scores of one generated image ``g`` against the character's references ``r_1..r_K``:
``d_j = CCIP difference(g, r_j)``; ``similarity = 1 - mean_j d_j``; ``same = share of j with
d_j <= threshold``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from hakubooru.manifest import write_parquet
from trainers.lokr.network.lokr import load_lokr
from trainers.lokr.observe.eval_characters import Character, read_reference
from trainers.lokr.observe.sampling import autocast_args, render_one, sdxl_pipeline
from trainers.lokr.sdxl.model import load_base_model

SCORES_SCHEMA = pa.schema([
    ("model", pa.string()), ("character", pa.string()), ("rank", pa.int32()), ("image", pa.int32()),
    ("seed", pa.int64()), ("path", pa.string()), ("similarity", pa.float64()), ("same", pa.float64()),
    ("differences", pa.list_(pa.float32())),
])


def part_path(out: Path, model: str, character: Character) -> Path:
    """Where the scores of one (model, character) are kept once finished."""
    return out / "parts" / model / f"{character.slug}.parquet"


def reference_paths(out: Path, character: Character) -> list[Path]:
    """The character's reference images as stored in the shards, copied under ``references/``."""
    return [out / "references" / character.slug / f"{k}-{ref.id}.{ref.ext}"
            for k, ref in enumerate(character.references)]


def _save_references(out: Path, shards: Path, character: Character) -> list[bytes]:
    data = [read_reference(shards, ref) for ref in character.references]
    for path, raw in zip(reference_paths(out, character), data):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_bytes(raw)
            tmp.replace(path)
    return data


def render_and_score(cfg: dict, models: list[tuple[str, str | None]], chosen: list[Character], shards: Path,
                     out: Path, ccip, dist, *, images_per_character: int, seed: int, progress: bool = True) -> int:
    """Render and score every (model, character) of this rank still without a part; returns
    how many it did."""
    mine = chosen[dist.rank::dist.world_size]
    todo = [(m, c) for m in models for c in mine if not part_path(out, m[0], c).is_file()]
    bar = tqdm(total=len(todo) * images_per_character, desc=f"eval rank {dist.rank}", unit="img",
               disable=not progress, file=sys.stderr)
    ref_features: dict[str, np.ndarray] = {}
    done = 0
    for name, lokr in models:
        chars = [c for m, c in todo if m[0] == name]
        if not chars:
            continue
        sdxl = load_base_model(cfg, torch.float32)
        if lokr is not None:
            load_lokr(sdxl, lokr, multiplier=1.0, apply=True, quiet=True)
        sdxl.to(device=dist.device)
        pipe = sdxl_pipeline(sdxl, cfg["sample"]["sampler"])
        pipe.set_progress_bar_config(disable=True)
        amp = autocast_args(cfg, dist.device)
        for character in chars:
            if character.slug not in ref_features:
                ref_features[character.slug] = ccip.features(_save_references(out, shards, character))
            images, rows = [], []
            folder = out / "images" / name / character.slug
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(images_per_character):
                s = character.seed(seed, k)
                p = {**_settings(cfg), "prompt": character.prompt, "seed": s}
                with torch.no_grad():
                    image = render_one(pipe, sdxl, p, amp, cfg["data"]["max_windows"])
                image.save(folder / f"{k}.png")
                images.append(image)
                rows.append((k, s, f"images/{name}/{character.slug}/{k}.png"))
                bar.update(1)
            diffs = ccip.differences(ccip.features(images), ref_features[character.slug])
            table = pa.table({
                "model": [name] * len(rows), "character": [character.name] * len(rows),
                "rank": [character.rank] * len(rows), "image": [r[0] for r in rows],
                "seed": [r[1] for r in rows], "path": [r[2] for r in rows],
                "similarity": (1.0 - diffs.astype(np.float64).mean(axis=1)).tolist(),
                "same": (diffs <= ccip.threshold).mean(axis=1).astype(np.float64).tolist(),
                "differences": [d.tolist() for d in diffs.astype(np.float32)],
            }, schema=SCORES_SCHEMA)
            path = part_path(out, name, character)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_parquet(path, table)
            done += 1
        del pipe, sdxl
    bar.close()
    return done


def _settings(cfg: dict) -> dict:
    s = cfg["sample"]
    return {k: s[k] for k in ("width", "height", "steps", "guidance", "negative_prompt")}


def collect_scores(out: Path, models: list[tuple[str, str | None]], chosen: list[Character]) -> pa.Table:
    """Every part in (model, character rank) order: the rows of ``scores.parquet``."""
    parts = [pq.read_table(part_path(out, name, c)) for name, _ in models for c in chosen]
    return pa.concat_tables(parts) if parts else SCORES_SCHEMA.empty_table()

