"""[ema]: the average by hand, swapped in and out bit for bit, part of the training state (a
resumed run writes the same lokr-ema file as an uninterrupted one), off in the recipe."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hakubooru.errors import HakubooruError
from tests.helpers.shards import make_test_shards
from trainers.lokr.config import load_config
from trainers.lokr.optim.ema import EMA
from trainers.lokr.train import setup, train


def test_ema_by_hand():
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.0, 1.0]]))
    ema = EMA(m, decay=0.5, every=2)
    assert [ema.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    for w in ([4.0, 1.0], [8.0, -3.0]):
        with torch.no_grad():
            m.weight.copy_(torch.tensor([w]))
        ema.update(m)
    # 0.5·0 + 0.5·4 = 2, then 0.5·2 + 0.5·8 = 5; 0.5·1 + 0.5·1 = 1, then 0.5·1 + 0.5·(−3) = −1
    assert ema.state_dict()["weight"].tolist() == [[5.0, -1.0]]
    with ema.applied(m):
        assert m.weight.tolist() == [[5.0, -1.0]]
    assert m.weight.tolist() == [[8.0, -3.0]]  # the trained weights back
    again = EMA(m, decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow[0], ema.shadow[0])


def test_config_bounds():
    assert load_config("epsilon")["ema"] == {"decay": 0.0, "every": 1, "device": "cpu"}
    with pytest.raises(HakubooruError, match="ema.decay"):
        load_config("tiny", ["ema.decay=1.0"])
    with pytest.raises(HakubooruError, match="ema.device"):
        load_config("tiny", ["ema.device=tpu"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_test_shards(tmp_path_factory.mktemp("ema_shards"), n=20).dir


EMA_CFG = ["ema.decay=0.9", "train.save_every=2", "train.checkpoint_every=2"]


@pytest.mark.slow
def test_resumed_run_writes_the_same_ema(shards, tmp_path):
    assert setup(load_config("tiny"), shards, tmp_path / "recipe").ema is None
    straight = tmp_path / "straight"
    train(load_config("tiny", EMA_CFG + ["train.max_steps=4"]), shards, straight)
    assert sorted(p.name for p in straight.glob("lokr*.safetensors")) == [
        "lokr-00000002.safetensors", "lokr-ema-00000002.safetensors", "lokr-ema.safetensors", "lokr.safetensors"]
    with safe_open(straight / "lokr-ema.safetensors", "pt") as f:
        assert f.metadata()["ema_decay"] == "0.9"
    trained, averaged = load_file(straight / "lokr.safetensors"), load_file(straight / "lokr-ema.safetensors")
    assert trained.keys() == averaged.keys()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)  # the average lags the weights

    halves = tmp_path / "halves"
    train(load_config("tiny", EMA_CFG + ["train.max_steps=2"]), shards, halves)
    train(load_config("tiny", EMA_CFG + ["train.max_steps=4"]), shards, halves, resume=halves,
          allow_config_change=True)
    resumed = load_file(halves / "lokr-ema.safetensors")
    assert [k for k in averaged if not torch.equal(averaged[k], resumed[k])] == []
