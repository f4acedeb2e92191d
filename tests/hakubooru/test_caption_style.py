"""Caption styles chosen at build time: `build` takes the captioner's options, the shards'
.txt follow them, the manifest records them, and a resume with other ones is refused."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile

import pytest

from hakubooru.builder import build_shards
from hakubooru.db import open_db
from hakubooru.errors import HakubooruError
from hakubooru.selector import Selector

STYLE = ["--separator", ",", "--keep-separator", "|||", "--underscores", "keep",
         "--escape-parentheses", "--groups", "keep,general,rating_tags"]


def _samples(out):
    """{id: (txt, record)} of every sample in the folder's tars."""
    found = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".txt"):
                key = name[:-4]
                found[int(key)] = (data.decode(), json.loads(members[key + ".json"]))
    return found


@pytest.fixture(scope="module")
def styled(synth_demo, tmp_path_factory):
    db, images = synth_demo
    tmp = tmp_path_factory.mktemp("style")
    Selector.all().sample(80, seed=1).save(tmp / "sel.parquet", open_db(db))
    out = tmp / "out"
    cmd = [sys.executable, "-m", "hakubooru", "build", "--db", str(db), "--images", str(images),
           "--selection", str(tmp / "sel.parquet"), "--out", str(out), "--shard-size", "40",
           "--cache-dir", str(tmp / "cache"), "--quiet", *STYLE]
    subprocess.run(cmd, check=True, capture_output=True)
    return {"db": db, "images": images, "tmp": tmp, "out": out, "cmd": cmd}


def test_build_writes_captions_in_the_chosen_style(styled):
    samples = _samples(styled["out"])
    assert len(samples) > 20
    names = {}
    with sqlite3.connect(styled["db"]) as conn:
        for post_id, name in conn.execute("SELECT r.post_id, t.name FROM posttagrelation r "
                                          "JOIN tag t ON t.id = r.tag_id"):
            names.setdefault(post_id, set()).add(name)
    with_keep = 0
    for post_id, (txt, rec) in samples.items():
        assert rec["quality"] == rec["year"] == rec["meta"] == []  # groups not emitted
        assert set(rec["keep"] + rec["general"]) <= names[post_id]  # danbooru names, underscores kept
        keep, general, rating = (",".join(rec[g]) for g in ("keep", "general", "rating_tags"))
        # keep ||| general ||| tail (here the rating alone): the first separator always
        want = " ".join(p for p in [keep, "|||", general] + (["|||", rating] if rating else []) if p)
        assert txt == want.replace("(", "\\(").replace(")", "\\)")
        with_keep += bool(keep)
    assert with_keep > 10
    assert any("_" in t for _, rec in samples.values() for t in rec["general"])
    settings = json.loads((styled["out"] / "manifest.json").read_text())["captioner"]
    assert (settings["separator"], settings["keep_separator"], settings["underscores"],
            settings["escape_parentheses"], settings["groups"]) == \
        (",", "|||", "keep", True, ["keep", "general", "rating_tags"])


@pytest.mark.slow
def test_resume_with_another_style_is_refused(styled):
    cmd = [a if a != "|||" else "::" for a in styled["cmd"]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {styled['out']} was built from other inputs (different captioner); "
        "use a new output folder"]
    # the same options resume (verify) without complaint
    assert subprocess.run(styled["cmd"], capture_output=True).returncode == 0


def test_python_api_takes_caption_options(styled, tmp_path):
    out = tmp_path / "api"
    build_shards(styled["db"], styled["images"], styled["tmp"] / "sel.parquet", out,
                 shard_size=40, cache_dir=styled["tmp"] / "cache", progress=False,
                 caption_options={"separator": ",", "keep_separator": "|||",
                                  "underscores": "keep", "escape_parentheses": True,
                                  "groups": ["keep", "general", "rating_tags"]})
    for name in ("shard-000000.tar", "manifest.json", "README.md"):
        assert (out / name).read_bytes() == (styled["out"] / name).read_bytes()
    with pytest.raises(HakubooruError, match="either a captioner or caption_options"):
        build_shards(styled["db"], styled["images"], styled["tmp"] / "sel.parquet", out,
                     captioner=object(), caption_options={"separator": ","})


def test_caption_options_from_the_command_line(tmp_path):
    """The options' defaults are the documented ones (docs/shards.md "Caption style": ", ",
    the six groups, spaces, quality tags up to id 7,500,000, thresholds computed); "none"
    (any case, spaces around) lifts the id limit; --quality-table is read as JSON; a bad
    limit or an unreadable or non-JSON table is one HakubooruError line."""
    import argparse

    from hakubooru.commands.caption_style import add_caption_arguments, caption_options

    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    assert caption_options(parser.parse_args([])) == {
        "quality": None, "separator": ", ", "group_separator": None, "escape_parentheses": False,
        "groups": ["keep", "general", "quality", "year", "meta", "rating_tags"],
        "keep_separator": None, "underscores": "spaces", "no_quality_above_id": 7_500_000}
    for text, limit in (("none", None), (" None ", None), ("12", 12)):
        assert caption_options(parser.parse_args(["--no-quality-above-id", text]))[
            "no_quality_above_id"] == limit
    with pytest.raises(HakubooruError, match=r"^--no-quality-above-id must be an integer or "
                                             r"'none', got 'x'$"):
        caption_options(parser.parse_args(["--no-quality-above-id", "x"]))
    table = {"general": {"50": 1, "75": 2, "90": 3}}
    (tmp_path / "q.json").write_text(json.dumps(table))
    assert caption_options(parser.parse_args(["--quality-table", str(tmp_path / "q.json")]))[
        "quality"] == table
    (tmp_path / "bad.json").write_text("{not json")
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(HakubooruError, match=f"^cannot read quality table {path}: "):
            caption_options(parser.parse_args(["--quality-table", str(path)]))
