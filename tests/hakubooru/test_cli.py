"""`python -m hakubooru`: help for users, defaults shown, no silent overwrite, a shard file
given for a folder is named as such."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hakubooru.cli import COMMANDS, make_parser
from hakubooru.errors import HakubooruError
from trainers.lokr.data.index import load_index


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


def test_no_command_prints_the_usage_help_error_and_exits_2():
    """Without a command argparse stops with its usage error (exit 2, "the following arguments are
    required: COMMAND"), not a traceback about a missing command."""
    done = hakubooru()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "python -m hakubooru: error: the following arguments are required: COMMAND")
    assert "Traceback" not in done.stderr


def test_run_command_statuses_and_one_line_messages(capsys):
    """errors.run_command (its docstring): the command's return value is the exit status (None
    -> 0); HakubooruError -> "error: <message>", 2; an OSError -> "error: <strerror>: <path>",
    2; Ctrl-C -> "interrupted", 130."""
    import errno

    from hakubooru.errors import run_command

    def fails(error):
        raise error

    assert run_command(lambda: 3) == 3
    assert run_command(lambda code: code, 1) == 1
    assert run_command(lambda: None) == 0
    assert capsys.readouterr().err == ""
    cases = [
        (HakubooruError("bad input"), 2, "error: bad input\n"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such.db"), 2,
         "error: No such file or directory: /no/such.db\n"),
        (PermissionError(errno.EACCES, "Permission denied"), 2, "error: Permission denied\n"),
        (KeyboardInterrupt(), 130, "interrupted\n"),
    ]
    for error, status, line in cases:
        assert run_command(fails, error) == status
        assert capsys.readouterr().err == line


def test_build_options_default_to_build_shards_documented_defaults():
    """docs/shards.md: build_shards(..., shard_size=1000, workers=1, part=None, image_format=None,
    quality=90, max_pixels=None, validate="standard", cache_dir=None, progress=True, ray=None,
    ray_retries=3, ray_tasks=None, images_index=None, connections=16, fetch_retries=5); `build`
    passes the same when no option is given, and --quiet is progress=False."""
    from hakubooru.commands.build import build_options

    parser, _ = make_parser()
    base = ["build", "--db", "d.db", "--images", "img", "--selection", "s.parquet", "--out", "o"]
    assert build_options(parser.parse_args(base)) == {
        "shard_size": 1000, "workers": 1, "part": None, "image_format": None, "quality": 90,
        "max_pixels": None, "validate": "standard", "cache_dir": None, "progress": True,
        "ray": None, "ray_retries": 3, "ray_tasks": None, "images_index": None, "connections": 16,
        "fetch_retries": 5}
    assert build_options(parser.parse_args(base + ["--quiet"]))["progress"] is False
    # --ray alone: a Ray started for the build; with an address: that cluster
    assert build_options(parser.parse_args(base + ["--ray"]))["ray"] == "local"
    assert build_options(parser.parse_args(base + ["--ray", "auto"]))["ray"] == "auto"


def test_select_without_db_or_expr_is_a_usage_error_named(capsys):
    """--db and --expr are required: argparse names the missing one (exit 2)."""
    from hakubooru.cli import main

    for args, missing in ((["--expr", "Selector.all()"], "--db"), (["--db", "x.db"], "--expr")):
        with pytest.raises(SystemExit) as e:
            main(["select", *args])
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"python -m hakubooru select: error: the following arguments are required: {missing}")


def test_select_prints_the_count_or_the_tree_and_keeps_a_selector_error_one_line(synth_db, capsys):
    """Without --out the count is printed (the 1,500-post synth_db: Selector.all() is 1500);
    --explain prints the tree instead ("all  [1,500]"); a HakubooruError of the expression itself (id_range with
    hi below lo) is shown as it is, not as "cannot evaluate --expr"."""
    from hakubooru.cli import main

    assert main(["select", "--db", str(synth_db), "--expr", "Selector.all()"]) == 0
    assert capsys.readouterr().out == "1500\n"
    assert main(["select", "--db", str(synth_db), "--expr", "Selector.all()", "--explain"]) == 0
    assert capsys.readouterr().out == "all  [1,500]\n"  # the tree: one node, its count
    assert main(["select", "--db", str(synth_db), "--expr", "Selector.id_range(5, 1)"]) == 2
    assert capsys.readouterr().err == "error: id_range: hi (1) is below lo (5)\n"


def test_build_merge_assembles_a_folder_that_has_no_index_yet(synth_demo, tmp_path, capsys):
    """`build --merge OUT` is for a folder built in parts whose manifest and index are not
    written yet: it must not ask for the index.parquet it is about to write (exit 0)."""
    from hakubooru.builder import build_shards
    from hakubooru.cli import main
    from hakubooru.db import open_db
    from hakubooru.selector import Selector

    db, images = synth_demo
    Selector.all().sample(12, seed=1).save(tmp_path / "sel.parquet", open_db(db))
    out = tmp_path / "out"
    for part in ("0/2", "1/2"):
        build_shards(db, images, tmp_path / "sel.parquet", out, shard_size=6, part=part,
                     cache_dir=tmp_path / "cache", progress=False)
    for name in ("index.parquet", "manifest.json"):  # as if the last part was killed before them
        (out / name).unlink()
    capsys.readouterr()
    assert main(["build", "--merge", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err.startswith(f"{out}: merged 2 shards; ")
    assert (out / "index.parquet").is_file() and (out / "manifest.json").is_file()
