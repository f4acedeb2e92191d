"""`python -m hakubooru`: help for users, defaults shown, no silent overwrite, a shard file
given for a folder is named as such."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hakubooru.cli import COMMANDS, make_parser
from hakubooru.errors import HakubooruError
from trainers.lokr.data import load_index


def hakubooru(*args):
    return subprocess.run([sys.executable, "-m", "hakubooru", *map(str, args)],
                          capture_output=True, text=True)


def test_main_help_describes_every_command():
    done = hakubooru("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "Turn the danbooru2023 database and image archives into captioned webdataset shards." in text
    for name in ("synth", "select", "caption", "build", "export", "index"):
        assert f" {name} " in text
    assert " ".join(COMMANDS["export"].split()) in text
    assert "python -m hakubooru COMMAND --help" in text
    assert "dispatch to" not in text  # not the module docstring


def _subparsers():
    parser, _ = make_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_with_a_default_shows_it(name):
    sub = _subparsers()[name]
    for action in sub._actions:
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            continue
        assert "default" in (action.help or ""), (name, action.option_strings)
    help_text = sub.format_help()
    assert "%(default)" not in help_text


def test_select_refuses_to_overwrite_without_the_flag(synth_db, tmp_path):
    out = tmp_path / "sel.parquet"
    out.write_bytes(b"keep me")
    done = hakubooru("select", "--db", synth_db, "--expr", "Selector.all()", "--out", out)
    assert (done.returncode, done.stderr.strip()) == (
        2, f"error: {out} exists; pass --overwrite to replace it")
    assert out.read_bytes() == b"keep me"
    done = hakubooru("select", "--db", synth_db, "--expr", "Selector.all()", "--out", out,
                     "--overwrite")
    assert done.returncode == 0 and out.read_bytes().startswith(b"PAR1")


def test_a_shard_file_instead_of_the_folder_is_named(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    shard = folder / "shard-000000.tar"
    shard.write_bytes(b"")
    message = (f"{shard} is one shard; pass the folder that holds the shards and index.parquet "
               f"({folder})")
    with pytest.raises(HakubooruError) as e:
        load_index(shard)
    assert str(e.value) == message
    for args in (["build", "--merge", shard], ["index", shard]):
        done = hakubooru(*args)
        assert (done.returncode, done.stderr.strip()) == (2, f"error: {message}")
    with pytest.raises(HakubooruError, match="has no index.parquet: build it with"):
        load_index(folder)
