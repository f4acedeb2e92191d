"""Start-up at the epsilon's scale: what each command does before its real work, on a synthetic
shard folder of N records with the real layout, next to the floor of reading every record.

    python benchmarks/bench_scale.py --records 1000000 [--json FILE]

The folder is made once in bench-data/scale-<N>/ (git-ignored; benchmarks/bench_report.py's
records, plus a .txt caption and a 1×1 PNG per sample, member hashes, a manifest with every
shard's size and checksum, and tag_counts.parquet as a build writes it). Each phase runs in a
fresh process; its wall time and CPU time from after the imports, and the peak RSS of that
process (and of the worker processes it started):

- floor: read and json.loads every record by the index, in file order, one process
  (what a start-up that reads the records costs at least);
- trainer_setup: `trainers.lokr.train.setup` with --config tiny (the index, the checks against
  the manifest, the batch plan, the tag counts for the LoKr metadata, the tiny model and its
  LoKr, the optimizer) — everything before the first micro-batch;
- trainer_setup_first_start: the same on the folder without tag_counts.parquet (a folder
  built before the counts: counted once in 4 processes, then stored);
- resume_setup: `setup(..., resume=...)` from a state written by the trainer_setup process;
- cache_plan: the latent cache builder's plan (index, checks, buckets, chunks).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_report import floor, make_folder  # noqa: E402
from benchmarks.common import BENCH_DATA, ROOT  # noqa: E402

PHASES = ("floor", "trainer_setup_first_start", "trainer_setup", "resume_setup", "cache_plan")


def run_phase(phase: str, folder: Path, work: Path) -> dict:
    """One phase in this process; returns its figures (imports done before the clock starts)."""
    from trainers.lokr.config import load_config
    from trainers.lokr.data.bucketing import make_buckets
    from trainers.lokr.data.index import load_index
    from trainers.lokr.data.latent_cache_build import plan_chunks
    from trainers.lokr.state import save_state, state_dir
    from trainers.lokr.train import setup, state_payload

    start, cpu = time.perf_counter(), time.process_time()
    if phase == "floor":
        floor(folder)
    elif phase == "cache_plan":
        dc = load_config("epsilon")["data"]
        buckets = make_buckets(area=dc["resolution"] ** 2, min_side=dc["bucket_min"], max_side=dc["bucket_max"],
                               step=dc["bucket_step"])
        plan_chunks(load_index(folder), buckets, 256)
    else:
        out = work / "run"
        run = setup(load_config("tiny", ["data.workers=0"]), folder, out,
                    resume=out if phase == "resume_setup" else None)
        figures = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                   "peak_rss_mib": _peak_rss_mib()}
        if phase == "trainer_setup":  # the state resume_setup starts from (not timed)
            save_state(state_dir(out), 1, state_payload(run), 1)
        return figures
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # tag-count workers
    return max(own, children) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--data", default=str(BENCH_DATA), help="where the folder is made (default: bench-data/)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = make_folder(args.records, trainable=True, data=Path(args.data))
    if args.phase:
        print(json.dumps(run_phase(args.phase, folder, Path(args.work))))
        return
    print(f"folder {folder}: {args.records:,} records ({time.perf_counter() - t0:.0f} s to make or find)",
          file=sys.stderr)
    work = Path(args.data) / f"scale-work-{args.records}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {}
    for phase in args.phases.split(","):
        if phase not in PHASES:
            sys.exit(f"error: unknown phase {phase!r} (known: {', '.join(PHASES)})")
        counts = folder / "tag_counts.parquet"
        saved = folder / "tag_counts.parquet.bench"
        if phase in ("trainer_setup", "trainer_setup_first_start"):
            shutil.rmtree(work / "run", ignore_errors=True)  # a new run (trainer_setup leaves the state resume_setup reads)
        if phase == "trainer_setup_first_start":
            counts.rename(saved)
        try:
            proc = subprocess.run([sys.executable, __file__, "--records", str(args.records), "--phase", phase,
                                   "--work", str(work), "--data", args.data], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.PIPE, text=True)
        finally:
            if saved.exists():
                counts.unlink(missing_ok=True)  # the phase's own counts: the build's go back
                saved.rename(counts)
        if proc.returncode:
            sys.exit(f"error: phase {phase} failed (exit {proc.returncode})")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[phase]
        print(f"{phase:28s} {r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s CPU {r['peak_rss_mib']:8.0f} MiB peak RSS",
              flush=True)
    if "floor" in results:
        base = results["floor"]["wall_s"]
        for phase, r in results.items():
            r["x_floor"] = r["wall_s"] / base
        print("wall time / floor: " + ", ".join(f"{p} {r['x_floor']:.3f}×" for p, r in results.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"records": args.records, "phases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
