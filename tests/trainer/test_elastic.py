"""Elastic resume: a state resumed with another per-GPU batch, accumulation or GPU count trains the
same samples in the same order with the same draws when the global batch is kept (weights equal
up to float summation order), and is refused in one line when it is not."""
from __future__ import annotations

import pytest
import torch

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.data.batches import BatchPlan, PlanView
from trainers.lokr.state import elastic_resume, read_state
from trainers.lokr.train import train

from tests.trainer.test_ddp import torchrun

# tiny: batch 2 × accumulation 2 = 4 images per step on one process
BASE = ["train.save_every=2", "optimizer.warmup_steps=1"]


def test_plan_view_reads_the_same_rows_in_other_micro_steps():
    class Index:  # two buckets' worth of ids: 64×64 and 96×64
        ids = torch.arange(1, 13).numpy()
        width = torch.tensor([64] * 8 + [96] * 4).numpy()
        height = torch.tensor([64] * 12).numpy()

    plan = BatchPlan(Index, 4, 0, 0, [(64, 64), (96, 64)])
    flat = plan.batches.reshape(-1).tolist()
    # micro-steps of 2 rows on 2 ranks of 1: rank r's row of micro-step i is flat[2i + r]
    views = [PlanView(plan, 2, r, 1) for r in (0, 1)]
    assert len(views[0]) == 6
    got = [views[r][i][r] for i in range(6) for r in (0, 1)]
    assert got == flat  # same rows, same order
    assert [views[1].bucket_of(i) for i in range(6)] == [plan.bucket_of((2 * i + 1) // 4) for i in range(6)]
    with pytest.raises(HakubooruError, match="does not divide"):
        PlanView(plan, 3, 0, 3)


def test_refusal_names_the_numbers():
    state = {"world_size": 2, "cursor": 4}
    saved = {"train": {"batch_size": 2, "grad_accum": 4}}  # global batch 16
    with pytest.raises(HakubooruError, match=r"global batch of 16 \(per-GPU batch 2 × accumulation 4 × 2 GPU\(s\)\); "
                                             r"this run has 8 \(2 × 4 × 1\).*--set train.grad_accum=8"):
        elastic_resume("s", state, saved, {"train": {"batch_size": 2, "grad_accum": 4}}, 1)
    with pytest.raises(HakubooruError, match="per-GPU batch of 3 does not divide the run's plan batch of 4"):
        # 2 × 3 × 2 = 12 = 3 × 4 × 1, but 3 rows per GPU would straddle the plan's batches of 2 × 2
        elastic_resume("s", state, {"train": {"batch_size": 2, "grad_accum": 3}},
                       {"train": {"batch_size": 3, "grad_accum": 4}}, 1)
    ok = elastic_resume("s", state, saved, {"train": {"batch_size": 2, "grad_accum": 8}}, 1)
    # 4 micro-steps of 4 rows done = 8 micro-steps of 2
    assert (ok.plan_batch, ok.cursor) == (4, 8) and "2 → 1 GPU(s)" in ok.line


def close(a: dict, b: dict) -> tuple[float, float]:
    """(relative L2 difference of the w2 weights, fraction of weights differing by > 1e-6)."""
    w2 = [k for k in a if k.endswith("lokr_w2")]
    rel = float(sum(((a[k] - b[k]) ** 2).sum() for k in w2).sqrt() / sum((a[k] ** 2).sum() for k in w2).sqrt())
    differing = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a) / sum(v.numel() for v in a.values())
    return rel, differing


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    shards = make_test_shards(root / "shards", n=20).dir
    straight = root / "straight"
    train(load_config("tiny", BASE + ["train.max_steps=4"]), shards, straight)
    return shards, read_state(straight / "states" / "state-00000004.state")


@pytest.mark.slow
def test_resume_with_half_the_batch_and_twice_the_accumulation(runs, tmp_path):
    shards, straight = runs
    out = tmp_path / "run"
    train(load_config("tiny", BASE + ["train.max_steps=2"]), shards, out)
    with pytest.raises(HakubooruError, match="global batch of 4"):
        train(load_config("tiny", BASE + ["train.max_steps=4", "train.batch_size=1"]), shards, out, resume=out,
              allow_config_change=True)
    train(load_config("tiny", BASE + ["train.max_steps=4", "train.batch_size=1", "train.grad_accum=4"]), shards, out,
          resume=out, allow_config_change=True)
    resumed = read_state(out / "states" / "state-00000004.state")
    assert resumed["plan_batch"] == 2 and resumed["cursor"] == 2 * straight["cursor"]
    rel, differing = close(straight["lokr"], resumed["lokr"])
    assert rel < 0.05 and differing < 0.01, (rel, differing)


@pytest.mark.slow
def test_a_lost_gpu_two_ranks_then_one(runs, tmp_path):
    shards, straight = runs
    out = tmp_path / "ddp"
    args = ["--config", "tiny", "--shards", str(shards), "--output", str(out), "--set", "train.batch_size=1",
            *[a for s in BASE for a in ("--set", s)]]
    first = torchrun(args + ["--max-steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    # one process left: per-GPU batch 1 × accumulation 4 × 1 GPU = the 1 × 2 × 2 of the first start
    train(load_config("tiny", BASE + ["train.max_steps=4", "train.batch_size=1", "train.grad_accum=4"]), shards, out,
          resume=out, allow_config_change=True)
    resumed = read_state(out / "states" / "state-00000004.state")
    assert resumed["world_size"] == 1 and resumed["plan_batch"] == 2
    rel, differing = close(straight["lokr"], resumed["lokr"])
    assert rel < 0.05 and differing < 0.01, (rel, differing)
