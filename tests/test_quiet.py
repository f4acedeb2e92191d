"""The demo prints only the pipeline's own lines: no third-party notes (transformers' "requires
torchvision" when sampling imports diffusers' SDXL pipeline, bitsandbytes' 4-bit kernel), while
transformers' other warnings still pass."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import trainers.lokr  # noqa: F401  (installs the filters)
from tests.shardfactory import make_test_shards
from tests.test_resume import REPO

NOISE = re.compile(r"warn|deprecat|torchvision|\[transformers\]|\[diffusers\]|failed to load|kernel", re.I)


def test_training_with_samples_prints_only_its_own_lines(tmp_path):
    shards = make_test_shards(tmp_path / "shards", n=20).dir
    # the demo's training (images instead of a latent cache, decoded in 2 workers), samples at step 2
    done = subprocess.run([sys.executable, "-m", "trainers.lokr", "--config", "tiny", "--shards", str(shards),
                           "--output", str(tmp_path / "run"), "--max-steps", "2", "--set", "sample.every=2",
                           "--set", "data.workers=2"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "samples" / "00000002-sheet.png").exists()  # the pipeline was built
    lines = [s for s in re.split(r"[\r\n]", done.stderr + done.stdout) if s.strip()]
    assert [s for s in lines if NOISE.search(s)] == []
    assert lines[-1].startswith("trained 2 steps")


def test_only_the_torchvision_note_is_dropped():
    logger = logging.getLogger("transformers.utils.import_utils")

    def passes(message):
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                      "`CLIPImageProcessorPil` for backward compatibility.")
    assert passes("`Foo` requires a newer tokenizers version")
