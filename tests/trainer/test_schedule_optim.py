"""Learning-rate schedules and optimizers: the multipliers and a first AdamW step by hand, the
lr of every step in metrics.jsonl, a resumed AdamW + cosine run equal to an uninterrupted one,
Prodigy's missing package in one line."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from tests.helpers.trainer_cli import tensors
from trainers.lokr.config import load_config
from trainers.lokr.optim.optimizers import make_optimizer
from trainers.lokr.optim.schedule import lr_factor
from trainers.lokr.state import read_state
from trainers.lokr.train import train


def test_schedules_by_hand():
    # warmup 2 of 10 steps: (s + 1) / 2 for s = 0, 1; then progress = (s − 2) / 8
    for schedule in ("constant", "cosine", "linear", "cosine_with_restarts"):
        assert [lr_factor(s, 2, schedule, 10) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert [lr_factor(s, 2, "constant", 10) for s in range(3, 10)] == [1.0] * 7
    # cosine: ½(1 + cos(π·4/8)) = 0.5 at s = 6; ½(1 + cos(7π/8)) = 0.0380602 at s = 9
    assert lr_factor(6, 2, "cosine", 10) == pytest.approx(0.5)
    assert lr_factor(9, 2, "cosine", 10) == pytest.approx(0.0380602, abs=1e-7)
    # linear: 1 − progress: 0.5 at s = 6, 0.125 at s = 9
    assert [lr_factor(s, 2, "linear", 10) for s in (6, 9)] == [0.5, 0.125]
    # 2 cycles: progress 0.25 → ½(1 + cos(π·0.5)) = 0.5; progress 0.5 → restart at 1.0
    assert lr_factor(4, 2, "cosine_with_restarts", 10, cycles=2) == pytest.approx(0.5)
    assert lr_factor(6, 2, "cosine_with_restarts", 10, cycles=2) == 1.0
    assert lr_factor(10, 2, "cosine", 10) == 0.0 and lr_factor(0, 0, "cosine", 4) == 1.0
    # the recipe: warmup then constant, as before
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit"])
def test_first_adamw_step_by_hand(name):
    # step 1 of AdamW: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g / (|g| + ε)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = make_optimizer([{"params": [p], "lr": 0.1}], {"name": name, "lr_unet": 0.1, "betas": [0.9, 0.95],
                                                         "weight_decay": 0.1})
    p.grad = torch.tensor([0.5, -0.25, 0.0])
    opt.step()
    expected = [1.0 * 0.99 - 0.1, -2.0 * 0.99 + 0.1, 0.5 * 0.99]
    assert p.detach().tolist() == pytest.approx(expected, abs=1e-6)


def test_prodigy_without_its_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(HakubooruError, match=r"needs prodigyopt: pip install prodigyopt"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}],
                       {"name": "Prodigy", "lr_unet": 1.0, "betas": [0.9, 0.99], "weight_decay": 0.0})


def test_prodigy_steps_when_installed():
    pytest.importorskip("prodigyopt")
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = make_optimizer([{"params": [p], "lr": 1.0}], {"name": "Prodigy", "lr_unet": 1.0, "betas": [0.9, 0.99],
                                                         "weight_decay": 0.0})
    p.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert type(opt).__name__ == "Prodigy" and not torch.equal(p.detach(), torch.tensor([1.0, -1.0]))


def test_config_refuses_unknown_schedule_and_optimizer():
    with pytest.raises(HakubooruError, match="optimizer.schedule"):
        load_config("tiny", ["optimizer.schedule=cosine_annealing"])
    with pytest.raises(HakubooruError, match="optimizer.name"):
        load_config("tiny", ["optimizer.name=SGD"])
    assert load_config("epsilon")["optimizer"]["schedule"] == "constant"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("sched_shards"), n=20).dir


COSINE = ["optimizer.name=AdamW", "optimizer.schedule=cosine", "optimizer.warmup_steps=1", "train.max_steps=4",
          "train.save_every=2"]


@pytest.mark.slow
def test_adamw_cosine_run_logs_each_lr_and_resumes_exactly(shards, tmp_path):
    straight = tmp_path / "straight"
    train(load_config("tiny", COSINE), shards, straight)
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    # warmup 1 of 4 steps: factors 1, then ½(1 + cos(π·k/3)) for k = 0, 1, 2 → 1, 0.75, 0.25
    assert [x["lr_unet"] for x in lines] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3])
    assert [x["lr_text"] for x in lines] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3])
    halves = tmp_path / "halves"
    train(load_config("tiny", COSINE[:-2] + ["train.max_steps=2", "train.save_every=2"]), shards, halves)
    train(load_config("tiny", COSINE), shards, halves, resume=halves, allow_config_change=True)
    a = read_state(straight / "states" / "state-00000004.state")
    b = read_state(halves / "states" / "state-00000004.state")
    ta, tb = tensors({k: a[k] for k in ("lokr", "optimizer")}), tensors({k: b[k] for k in ("lokr", "optimizer")})
    assert ta.keys() == tb.keys() and any("exp_avg_sq" in k for k in ta)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert math.isclose(json.loads((halves / "metrics.jsonl").read_text().splitlines()[-1])["lr_unet"], 0.25e-3)
