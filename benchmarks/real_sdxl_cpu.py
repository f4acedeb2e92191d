"""The real SDXL path on the CPU, through the public commands only: a random-weight SDXL at
real size (`python -m trainers.lokr.sdxl.fake`), two optimizer steps of the trainer from its
diffusers folder and again from its single file (the two LoKrs must be identical), then
`merge` of the LoKr into the single file, whose UNet must give base + LoKr's output.

    python benchmarks/real_sdxl_cpu.py                  # real size: ~30 GB disk, ~12 GB RAM, slow
    python benchmarks/real_sdxl_cpu.py --narrow         # the narrow real-topology SDXL, a minute

Prints, per command: wall seconds and the process's own peak RSS (``os.wait4``); for the
training runs seconds per step (from metrics.jsonl); the size of each loaded part; and the
memory target (peak RSS of a training run ≤ 1.5 × the loaded model + activations). The
baseline in the same run: the loaded model's own size (what any loader must hold).
Settings: epsilon recipe with batch 1, no accumulation, buckets around 256² (the demo-like
shards below), ``--precision`` bf16 (default) or no, gradient checkpointing, both text
encoders trained, Lion8bit, bypass-mode LoKr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.helpers.shards import make_test_shards  # noqa: E402

GIB = 2 ** 30


def run(*args: str, nice: int = 0) -> dict:
    """Run ``python -m ARGS`` in a fresh process; its wall time and its own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", *args]
    print("$ python -m " + " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): python -m {' '.join(args)}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024}


def part_sizes(folder: Path, precision: str) -> dict[str, int]:
    """Bytes each loaded part holds in memory: UNet and text encoders at the training dtype, VAE fp32."""
    from trainers.lokr.sdxl.model import sdxl_base_architecture

    meta = sdxl_base_architecture("meta", config=folder)
    weight_bytes = 2 if precision == "bf16" else 4
    sizes = {}
    for name in ("unet", "text_encoder_1", "text_encoder_2", "vae"):
        params = sum(p.numel() for p in getattr(meta, name).parameters())
        sizes[name] = params * (4 if name == "vae" else weight_bytes)
    return sizes


def unet_output(pretrained: Path, config: Path, lokr: Path | None, dtype: torch.dtype) -> torch.Tensor:
    """The UNet's prediction on one fixed input (LoKr hooked in when given)."""
    from trainers.lokr.sdxl.model import load_sdxl
    from trainers.lokr.network.lokr import load_lokr

    sdxl = load_sdxl(pretrained, dtype=dtype, config=config)
    if lokr is not None:
        load_lokr(sdxl, lokr)
    cfg = sdxl.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g).to(dtype)
    context = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(dtype)
    pooled = torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                         generator=g).to(dtype)
    time_ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]], dtype=dtype)
    with torch.no_grad():
        out = sdxl.unet(x, torch.tensor([500]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return out.float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "bench-data" / "real_sdxl"), help="working folder (reused)")
    parser.add_argument("--narrow", action="store_true", help="the narrow real-topology SDXL (quick)")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the child processes")
    parser.add_argument("--keep", action="store_true", help="keep the model files afterwards")
    parser.add_argument("--skip-merge", action="store_true",
                        help="leave out merge and its check (merge holds the model in fp32: ~14 GB at real size)")
    args = parser.parse_args(argv)
    work = Path(args.work) / ("narrow" if args.narrow else "full")
    work.mkdir(parents=True, exist_ok=True)
    folder, single = work / "sdxl", work / "sdxl.safetensors"
    report = {}
    if not (folder.is_dir() and single.is_file()):
        shutil.rmtree(folder, ignore_errors=True)
        single.unlink(missing_ok=True)
        report["fake_sdxl"] = run("trainers.lokr.sdxl.fake", *(["--narrow"] if args.narrow else []),
                                  "--out", str(folder), "--single-file", str(single), nice=args.nice)
    configs = work / "configs"  # configs only: the single file then uses SDXL's bundled tokenizers
    if not configs.is_dir():
        shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    shards = work / "shards"
    if not (shards / "index.parquet").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        make_test_shards(shards, n=8, sizes=((256, 256), (320, 192), (192, 320)))
    train_args = ["--shards", str(shards), "--max-steps", "2",
                  "--set", "train.batch_size=1", "--set", "train.grad_accum=1",
                  "--set", f"train.mixed_precision={args.precision}", "--set", "data.workers=0",
                  "--set", "data.resolution=256", "--set", "data.bucket_min=128",
                  "--set", "data.bucket_max=512", "--set", "optimizer.warmup_steps=0",
                  "--set", "optimizer.lr_unet=1e-3", "--set", "optimizer.lr_text=1e-3",
                  # no sample renders, none at the end either: the recipe's 1024² ones would dominate
                  "--set", "sample.every=0", "--set", "sample.at_end=false"]
    lokrs = {}
    for name, pretrained, extra in (("folder", folder, []),
                                    ("file", single, ["--set", f"model.config={configs}"])):
        out = work / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)
        report[f"train {name}"] = run("trainers.lokr", "--pretrained", str(pretrained), "--output", str(out),
                                      *train_args, *extra, nice=args.nice)
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        report[f"train {name}"]["s_per_step"] = [1 / s["images_per_s"] for s in steps]  # batch 1
        lokrs[name] = load_file(out / "lokr.safetensors")
    identical = lokrs["folder"].keys() == lokrs["file"].keys() and all(
        torch.equal(lokrs["folder"][k], lokrs["file"][k]) for k in lokrs["folder"])

    merged = work / "merged.safetensors"
    merged.unlink(missing_ok=True)
    lokr_file = work / "run-file" / "lokr.safetensors"
    try:
        if args.skip_merge:
            raise SystemExit("skipped (--skip-merge)")
        report["merge"] = run("trainers.lokr", "merge", "--pretrained", str(single), "--model-config", str(configs),
                              "--lokr", str(lokr_file), "--out", str(merged), nice=args.nice)
    except SystemExit as e:
        report["merge"] = {"error": str(e)}
    # fp32 where it fits (narrow); at real size the training dtype (three loads, one at a time)
    dtype = torch.bfloat16 if args.precision == "bf16" and not args.narrow else torch.float32
    merge_diff = None
    if merged.is_file():
        expected = unet_output(single, configs, lokr_file, dtype)
        got = unet_output(merged, configs, None, dtype)
        base = unet_output(single, configs, None, dtype)
        merge_diff = {"merged_vs_hooked": float((got - expected).abs().max()),
                      "lokr_effect": float((expected - base).abs().max()),
                      "output_max": float(expected.abs().max())}

    sizes = part_sizes(folder, args.precision)
    model_bytes = sum(sizes.values())
    print()
    print(f"SDXL {'narrow real topology' if args.narrow else '1.0 base size'}, random weights; "
          f"precision {args.precision}; {os.cpu_count()} CPUs")
    for name, size in sizes.items():
        print(f"  loaded {name:<15} {size / GIB:7.3f} GiB")
    print(f"  loaded model (baseline) {model_bytes / GIB:7.3f} GiB")
    for name, r in report.items():
        if "error" in r:
            print(f"{name:<14} {r['error']}")
            continue
        extra = ""
        if "s_per_step" in r:
            extra = ", s/step " + ", ".join(f"{s:.1f}" for s in r["s_per_step"])
        print(f"{name:<14} {r['seconds']:8.1f} s wall, peak RSS {r['peak_rss'] / GIB:6.2f} GiB "
              f"({r['peak_rss'] / model_bytes:.2f}x the loaded model){extra}")
    print(f"LoKrs from the folder and the single file identical: {identical}")
    if merge_diff:
        print(f"merged UNet vs base + hooked LoKr: max |diff| {merge_diff['merged_vs_hooked']:.3g} "
              f"(LoKr's own effect {merge_diff['lokr_effect']:.3g}, outputs up to {merge_diff['output_max']:.3g}; "
              f"the merged file is fp16, compared in {dtype})")
    peaks = [report[k]["peak_rss"] for k in ("train folder", "train file")]
    # what training adds besides activations: LoKr weights and grads (fp32) and the optimizer state
    lokr_fp32 = sum(t.numel() * 4 for t in lokrs["file"].values())
    states = sorted((work / "run-file" / "states").glob("state-*.state"))
    optimizer_bytes = states[-1].stat().st_size - lokr_fp32 if states else 0
    training = 2 * lokr_fp32 + optimizer_bytes
    print(f"LoKr training tensors: weights + grads {2 * lokr_fp32 / GIB:.2f} GiB (fp32), optimizer state "
          f"{optimizer_bytes / GIB:.2f} GiB; the rest of the peak (activations, runtime): "
          f"{(max(peaks) - model_bytes - training) / GIB:.2f} GiB")
    print(f"memory target (peak RSS of a run <= 1.5x the loaded model + activations): "
          f"{max(peaks) / model_bytes:.2f}x the loaded model in all; "
          f"{(max(peaks) - training) / model_bytes:.2f}x without the LoKr training tensors")
    if not args.keep and not args.narrow:
        for path in (folder, single, merged):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
