"""Time per generated image of ``python -m trainers.lokr eval`` on the tiny model (CPU), against
its floor from the same run: rendering the same prompts and seeds with the sampler alone.

Data: the synthetic demo database (600 posts, 64 px) built into shards under bench-data/eval/
(made once), the stand-in CCIP model. One torch thread (as the tests).

  1. floor: ``sampling.render_one`` of every (character, image) of the eval, nothing else;
  2. ours: ``eval_run.render_and_score`` for the base model into a fresh folder: renders, PNGs,
     references, CCIP features and differences, one part file per character.

    python benchmarks/bench_eval.py                 # 6 characters x 4 images, 3 rounds
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hakubooru import Selector, build_shards, open_db  # noqa: E402
from hakubooru.synth import make_demo  # noqa: E402
from trainers.lokr.config import load_config  # noqa: E402
from trainers.lokr.distributed import Dist  # noqa: E402
from trainers.lokr.observe.ccip import CCIP  # noqa: E402
from trainers.lokr.observe.ccip_standin import write_standin  # noqa: E402
from trainers.lokr.observe.eval_characters import choose_characters, tag_types  # noqa: E402
from trainers.lokr.observe.eval_run import render_and_score  # noqa: E402
from trainers.lokr.observe.sampling import autocast_args, render_one, sdxl_pipeline  # noqa: E402
from trainers.lokr.sdxl.model import load_base_model  # noqa: E402


def make_data(folder: Path) -> tuple[Path, Path]:
    """(shards, database) of the 600-post demo, built once."""
    if not (folder / "out" / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        db, images = make_demo(folder / "synth", n_posts=600, seed=0, max_side=64, progress=False)
        Selector.all().save(folder / "all.parquet", open_db(db))
        build_shards(db, images, folder / "all.parquet", folder / "out", cache_dir=folder / "cache", progress=False)
    return folder / "out", folder / "synth" / "danbooru2023.db"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--characters", type=int, default=6)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = ROOT / "bench-data" / "eval"
    shards, db = make_data(data)
    ccip = CCIP(write_standin(data / "ccip"))
    chosen = choose_characters(shards, tag_types(db), characters=args.characters, references=2, seed=0,
                               progress=False)
    cfg = load_config("tiny", [("model.pretrained", "tiny")])
    dist = Dist(0, 1, 0, torch.device("cpu"))
    n = len(chosen) * args.images
    print(f"{len(chosen)} characters x {args.images} images, tiny model {cfg['sample']['width']}x"
          f"{cfg['sample']['height']}, {cfg['sample']['steps']} steps, 1 thread")
    for r in range(args.rounds):
        t = time.perf_counter()
        sdxl = load_base_model(cfg, torch.float32)
        pipe = sdxl_pipeline(sdxl, cfg["sample"]["sampler"])
        pipe.set_progress_bar_config(disable=True)
        s = cfg["sample"]
        for c in chosen:
            for k in range(args.images):
                p = {key: s[key] for key in ("width", "height", "steps", "guidance", "negative_prompt")}
                with torch.no_grad():
                    render_one(pipe, sdxl, {**p, "prompt": c.prompt, "seed": c.seed(0, k)},
                               autocast_args(cfg, dist.device), cfg["data"]["max_windows"])
        floor = time.perf_counter() - t
        out = data / "run"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        render_and_score(cfg, [("base", None)], chosen, shards, out, ccip, dist, images_per_character=args.images,
                         seed=0, progress=False)
        ours = time.perf_counter() - t
        print(f"round {r + 1}: floor (render only) {floor / n * 1000:.0f} ms/image, "
              f"eval (render + save + CCIP) {ours / n * 1000:.0f} ms/image ({ours / floor:.2f}x)")


if __name__ == "__main__":
    main()
