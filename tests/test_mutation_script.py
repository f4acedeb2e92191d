"""scripts/mutation.py as docs/testing.md shows it: the module list, and a two-mutant run."""
import subprocess
import sys

import pytest

from tests.helpers import REPO


def test_list():
    out = subprocess.run([sys.executable, "scripts/mutation.py", "--list"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.startswith("hakubooru/rng.py: tests/hakubooru/test_rng.py")
    assert "trainers/lokr/train.py: " in out and "(lines: step-functions)" in out


def test_two_mutants_of_rng_are_killed(tmp_path):
    pytest.importorskip("cosmic_ray")
    run = subprocess.run([sys.executable, "scripts/mutation.py", "hakubooru/rng.py", "--sample", "2",
                          "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "hakubooru/rng.py: 2 killed, 0 survived, 0 incompetent/timeout; score 100.0%" in run.stdout
    assert not subprocess.run(["git", "status", "--porcelain", "hakubooru/rng.py"], cwd=REPO,
                              capture_output=True, text=True).stdout  # the checkout was not mutated
