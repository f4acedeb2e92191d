"""benchmarks/bench_scale.py at a small N: every phase runs and reports its figures, and the
folder's tag counts are the build's again afterwards (the first-start phase counts its own)."""
import json
import subprocess
import sys

import pytest

from hakubooru.tagcounts import read_tag_counts
from tests.helpers import REPO


@pytest.mark.slow
def test_every_phase_runs_at_a_small_n(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--records", "1500", "--data",
                           str(tmp_path), "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["records"] == 1500
    assert list(figures["phases"]) == ["floor", "trainer_setup_first_start", "trainer_setup", "resume_setup",
                                       "cache_plan", "export_plan", "index", "ranks_workers"]
    ddp = figures["phases"].pop("ranks_workers")
    for phase in figures["phases"].values():
        assert phase["wall_s"] > 0 and phase["cpu_s"] > 0 and phase["peak_rss_mib"] > 50
    # torchrun's agent, 4 ranks, 4 DataLoader workers each; a worker's own pages are fewer than
    # what it maps (the index and the model are its parent's, shared by fork)
    assert {role: m["processes"] for role, m in ddp["by_role"].items()} == {"agent": 1, "rank": 4, "worker": 16}
    worker = ddp["by_role"]["worker"]
    assert 0 < worker["max_uss_mib"] < worker["max_pss_mib"] < worker["max_rss_mib"]
    assert ddp["job_peak_pss_mib"] > ddp["by_role"]["rank"]["max_pss_mib"] * 4
    assert figures["phases"]["floor"]["x_floor"] == 1
    folder = tmp_path / "scale-1500"
    assert "counting the tags of" in proc.stderr  # the first-start phase, and only it
    assert proc.stderr.count("counting the tags of") == 1
    counts = read_tag_counts(folder, "bench-1500")
    assert counts is not None and sum(counts.values()) > 1500 * 30  # ~36 tags a record
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("shard-")) == [
        "index.parquet", "manifest.json", "tag_counts.parquet"]
