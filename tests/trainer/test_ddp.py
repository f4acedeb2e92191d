"""torchrun DDP on CPU (gloo): 2 processes with batch b each train as 1 process with batch 2b,
including a SIGKILL of both ranks right after a state write and a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.state import list_states, read_state
from trainers.lokr.train import KILL_AFTER_STATE_ENV, train

# 6 steps of the tiny config, a state every 3.
TINY = ["train.save_every=3", "train.max_steps=6"]


def torchrun(args, env_extra=None):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainers.lokr", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_two_ranks_of_batch_b_equal_one_of_batch_2b_across_kill_and_resume(tmp_path):
    shards = make_test_shards(tmp_path / "shards", n=20).dir
    ddp = tmp_path / "ddp"
    args = ["--config", "tiny", "--shards", str(shards), "--output", str(ddp), "--set", "train.batch_size=1",
            *[a for s in TINY for a in ("--set", s)]]
    killed = torchrun(args, {KILL_AFTER_STATE_ENV: "3"})
    assert killed.returncode != 0
    assert [p.name for p in list_states(ddp / "states")] == ["state-00000003.state"], killed.stderr[-3000:]
    resumed = torchrun(args + ["--resume", str(ddp)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from") == 1 and resumed.stderr.count("trained 3 steps") == 1  # rank 0 only
    steps = [json.loads(x)["step"] for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    single = tmp_path / "single"
    train(load_config("tiny", TINY + ["train.batch_size=2"]), shards, single)
    a = read_state(single / "states" / "state-00000006.state")
    b = read_state(ddp / "states" / "state-00000006.state")
    assert (a["epoch"], a["cursor"]) == (b["epoch"], b["cursor"]) and b["world_size"] == 2
    # Same samples, same draws; only float summation order differs (batch means over 2 vs 1+1
    # samples, threads). Lion's update is a sign, so a gradient entry near zero can flip and move
    # one weight by 2·lr: measured 0.8–1.6 % relative difference of the trained w2 and 0.04–0.13 %
    # of the weights differing (by more than 1e-6). A run on other data or steps differs by ~45 %.
    la, lb = a["lokr"], b["lokr"]
    w2 = [k for k in la if k.endswith("lokr_w2")]
    rel = (sum(((la[k] - lb[k]) ** 2).sum() for k in w2).sqrt() / sum((la[k] ** 2).sum() for k in w2).sqrt())
    assert rel < 0.05, float(rel)
    differing = sum(int(((la[k] - lb[k]).abs() > 1e-6).sum()) for k in la) / sum(v.numel() for v in la.values())
    assert differing < 0.01, differing
    assert all(torch.equal(la[k], lb[k]) for k in la if k.endswith(".alpha"))
    # Lion only sees the gradient's sign, so the weights cannot show its scale; the logged
    # gradient norm can: at step 1 (identical weights) the averaged 2-rank gradient must equal
    # the 1-process gradient, and so must the loss (a missing /world_size would double the norm)
    first = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (single, ddp)]
    assert abs(first[0]["grad_norm"] - first[1]["grad_norm"]) <= 1e-4 * first[0]["grad_norm"], first
    assert abs(first[0]["loss"] - first[1]["loss"]) <= 1e-4 * first[0]["loss"], first


def test_single_process_place_is_fixed_and_leaves_a_callers_process_group(tmp_path, monkeypatch):
    """Without torchrun (no WORLD_SIZE) the run is rank 0 of 1, its Dist is
    frozen (nothing can move a process to another rank mid-run), and shutdown() leaves alone a
    process group the caller made: the trainer only leaves a group it joined (world_size > 1)."""
    import dataclasses

    import pytest
    import torch.distributed as dist

    from trainers.lokr.distributed import init_distributed, shutdown

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    d = init_distributed()
    assert (d.rank, d.world_size, d.local_rank, d.is_main) == (0, 1, 0, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.rank = 1
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shutdown(init_distributed())
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


TIMEOUT_PROBE = '''
import os, sys, time
import torch.distributed as dist
from trainers.lokr.distributed import init_distributed
d = init_distributed(float(sys.argv[1]))
marker = sys.argv[2]
if d.rank == 0:
    time.sleep(8)  # rank 0's long start-up; rank 1 waits at the first collective meanwhile
    print("rank 0 woke; rank 1 had", "given up" if os.path.exists(marker) else "not given up", flush=True)
    os._exit(0)
try:
    dist.barrier()
    print("rank 1 barrier passed", flush=True)
except Exception:
    open(marker, "w").close()
    print("rank 1 timed out", flush=True)
os._exit(0)
'''


@pytest.mark.slow
@pytest.mark.parametrize("timeout, rank0", [(2, "had given up"), (60, "had not given up")])
def test_ddp_timeout_is_how_long_a_collective_waits(tmp_path, timeout, rank0):
    # rank 0 sleeps 8 s before its first collective: with a 2 s timeout rank 1's barrier has
    # given up by then, with 60 s it is still waiting (only the order is checked, no durations)
    probe = tmp_path / "probe.py"
    probe.write_text(TIMEOUT_PROBE)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(probe), str(timeout), str(tmp_path / "gave-up")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert f"rank 0 woke; rank 1 {rank0}" in proc.stdout, proc.stdout + proc.stderr[-2000:]


ON_MAIN = """
import json, sys
from pathlib import Path
from hakubooru.errors import HakubooruError
from trainers.lokr.distributed import init_distributed, on_main, shutdown

d, out = init_distributed(), Path(sys.argv[1])
def compute():
    (out / f"ran-{d.rank}").touch()
    return {"from": d.rank}
def fail():
    raise HakubooruError("nothing qualifies")
got = on_main(compute, d)
try:
    on_main(fail, d)
except HakubooruError as e:
    (out / f"got-{d.rank}.json").write_text(json.dumps([got, str(e)]))
shutdown(d)
"""


def test_work_on_main_runs_on_rank_0_alone_and_every_rank_gets_its_result_or_error(tmp_path):
    script = tmp_path / "on_main.py"
    script.write_text(ON_MAIN)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ran-*")) == ["ran-0"]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"got-{rank}.json").read_text()) == [{"from": 0}, "nothing qualifies"]
