"""The command blocks README.md, docs/shards.md and docs/lokr.md mark with
``<!-- commands: tests/test_docs_commands.py -->``, run as written, each line in a fresh
process, from an empty folder (``wds/``: shards written by webdataset.TarWriter first)."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.helpers import REPO
from tests.helpers.archives import folder_bytes
from tests.helpers.raycluster import new_mark, ray_env, stop_marked
from tests.helpers.shards import CLASSES, _image

MARK = "<!-- commands: tests/test_docs_commands.py -->"


def marked_commands(doc: str) -> list[list[str]]:
    """The command lines of every marked block of a document (one list per block)."""
    text = (REPO / doc).read_text()
    blocks = re.findall(re.escape(MARK) + r"\n```(?:sh|bash)\n(.*?)```", text, re.S)
    assert len(blocks) == text.count(MARK)
    return [[line for line in b.replace("\\\n", " ").splitlines() if line.strip()] for b in blocks]


def run_lines(lines, cwd, env=None):
    env = {**(env or os.environ), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HAKUBOORU_TARINDEX_CACHE": str(cwd / ".cache")}
    outputs = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        outputs.append(done)
    return outputs


def _records(out: Path):
    """Every .json record of a shard folder, read with tarfile."""
    import tarfile

    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    yield json.loads(tar.extractfile(m).read())


def write_wds(folder: Path, n: int = 12) -> None:
    """A webdataset folder as another tool writes it: png + txt per sample."""
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i in range(n):
            buf = io.BytesIO()
            cls = list(CLASSES)[i % 4]
            _image(cls, 64, 64 + 32 * (i % 2), True, np.random.default_rng(i)).save(buf, "PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": f"{cls}, tag{i % 3}, sky"})


@pytest.mark.slow
def test_docs_shards_walkthrough(tmp_path):
    _, demo, foreign = marked_commands("docs/shards.md")
    outputs = run_lines(demo, tmp_path)
    assert "num_rows" in outputs[3].stdout
    assert " ||| " in outputs[4].stdout  # the first sample's caption, keep separator included
    images = [p for p in (tmp_path / "train" / "2_danbooru").iterdir() if p.suffix != ".txt"]
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert len(meta) == len(images) > 100
    # keep ||| general ||| quality, year, meta, rating: the tail after the second separator ends
    # in a rating tag (recipe §2), in every caption that has one
    texts = [p.read_text() for p in (tmp_path / "train" / "2_danbooru").glob("*.txt")]
    tails = [t.split(" ||| ")[2] for t in texts if t.count("|||") == 2]
    assert len(tails) > 100 and all(t.endswith(("safe", "sensitive", "nsfw", "explicit")) for t in tails)
    # `captions`: one sample in five epochs, keep group and tail the same in each, from its record
    rows = [line.split("\t") for line in outputs[6].stdout.splitlines()]
    assert [int(r[1]) for r in rows] == [0, 1, 2, 3, 4] and len({r[0] for r in rows}) == 1
    (record,) = [x for x in _records(tmp_path / "out") if x["id"] == int(rows[0][0])]
    tail = record["quality"] + record["year"] + record["meta"] + record["rating_tags"]
    for _, _, caption in rows:
        tags = caption.split(", ")
        assert tags[:len(record["keep"])] == record["keep"] and tags[len(tags) - len(tail):] == tail
    assert len({r[2] for r in rows}) > 1
    write_wds(tmp_path / "wds")
    run_lines(foreign, tmp_path)
    assert (tmp_path / "wds" / "index.parquet").is_file()
    assert (tmp_path / "runs" / "wds" / "lokr.safetensors").is_file()


@pytest.mark.slow
def test_readme_shard_commands(tmp_path):
    (lines,) = marked_commands("README.md")
    _, demo, _ = marked_commands("docs/shards.md")
    run_lines(demo[:3], tmp_path)  # the README's out/ comes from the build above
    write_wds(tmp_path / "wds")
    run_lines(lines, tmp_path)
    assert (tmp_path / "train" / "2_danbooru").is_dir() and (tmp_path / "wds" / "manifest.json").is_file()


@pytest.mark.slow
def test_docs_ray_cluster_walkthrough(tmp_path):
    """Two Ray nodes on this machine (their own home for the token, their own temp folder), the
    build through them, and the comparison with the local build; then those nodes are ended."""
    cluster, demo, _ = marked_commands("docs/shards.md")
    run_lines(demo[:3], tmp_path)
    mark = new_mark()
    (tmp_path / "home").mkdir()
    env = {**ray_env(mark), "HOME": str(tmp_path / "home")}
    del env["RAY_AUTH_MODE"]  # the commands set it where Ray needs it
    try:
        outputs = run_lines(cluster, tmp_path, env)
    finally:
        stop_marked(mark)
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()
    assert folder_bytes(tmp_path / "out-ray") == folder_bytes(tmp_path / "out")
    # the terminal shows the progress bars and the end-of-run line, no line of Ray's
    lines = [line.strip() for line in outputs[3].stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("out-ray: 3 shards built, 0 verified (of 3); 300 posts")
    assert all(line.startswith(("indexing archives", "verifying finished shards", "building shards"))
               for line in lines[:-1]), lines


@pytest.mark.slow
def test_docs_lokr_file_workflow(tmp_path):
    from tests.helpers.shards import make_test_shards

    (lines,) = marked_commands("docs/lokr.md")
    make_test_shards(tmp_path / "out", n=12)
    outputs = run_lines(lines, tmp_path)
    # the tiny config's LoKr, by hand: UNet Attention 88, FeedForward 22, ResnetBlock2D 11 x 2 convs +
    # time_emb_proj + 2 norms + 7 shortcuts = 62, Transformer2DModel 7 x (norm, proj_in, proj_out)
    # + 11 blocks x 3 LayerNorms = 54, 2 down- and 2 upsamplers, conv_in_out 3, embeddings 4;
    # text encoders 2 x 3 layers x 6 = 36: 273
    assert "(diffusers naming, 273 modules)" in outputs[1].stdout
    assert "diffusers naming" in outputs[2].stderr and (tmp_path / "merged.safetensors").is_file()
    assert "initialised the LoKr from run/lokr.safetensors: 273 modules, sd-scripts naming" in outputs[3].stderr
    assert (tmp_path / "rev2" / "lokr.safetensors").is_file()


@pytest.mark.slow
def test_docs_eval_walkthrough(tmp_path, synth_demo):
    from tests.helpers.builds import build_every_post
    from tests.helpers.tiny_lokr import trained_lokr
    from trainers.lokr.network.lokr import save_lokr

    (lines,) = marked_commands("docs/eval.md")
    build_every_post(synth_demo, tmp_path / "build", tmp_path / "out")
    (tmp_path / "danbooru2023.db").symlink_to(synth_demo[0])
    sdxl, network, _ = trained_lokr()
    save_lokr(network, tmp_path / "rev1.safetensors", {"step": 1}, unet=sdxl.unet, dtype="fp32")
    outputs = run_lines(lines, tmp_path)
    assert "STAND-IN" in outputs[0].stdout
    assert outputs[1].stdout.startswith("eval: base CCIP ") and "rev1 CCIP " in outputs[1].stdout
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["base", "rev1"] and len(summary["characters"]) == 3
