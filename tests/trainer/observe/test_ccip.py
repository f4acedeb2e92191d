"""Where the CCIP model comes from: --ccip-model, else imgutils' Hub cache when it holds the
model (never a download), else one line saying how to get it."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO

FILES = ("model_feat.onnx", "model_metrics.onnx", "metrics.json")
RESOLVE = "from trainers.lokr.observe.ccip import resolve; print(resolve(None))"


def _resolve_with_cache(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", f"from hakubooru.errors import run_command; import sys; "
                           f"sys.exit(run_command(lambda: exec({RESOLVE!r})))"],
                          cwd=REPO, env=env, capture_output=True, text=True)


def test_the_hub_cache_is_used_when_it_holds_the_model(tmp_path):
    # huggingface_hub's cache layout, written by hand: refs/main -> snapshots/<commit>/<path>
    repo = tmp_path / "models--deepghs--ccip_onnx"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit / "ccip-caformer-24-randaug-pruned"
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).write_bytes(b"x")
    done = _resolve_with_cache(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder)


def test_an_empty_cache_is_one_line_saying_how_to_get_the_model(tmp_path):
    done = _resolve_with_cache(tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: no CCIP model: huggingface-cli download deepghs/ccip_onnx")
