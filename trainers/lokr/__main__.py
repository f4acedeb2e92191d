"""``python -m trainers.lokr``: train an SDXL LoKr on a shard folder (or ``merge`` one into SDXL, ``eval`` it).

    python -m trainers.lokr --shards out/ --pretrained sdxl/ [--config epsilon] [--output run/]
    python -m trainers.lokr --config tiny --shards out/ --output run/ --max-steps 20
    python -m trainers.lokr --resume run/ --shards out/ --pretrained sdxl/
    python -m trainers.lokr --shards new/ --pretrained sdxl/ --init-lokr epsilon.safetensors --output rev2/
    python -m trainers.lokr --dry-run
    python -m trainers.lokr merge --pretrained sdxl/ --lokr run/lokr.safetensors --out merged.safetensors
    python -m trainers.lokr convert --lokr run/lokr.safetensors --to diffusers --out lokr-diffusers.safetensors
    python -m trainers.lokr report run/ [--html curves.html]
    python -m trainers.lokr report --dataset out/ --config epsilon --gpus 4 [--html report.html]
    python -m trainers.lokr captions --config epsilon --shards out/ [--epoch E] [--limit N] [--format text|jsonl]
    python -m trainers.lokr eval --pretrained sdxl/ --lokr rev2.safetensors --shards out/ --db danbooru2023.db --out eval/

Errors in the input are one line (``error: ...``, exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from hakubooru.errors import HakubooruError, run_command
from trainers.lokr.config import BUNDLED, load_config


def build_parser() -> argparse.ArgumentParser:
    """The command line of the trainer (``merge`` and ``convert`` are dispatched before parsing)."""
    parser = argparse.ArgumentParser(prog="python -m trainers.lokr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`python -m trainers.lokr merge --help` for merging, "
                                            "`python -m trainers.lokr convert --help` for renaming a LoKr's modules, "
                                            "`python -m trainers.lokr captions --help` for the captions the "
                                            "model sees, `python -m trainers.lokr eval --help` for the CCIP benchmark.")
    parser.add_argument("--config", default="epsilon",
                        help=f"bundled config ({', '.join(BUNDLED)}) or a TOML file (default: epsilon)")
    parser.add_argument("--shards", action="append", metavar="PATH[:WEIGHT]",
                        help="shard folder written by `python -m hakubooru build` "
                        "(or any webdataset folder indexed by `python -m hakubooru index`); repeat it to mix "
                        "folders, each sampled in proportion to WEIGHT (default 1) × its size")
    parser.add_argument("--pretrained", help="SDXL base model: diffusers folder or single-file .safetensors")
    parser.add_argument("--output", help="folder for LoKr files, states and metrics.jsonl "
                                         "(default: the --resume folder, else lokr-out)")
    parser.add_argument("--init-lokr", metavar="FILE", help="start from the weights of an existing LoKr file "
                                                            "(ours or sd-scripts + LyCORIS; lokr.init_from)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=2 (repeatable)")
    parser.add_argument("--resume", metavar="DIR", help="continue from the newest valid state of a previous "
                                                        "run's output folder")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although train.max_steps or train.epochs changed")
    parser.add_argument("--dry-run", action="store_true",
                        help="print LoKr parameters and file size per module group on the real SDXL "
                             "architecture (meta device); needs no shards or weights")
    return parser


def config_from_args(args) -> dict:
    """The config named by ``--config``, with the named flags and ``--set`` overrides applied."""
    overrides = list(args.set)
    if args.pretrained is not None:
        overrides.append(("model.pretrained", args.pretrained))
    if args.init_lokr is not None:
        overrides.append(("lokr.init_from", args.init_lokr))
    if args.max_steps is not None:
        overrides.append(("train.max_steps", args.max_steps))
    return load_config(args.config, overrides)


def main(argv=None) -> int:
    """Entry point; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(_main, argv)


def _main(argv: list) -> int:
    if argv[:1] == ["merge"]:
        from trainers.lokr.network import merge
        return merge.main(argv[1:]) or 0
    if argv[:1] == ["convert"]:
        from trainers.lokr.network import convert
        return convert.main(argv[1:]) or 0
    if argv[:1] == ["captions"]:
        from trainers.lokr.observe import captions
        return captions.main(argv[1:]) or 0
    if argv[:1] == ["eval"]:
        from trainers.lokr.observe import eval as eval_command
        return eval_command.main(argv[1:]) or 0
    if argv[:1] == ["report"] and any(a == "--dataset" or a.startswith("--dataset=") for a in argv):
        from trainers.lokr.observe import dataset_report
        return dataset_report.main(argv[1:]) or 0
    if argv[:1] == ["report"]:
        from trainers.lokr.observe import report
        return report.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.dry_run:
        from trainers.lokr.observe import dryrun
        return dryrun.main(cfg) or 0
    if not args.shards:
        raise HakubooruError("no data: pass --shards DIR, a shard folder written by `python -m hakubooru build`")
    from trainers.lokr.train import train
    train(cfg, args.shards, args.output or args.resume or "lokr-out", resume=args.resume,
          allow_config_change=args.allow_config_change)
    return 0


if __name__ == "__main__":
    sys.exit(main())
