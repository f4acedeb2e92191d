"""``python -m trainers.lokr eval``: the model card's CCIP benchmark of a base model and LoKrs.

    python -m trainers.lokr eval --pretrained sdxl/ --lokr rev1.safetensors --lokr rev2.safetensors \\
        --shards out/ --db danbooru2023.db --out eval/ [--characters 3600] [--images-per-character 4] \\
        [--references 4] [--ccip-model PATH]

Chooses the characters (``observe.eval_characters``), renders and scores them per model
(``observe.eval_run``; resumable, split over torchrun ranks), then writes ``characters.parquet``,
``scores.parquet``, ``summary.json`` and ``index.html`` (``observe.eval_page``) into ``--out``.
docs/eval.md says how the numbers are formed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from hakubooru.errors import HakubooruError
from hakubooru.manifest import write_atomic, write_parquet
from hakubooru.procs import sigterm_interrupts
from hakubooru.shardfolder import shard_folder

SETTINGS = "settings.json"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``eval``."""
    p = argparse.ArgumentParser(prog="python -m trainers.lokr eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="SDXL base model: diffusers folder, single file, or tiny")
    p.add_argument("--lokr", action="append", default=[], metavar="FILE",
                   help="a LoKr file to evaluate on the base at weight 1 (repeatable; the base is always evaluated)")
    p.add_argument("--shards", required=True, help="shard folder: the characters and their reference images")
    p.add_argument("--db", required=True, help="the danbooru2023.db the shards were built from (tag types: the "
                                               "records keep character, copyright and artist tags in one list)")
    p.add_argument("--out", default="eval", help="output folder (default: %(default)s); a rerun resumes it")
    p.add_argument("--characters", type=int, default=3600, help="the N most frequent characters (default: %(default)s)")
    p.add_argument("--images-per-character", type=int, default=4, help="images per character and model "
                                                                       "(default: %(default)s)")
    p.add_argument("--references", type=int, default=4, help="reference images per character; a character needs "
                                                             "this many single-character samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the render seeds and the reference choice")
    p.add_argument("--config", default="epsilon", help="config whose [sample] sampler, size, steps, guidance and "
                                                       "negative prompt render the images (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set sample.steps=20")
    p.add_argument("--ccip-model", metavar="PATH", help="folder with model_feat.onnx, model_metrics.onnx, "
                   "metrics.json (a deepghs/ccip_onnx model folder); default: imgutils' Hub cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def model_names(lokrs: list[str]) -> list[tuple[str, str | None]]:
    """(name, LoKr path or None): ``base`` first, then each LoKr by its file name's stem."""
    out, seen = [("base", None)], {"base"}
    for path in lokrs:
        name, n = Path(path).stem, 2
        while name in seen:
            name, n = f"{Path(path).stem}-{n}", n + 1
        seen.add(name)
        out.append((name, path))
    return out


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    """The ``eval`` subcommand; errors are HakubooruError (one line)."""
    args = build_parser().parse_args(argv)
    from trainers.lokr.observe.ccip import require_imgutils, resolve
    require_imgutils()
    ccip_folder = resolve(args.ccip_model)
    for n, what in ((args.characters, "--characters"), (args.images_per_character, "--images-per-character"),
                    (args.references, "--references")):
        if n < 1:
            raise HakubooruError(f"{what} must be at least 1")
    for path in args.lokr:
        if not Path(path).is_file():
            raise HakubooruError(f"LoKr file not found: {path}")
    if not Path(args.db).is_file():
        raise HakubooruError(f"database not found: {args.db} (the danbooru2023.db the shards were built from)")
    shards = shard_folder(args.shards)
    from trainers.lokr.config import load_config
    cfg = load_config(args.config, [*args.set, ("model.pretrained", args.pretrained)])

    from trainers.lokr.distributed import init_distributed, shutdown

    dist = init_distributed()
    try:
        with sigterm_interrupts():  # SIGTERM stops like Ctrl-C
            _evaluate(args, cfg, shards, ccip_folder, dist)
    finally:
        shutdown(dist)
    return 0


def _evaluate(args, cfg: dict, shards: Path, ccip_folder: Path, dist) -> None:
    """Choose the characters, render and score on every rank, write the results on rank 0."""
    from trainers.lokr.distributed import barrier, on_main
    from trainers.lokr.observe.ccip import CCIP
    from trainers.lokr.observe import eval_characters as ec
    from trainers.lokr.observe.eval_run import collect_scores, render_and_score

    progress = dist.is_main and not args.no_progress
    chosen = on_main(lambda: ec.choose_characters(  # one read of the records, on rank 0
        shards, ec.tag_types(args.db), characters=args.characters, references=args.references,
        seed=args.seed, progress=progress), dist)
    if not chosen:
        raise HakubooruError(f"no character of {shards} has {args.references} single-character samples "
                             "(1girl/1boy/1other and one character tag); lower --references, or check that "
                             f"{args.db} is the database the shards were built from")
    models = model_names(args.lokr)
    ccip = CCIP(ccip_folder)
    out = Path(args.out)
    settings = {"pretrained": str(args.pretrained),
                "models": [[n, p, _sha256(p) if p else None] for n, p in models],
                "characters": [c.name for c in chosen], "references": args.references,
                "images_per_character": args.images_per_character, "seed": args.seed,
                "sample": {k: cfg["sample"][k] for k in ("sampler", "width", "height", "steps", "guidance",
                                                         "negative_prompt")},
                "mixed_precision": cfg["train"]["mixed_precision"],
                "ccip_model": _sha256(ccip_folder / "model_feat.onnx"), "threshold": ccip.threshold}
    _check_settings(out, settings)
    barrier(dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SETTINGS, (json.dumps(settings, indent=1) + "\n").encode())
        write_parquet(out / "characters.parquet", ec.characters_table(chosen))
        print(f"eval: {len(chosen)} characters × {args.images_per_character} images × {len(models)} models "
              f"on {dist.world_size} rank(s) -> {out}/", file=sys.stderr)
    barrier(dist)
    render_and_score(cfg, models, chosen, shards, out, ccip, dist,
                     images_per_character=args.images_per_character, seed=args.seed, progress=progress)
    barrier(dist)
    if dist.is_main:
        summary = _write_results(out, models, chosen, collect_scores(out, models, chosen), settings,
                                 ccip_folder, args)
        print("eval: " + "; ".join(f"{m['name']} CCIP {m['ccip']:.4f}, same {m['same']:.3f}"
                                   for m in summary["models"]) + f" -> {out}/index.html")


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise HakubooruError(f"{path} is not valid JSON; pass a new --out") from None
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        raise HakubooruError(f"{out} holds an eval with other settings ({', '.join(differ)} differ); "
                             "pass a new --out, or the same settings to resume it")


def _write_results(out: Path, models, chosen, scores, settings: dict, ccip_folder: Path, args) -> dict:
    """scores.parquet, summary.json and index.html from the collected rows."""
    from trainers.lokr.observe import eval_page
    from trainers.lokr.observe.eval_run import reference_paths

    write_parquet(out / "scores.parquet", scores)
    rows = scores.to_pydict()
    per = {}
    for m, c, sim, same in zip(rows["model"], rows["character"], rows["similarity"], rows["same"]):
        per.setdefault((m, c), []).append((sim, same))
    characters = [{"rank": c.rank, "character": c.name, "series": c.series, "people": c.people,
                   "samples": c.samples, "prompt": c.prompt,
                   "scores": {n: {"ccip": _mean(s for s, _ in per[(n, c.name)]),
                                  "same": _mean(x for _, x in per[(n, c.name)])} for n, _ in models}}
                  for c in chosen]
    model_rows = []
    for n, path in models:
        ccip = _mean(c["scores"][n]["ccip"] for c in characters)
        model_rows.append({"name": n, "lokr": path, "characters": len(characters),
                           "images": len(characters) * args.images_per_character, "ccip": ccip,
                           "same": _mean(c["scores"][n]["same"] for c in characters)})
    for m in model_rows:
        m["ccip_vs_base"] = m["ccip"] - model_rows[0]["ccip"]
    meta = json.loads((ccip_folder / "metrics.json").read_text())
    summary = {"models": model_rows, "threshold": settings["threshold"], "references": args.references,
               "images_per_character": args.images_per_character, "stand_in": bool(meta.get("stand_in")),
               "settings": settings, "characters": characters}
    write_atomic(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    images = {(n, c.name): [out / f"images/{n}/{c.slug}/{k}.png" for k in range(args.images_per_character)]
              for n, _ in models for c in chosen}
    refs = {c.name: reference_paths(out, c) for c in chosen}
    write_atomic(out / "index.html", eval_page.render(summary, out, images, refs).encode())
    return summary


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))
