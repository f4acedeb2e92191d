"""``python -m trainers.lokr eval`` end to end on the tiny SDXL, shards of the synthetic demo
database and a stand-in CCIP model exported to ONNX here (nothing is downloaded).

Pinned against independent readers: the characters against the rule applied to the records
read with tarfile and the tag types read with sqlite3; the scores against CCIP recomputed with
onnxruntime alone from the saved PNGs and the reference images read from the shard tars.
Two runs, a subset run and a killed-then-resumed run give the same table and images; a LoKr that
changes the model changes the scores."""
from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hakubooru.tagrules import format_tag
from tests.helpers import REPO
from tests.helpers.builds import build_every_post
from tests.helpers.tiny_lokr import trained_lokr
from trainers.lokr.__main__ import main as lokr_main
from trainers.lokr.network.lokr import save_lokr
from trainers.lokr.observe.ccip_standin import write_standin

pytestmark = pytest.mark.slow

CHARS, K, N = 3, 2, 2
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def setup(synth_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    shards = build_every_post(synth_demo, tmp, tmp / "out")
    sdxl, network, _ = trained_lokr()
    lokr = save_lokr(network, tmp / "rev1.safetensors", {"step": 1}, unet=sdxl.unet, dtype="fp32")
    return {"tmp": tmp, "shards": shards, "db": synth_demo[0], "lokr": lokr, "ccip": write_standin(tmp / "ccip")}


def _args(s, out, *extra, characters=CHARS):
    return ["eval", "--pretrained", "tiny", "--config", "tiny", "--shards", str(s["shards"]), "--db", str(s["db"]),
            "--out", str(out), "--characters", str(characters), "--references", str(K),
            "--images-per-character", str(N), "--ccip-model", str(s["ccip"]), "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(setup):
    out = setup["tmp"] / "run1"
    assert lokr_main(_args(setup, out, "--lokr", str(setup["lokr"]))) == 0
    return out


def _records(shards: Path) -> dict[int, dict]:
    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[int(m.name.split(".")[0])] = json.loads(tar.extractfile(m).read())
    return out


def _image_bytes(shards: Path, post_id: int) -> bytes:
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                stem, ext = m.name.split(".", 1)
                if stem == str(post_id) and ext not in ("json", "txt"):
                    return tar.extractfile(m).read()
    raise AssertionError(f"no image for {post_id}")


def _expected_characters(shards: Path, db: Path) -> list[tuple[str, int]]:
    con = sqlite3.connect(db)
    types = {format_tag(n): t for n, t in con.execute("SELECT name, type FROM tag")}
    people_all = {format_tag(t) for t in ("1girl", "2girls", "multiple_girls", "1boy", "2boys", "multiple_boys",
                                          "male_focus", "1other", "2others", "multiple_others", "3girls", "3boys")}
    counts = Counter()
    for record in _records(shards).values():
        keep = record["keep"]
        people = [t for t in keep if t in people_all or t.endswith(("girls", "boys", "others"))]
        chars = [t for t in keep if types.get(t) == 2]  # TAG_TYPES index of "character"
        if len(chars) == 1 and people in (["1girl"], ["1boy"], ["1other"]):
            counts[chars[0]] += 1
    return sorted(((c, n) for c, n in counts.items() if n >= K), key=lambda x: (-x[1], x[0]))[:CHARS]


def _features(session, images) -> np.ndarray:
    data = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((384, 384), Image.BILINEAR), np.float32) / 255.0
        data.append(((a - MEAN) / STD).transpose(2, 0, 1))
    return session.run(["output"], {"input": np.stack(data).astype(np.float32)})[0]


def test_characters_follow_the_rule(run, setup):
    table = pq.read_table(run / "characters.parquet").to_pylist()
    assert [(r["character"], r["samples"]) for r in table] == _expected_characters(setup["shards"], setup["db"])
    for r in table:
        assert r["prompt"].split(", ")[:2] == [r["people"], r["character"]]
        assert r["prompt"].endswith("masterpiece, newest, safe") and len(r["reference_ids"]) == K


def test_scores_equal_an_independent_ccip(run, setup):
    feat = ort.InferenceSession(str(setup["ccip"] / "model_feat.onnx"))
    metric = ort.InferenceSession(str(setup["ccip"] / "model_metrics.onnx"))
    threshold = json.loads((setup["ccip"] / "metrics.json").read_text())["threshold"]
    chars = {r["character"]: r for r in pq.read_table(run / "characters.parquet").to_pylist()}
    scores = pq.read_table(run / "scores.parquet").to_pylist()
    assert len(scores) == 2 * CHARS * N and {r["model"] for r in scores} == {"base", "rev1"}
    per_char = {}
    for r in scores:
        refs = [Image.open(io.BytesIO(_image_bytes(setup["shards"], i)))
                for i in chars[r["character"]]["reference_ids"]]
        g = _features(feat, [Image.open(run / r["path"])])
        f = _features(feat, refs)
        d = metric.run(["output"], {"input": np.concatenate([g, f])})[0][0, 1:]
        assert r["similarity"] == pytest.approx(1 - d.astype(np.float64).mean(), abs=1e-5)
        assert r["same"] == np.mean(d <= threshold)
        per_char.setdefault((r["model"], r["character"]), []).append(1 - d.astype(np.float64).mean())
    summary = json.loads((run / "summary.json").read_text())
    for m in summary["models"]:
        expected = np.mean([np.mean(v) for (model, _), v in per_char.items() if model == m["name"]])
        assert m["ccip"] == pytest.approx(expected, abs=1e-5)
    page = (run / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "Largest gain and loss" in page


def test_a_lokr_changes_the_scores(run):
    rows = pq.read_table(run / "scores.parquet").to_pylist()
    base = [r["similarity"] for r in rows if r["model"] == "base"]
    lokr = [r["similarity"] for r in rows if r["model"] == "rev1"]
    assert max(abs(a - b) for a, b in zip(base, lokr)) > 1e-3


def _same_run(a: Path, b: Path):
    ta, tb = pq.read_table(a / "scores.parquet"), pq.read_table(b / "scores.parquet")
    assert ta.equals(tb)
    for r in ta.to_pylist():
        assert (a / r["path"]).read_bytes() == (b / r["path"]).read_bytes()


def test_two_runs_and_a_subset_give_the_same_images(run, setup):
    again = setup["tmp"] / "run2"
    assert lokr_main(_args(setup, again, "--lokr", str(setup["lokr"]))) == 0
    _same_run(run, again)
    subset = setup["tmp"] / "subset"
    assert lokr_main(_args(setup, subset, characters=1)) == 0
    row = pq.read_table(subset / "scores.parquet").to_pylist()
    full = {(r["model"], r["character"], r["image"]): r for r in pq.read_table(run / "scores.parquet").to_pylist()}
    for r in row:
        assert (subset / r["path"]).read_bytes() == (run / full[(r["model"], r["character"], r["image"])]["path"]).read_bytes()
        assert r["similarity"] == full[(r["model"], r["character"], r["image"])]["similarity"]


def test_a_killed_eval_resumes_to_the_same_table(run, setup):
    out = setup["tmp"] / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trainers.lokr", *_args(setup, out, "--lokr", str(setup["lokr"]))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((out / "parts").glob("*/*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list((out / "parts").glob("*/*.parquet"))
    assert 1 <= len(parts) < 2 * CHARS  # killed part-way
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same_run(run, out)


def test_other_settings_in_the_same_folder_are_one_line(run, setup):
    proc = subprocess.run([sys.executable, "-m", "trainers.lokr", *_args(setup, run, "--lokr", str(setup["lokr"]), "--seed", "5")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "other settings (seed differ)" in proc.stderr


def test_a_missing_ccip_model_or_extra_is_one_line(setup, tmp_path):
    args = _args(setup, tmp_path / "e")
    args[args.index("--ccip-model") + 1] = str(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, "-m", "trainers.lokr", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "huggingface-cli download deepghs/ccip_onnx" in proc.stderr
    blocked = ("import sys; sys.modules['imgutils'] = None; from trainers.lokr.__main__ import main; "
               f"sys.exit(main({_args(setup, tmp_path / 'e')!r}))")
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "pip install 'hakubooru[eval]'" in proc.stderr


def test_two_torchrun_ranks_give_the_same_table(run, setup):
    out = setup["tmp"] / "ddp"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainers.lokr", *_args(setup, out, "--lokr", str(setup["lokr"]))]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(run, out)
    assert done.stdout.count("eval: base CCIP") == 1  # rank 0 alone reports


def test_an_eval_in_this_process_leaves_sigterm_as_it_found_it(setup, tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert lokr_main(_args(setup, tmp_path / "e", "--references", "100000")) == 2  # stops once SIGTERM is set
    assert "no character of" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
