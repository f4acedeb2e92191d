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
- cache_plan: the latent cache builder's plan (index, checks, buckets, chunks);
- export_plan: `hakubooru export --to kohya` before its first file (index, checks, stems, order);
- index: `hakubooru index --workers <cores>` of the folder's tars as foreign webdataset shards
  (symlinked into a new folder): every member hashed, every tar checksummed, tags counted — a
  pass over the data;
- ranks_workers: `torchrun --nproc-per-node 4 -m trainers.lokr --config tiny` (gloo, CPU) with
  4 DataLoader workers per rank for a few steps (on a view of the folder whose index gives the
  images' true 1×1 sizes, which the trainer checks), every process's memory sampled from
  /proc/PID/smaps_rollup twice a second: peak RSS, PSS (shared pages split between the
  processes sharing them) and USS (pages of that process alone), by role, and the peak of the
  whole job's summed PSS (what the job takes from the machine).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_report import floor, make_folder  # noqa: E402
from benchmarks.common import BENCH_DATA, ROOT  # noqa: E402

PHASES = ("floor", "trainer_setup_first_start", "trainer_setup", "resume_setup", "cache_plan", "export_plan",
          "index", "ranks_workers")
RANKS, WORKERS, STEPS = 4, 4, 6


def run_phase(phase: str, folder: Path, work: Path) -> dict:
    """One phase in this process; returns its figures (imports done before the clock starts)."""
    from trainers.lokr.config import load_config
    from trainers.lokr.data.bucketing import make_buckets
    from trainers.lokr.data.index import load_index
    from trainers.lokr.data.latent_cache_build import plan_chunks
    from trainers.lokr.state import save_state, state_dir
    from trainers.lokr.train import setup, state_payload
    from hakubooru.export import plan_export
    from hakubooru.wdsindex import index_webdataset

    start, cpu = time.perf_counter(), time.process_time()
    if phase == "floor":
        floor(folder)
    elif phase == "cache_plan":
        dc = load_config("epsilon")["data"]
        buckets = make_buckets(area=dc["resolution"] ** 2, min_side=dc["bucket_min"], max_side=dc["bucket_max"],
                               step=dc["bucket_step"])
        plan_chunks(load_index(folder), buckets, 256)
    elif phase == "export_plan":
        plan_export(folder)
    elif phase == "index":
        foreign = work / "foreign"
        shutil.rmtree(foreign, ignore_errors=True)
        foreign.mkdir()
        for tar in folder.glob("*.tar"):
            (foreign / tar.name).symlink_to(tar)
        start, cpu = time.perf_counter(), time.process_time()
        index_webdataset(foreign, progress=False, workers=os.cpu_count() or 1)
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


def ranks_workers(folder: Path, work: Path) -> dict:
    """Train RANKS ranks × WORKERS DataLoader workers for STEPS steps under torchrun, sampling
    every process's memory; figures in MiB by role (torchrun's agent, rank, worker)."""
    out, view = work / "ddp", work / "ddp-shards"
    for path in (out, view):
        shutil.rmtree(path, ignore_errors=True)
    _view_with_true_sizes(folder, view)
    start = time.perf_counter()
    peak: dict = {}  # pid -> (role, {rss, pss, uss})
    job_pss = 0.0
    with open(work / "ddp.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 str(RANKS), "-m", "trainers.lokr", "--config", "tiny", "--shards", str(view),
                                 "--output", str(out), "--max-steps", str(STEPS), "--set", f"data.workers={WORKERS}"],
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=log)
        while proc.poll() is None:
            total = 0.0
            for pid, role in _tree(proc.pid):
                m = _smaps(pid)
                if m is None:
                    continue
                total += m["pss"]
                old = peak.setdefault(pid, (role, dict.fromkeys(m, 0.0)))[1]
                peak[pid] = (role, {k: max(old[k], m[k]) for k in m})
            job_pss = max(job_pss, total)
            time.sleep(0.5)
    err = (work / "ddp.log").read_text()
    if proc.returncode:
        said = [line for line in err.splitlines() if line.startswith("error:")] or err.strip().splitlines()[-1:]
        sys.exit(f"error: torchrun failed (exit {proc.returncode}): {said[0] if said else ''}")
    by_role: dict = {}
    for role, m in peak.values():
        r = by_role.setdefault(role, {"processes": 0, **{f"max_{k}_mib": 0.0 for k in m}})
        r["processes"] += 1
        for k, v in m.items():
            r[f"max_{k}_mib"] = max(r[f"max_{k}_mib"], v)
    return {"wall_s": time.perf_counter() - start, "ranks": RANKS, "workers_per_rank": WORKERS, "steps": STEPS,
            "by_role": by_role, "job_peak_pss_mib": job_pss,
            "peak_rss_mib": max((r["max_rss_mib"] for r in by_role.values()), default=0.0)}


def _view_with_true_sizes(folder: Path, view: Path) -> None:
    """The folder as the trainer can read it: its tars and files linked, and its index with the
    sizes of the 1×1 PNGs the samples hold (the bench index's sizes are drawn, for bucketing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    view.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name != "index.parquet":
            (view / path.name).symlink_to(path)
    table = pq.read_table(folder / "index.parquet")
    ones = pa.array(np.ones(table.num_rows, np.int32))
    for name in ("width", "height"):
        table = table.set_column(table.schema.get_field_index(name), name, ones)
    pq.write_table(table, view / "index.parquet")


def _tree(root: int) -> list[tuple[int, str]]:
    """(pid, role) of the processes under torchrun's agent ``root``: its children are the
    ranks, theirs the DataLoader workers (and anything else a rank starts)."""
    found, level = [(root, "agent")], [root]
    for role in ("rank", "worker"):
        level = [c for p in level for c in _children(p)]
        found += [(c, role) for c in level]
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _smaps(pid: int) -> dict | None:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MiB, or None if it has ended."""
    try:
        fields = dict(line.split()[:2] for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return None
    kib = {k.rstrip(":"): int(v) for k, v in fields.items()}
    return {"rss": kib["Rss"] / 1024, "pss": kib["Pss"] / 1024,
            "uss": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024}


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
        if phase == "ranks_workers":
            results[phase] = r = ranks_workers(folder, work)
            for role, m in r["by_role"].items():
                print(f"{phase:28s} {role:6s} ×{m['processes']:<3d} max RSS {m['max_rss_mib']:7.0f} MiB, PSS "
                      f"{m['max_pss_mib']:7.0f} MiB, USS {m['max_uss_mib']:7.0f} MiB", flush=True)
            print(f"{phase:28s} {r['wall_s']:8.1f} s wall; the job's summed PSS peaked at {r['job_peak_pss_mib']:.0f} MiB",
                  flush=True)
            continue
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
