"""examples/epsilon_selection.py passes every build option through to build_shards."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import REPO

EXAMPLE = REPO / "examples" / "epsilon_selection.py"


def test_help_lists_every_build_option():
    help_text = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True,
                               text=True, check=True).stdout
    build_help = subprocess.run([sys.executable, "-m", "hakubooru", "build", "--help"],
                                capture_output=True, text=True, check=True).stdout
    options = {w.strip("[],") for w in build_help.split() if w.startswith(("--", "[--"))}
    options -= {"--db", "--images", "--selection", "--out", "--merge", "--help"}
    assert {"--format", "--shard-size", "--part", "--max-pixels", "--keep-separator"} <= options
    for option in options:
        assert option in help_text, option


@pytest.mark.slow
def test_build_options_reach_the_shards(tmp_path):
    work, out = tmp_path / "demo", tmp_path / "out"
    done = subprocess.run(
        [sys.executable, EXAMPLE, "--workdir", work, "--out", out, "--demo-posts", "400",
         "--format", "png", "--shard-size", "7", "--max-pixels", "1024",
         "--keep-separator", "|||", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_size"] == 7
    assert manifest["image_policy"]["image_format"] == "png"
    assert manifest["image_policy"]["max_pixels"] == 1024
    assert manifest["captioner"]["keep_separator"] == "|||"
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names and all(n.endswith((".png", ".txt", ".json")) for n in names)
        assert any(" ||| " in tar.extractfile(n).read().decode() for n in names if n.endswith(".txt"))
