"""The demo prints only the pipeline's own lines: no third-party notes (transformers' "requires
torchvision" when sampling imports diffusers' SDXL pipeline, bitsandbytes' 4-bit kernel), while
transformers' other warnings still pass."""
from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys

import pytest

import trainers.lokr  # noqa: F401  (installs the filters)
from tests.helpers import REPO
from tests.helpers.shards import make_test_shards

NOISE = re.compile(r"warn|deprecat|torchvision|\[transformers\]|\[diffusers\]|failed to load|kernel", re.I)


@pytest.mark.slow
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


def passes_filter(logger_name: str, message: str) -> bool:
    """Whether the filters on `logger_name` let a WARNING with `message` through."""
    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))


def test_only_the_torchvision_note_is_dropped():
    passes = functools.partial(passes_filter, "transformers.utils.import_utils")

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                      "`CLIPImageProcessorPil` for backward compatibility.")
    assert passes("`Foo` requires a newer tokenizers version")


def test_only_diffusers_empty_float32_note_is_dropped():
    """diffusers' note on `.to(dtype)` when no module needs float32 (every load of a real SDXL
    in bf16) is dropped; the same note naming modules still shows."""
    passes = functools.partial(passes_filter, "diffusers.models.modeling_utils")

    note = ("There are modules in UNet2DConditionModel that should be kept in float32: {}. Casting directly with "
            "`to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep "
            "these modules in float32.")
    assert not passes(note.format("[]"))
    assert passes(note.format("['conv_norm_out']"))
