"""`python -m hakubooru export --to kohya`: the folders checked file by file against the layout
sd-scripts reads (library/config_util.py, library/train_util.py, finetune/merge_*_to_metadata.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from hakubooru.builder import build_shards
from hakubooru.db import open_db
from hakubooru.selector import Selector

# sd-scripts' library/train_util.py IMAGE_EXTENSIONS, copied
SD_SCRIPTS_IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG",
                               ".WEBP", ".BMP"]


def hakubooru(*args):
    return subprocess.run([sys.executable, "-m", "hakubooru", *map(str, args)],
                          capture_output=True, text=True)


def tar_samples(out) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard, read with tarfile."""
    samples = {}
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def dreambooth_params(name: str):
    """sd-scripts' extract_dreambooth_params (library/config_util.py), copied."""
    tokens = name.split("_")
    return int(tokens[0]), "_".join(tokens[1:])


def sd_scripts_split(caption: str, keep_tokens_separator: str, caption_separator: str = ","):
    """The fixed, flexible and fixed-suffix tokens sd-scripts' shuffle_caption works on
    (library/train_util.py, process_caption)."""
    fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
    suffix = []
    if keep_tokens_separator in flex_part:
        flex_part, suffix_part = flex_part.split(keep_tokens_separator, 1)
        suffix = [t.strip() for t in suffix_part.split(caption_separator) if t.strip()]
    fixed = [t.strip() for t in fixed_part.split(caption_separator) if t.strip()]
    flex = [t.strip() for t in flex_part.split(caption_separator) if t.strip()]
    return fixed, flex, suffix


def folder_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def shards(synth_demo, tmp_path_factory):
    db, images = synth_demo
    tmp = tmp_path_factory.mktemp("export")
    Selector.all().sample(60, seed=3).save(tmp / "sel.parquet", open_db(db))
    out = tmp / "out"
    build_shards(db, images, tmp / "sel.parquet", out, shard_size=25, cache_dir=tmp / "cache",
                 progress=False)
    return out


def test_kohya_folder_matches_the_sd_scripts_layout(shards, tmp_path):
    dest = tmp_path / "train"
    done = hakubooru("export", shards, "--to", "kohya", dest, "--repeats", 5, "--name", "miku",
                     "--metadata-json", tmp_path / "meta.json")
    assert done.returncode == 0, done.stderr
    samples = tar_samples(shards)
    assert len(samples) > 40
    assert [p.name for p in dest.iterdir()] == ["5_miku"]
    assert dreambooth_params("5_miku") == (5, "miku")
    folder = dest / "5_miku"
    files = folder_files(folder)
    want = {}
    for key, members in samples.items():
        (ext,) = [e for e in members if e not in ("txt", "json")]
        assert "." + ext in SD_SCRIPTS_IMAGE_EXTENSIONS
        want[f"{key}.{ext}"] = members[ext]
        want[f"{key}.txt"] = members["txt"]
    assert files == want  # every image and caption byte for byte, nothing else
    assert f"{folder}: {len(samples)} images ({len(samples)} copied, 0 already there)" in done.stderr

    meta = json.loads((tmp_path / "meta.json").read_text())
    # byte for byte what sd-scripts' merge scripts write: json.dumps(metadata, indent=2)
    assert (tmp_path / "meta.json").read_text() == json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    assert list(meta) == sorted(meta, key=lambda p: int(os.path.basename(p).split(".")[0]))
    assert set(meta) == {os.path.abspath(folder / name) for name in want if not name.endswith(".txt")}
    for path, entry in meta.items():
        key = os.path.basename(path).split(".")[0]
        assert entry["caption"] == samples[key]["txt"].decode()
        assert entry["image_size"] == list(Image.open(path).size)


def test_keep_separator_moves_only_the_general_tags(shards, tmp_path):
    """keep ||| general ||| quality, year, meta, rating: sd-scripts keeps the first part in front,
    shuffles and drops the second and keeps the third at the end (recipe §2, the card's rule)."""
    dest = tmp_path / "train"
    assert hakubooru("export", shards, "--to", "kohya", dest, "--keep-separator", "|||",
                     "--quiet").returncode == 0
    samples = tar_samples(shards)
    checked = 0
    for key, members in samples.items():
        record = json.loads(members["json"])
        text = (dest / "1_hakubooru" / f"{key}.txt").read_text()
        tail = [t for g in ("quality", "year", "meta", "rating_tags") for t in record[g]]
        assert sd_scripts_split(text, "|||") == (record["keep"], record["general"], tail)
        if record["keep"] and record["general"] and tail:
            assert text == " ||| ".join(", ".join(p) for p in (record["keep"], record["general"], tail))
            checked += 1
    assert checked > 30


def test_keep_separator_txt_gives_the_record_paths_captions(shards, tmp_path):
    """A .txt exported with --keep-separator, read by the trainer's text path, gives the captions
    the record path gives: the same tags fixed, the same general tags moved (and, per (seed,
    epoch, id), the same draws); over 2,000 epochs each general tag is absent 15 % ± 4 sigma."""
    from trainers.lokr.data.augment import augment_caption, augment_text

    dest = tmp_path / "train"
    assert hakubooru("export", shards, "--to", "kohya", dest, "--keep-separator", "|||",
                     "--quiet").returncode == 0
    samples = tar_samples(shards)
    key = max(samples, key=lambda k: len(json.loads(samples[k]["json"])["general"]))
    record = json.loads(samples[key]["json"])
    text = (dest / "1_hakubooru" / f"{key}.txt").read_text()
    assert len(record["general"]) >= 5
    from_text = [augment_text(text, seed=0, epoch=e, sample_id=record["id"]) for e in range(2000)]
    from_record = [augment_caption(record, seed=0, epoch=e) for e in range(2000)]
    assert from_text == from_record
    sigma = (2000 * 0.15 * 0.85) ** 0.5
    for tag in record["general"]:
        absent = sum(tag not in c.split(", ") for c in from_text)
        assert abs(absent - 300) < 4 * sigma, (tag, absent)

    # and through the trainer's own text path: the exported image + .txt as a webdataset
    # folder of another tool (no records), indexed; the trainer reads the .txt
    from hakubooru.wdsindex import index_webdataset
    from trainers.lokr.config import load_config
    from trainers.lokr.data.batches import BatchDataset, BatchPlan, dataset_options
    from trainers.lokr.data.index import load_index

    wds = tmp_path / "wds"
    wds.mkdir()
    folder = dest / "1_hakubooru"
    with tarfile.open(wds / "00000.tar", "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    index_webdataset(wds, progress=False)
    index = load_index(wds)
    dataset = BatchDataset(wds, index, BatchPlan(index, 1, 0, 0, [(64, 64)]), epoch=7,
                           **dataset_options(load_config("epsilon")))
    row = int(list(index.ids).index(record["id"]))
    assert dataset.captions_from(row) == "text"
    assert dataset.sample_caption(row) == from_record[7]


@pytest.mark.slow
def test_rerun_after_a_kill_completes_with_identical_files(shards, tmp_path):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert hakubooru("export", shards, "--to", "kohya", fresh, "--quiet").returncode == 0
    assert hakubooru("export", shards, "--to", "kohya", resumed, "--quiet").returncode == 0
    folder = resumed / "1_hakubooru"
    images = sorted(p for p in folder.iterdir() if p.suffix != ".txt")
    # what a killed run leaves: files not yet written, and a temporary file mid-write
    for p in images[:10]:
        p.unlink()
    (folder / f".{images[0].name}.export-tmp").write_bytes(b"half an image")
    (folder / images[11].with_suffix(".txt").name).unlink()
    # and what a non-atomic writer would leave: an image cut short, a caption changed
    images[12].write_bytes(images[12].read_bytes()[:100])
    images[13].with_suffix(".txt").write_text("stale")
    done = hakubooru("export", shards, "--to", "kohya", resumed, "--quiet")
    assert done.returncode == 0
    n = len(images)
    assert f"{n} images (11 copied, {n - 11} already there)" in done.stderr
    assert folder_files(folder) == folder_files(fresh / "1_hakubooru")


@pytest.mark.slow
def test_export_killed_midway_resumes(synth_demo, tmp_path):
    db, images = synth_demo
    Selector.all().save(tmp_path / "all.parquet", open_db(db))
    shards = tmp_path / "all"
    build_shards(db, images, tmp_path / "all.parquet", shards, shard_size=200,
                 cache_dir=tmp_path / "cache", progress=False)
    assert hakubooru("export", shards, "--to", "kohya", tmp_path / "whole", "--quiet",
                     "--metadata-json", tmp_path / "whole.json").returncode == 0
    folder = tmp_path / "killed" / "1_hakubooru"
    cmd = [sys.executable, "-m", "hakubooru", "export", str(shards), "--to", "kohya",
           str(tmp_path / "killed"), "--quiet", "--metadata-json", str(tmp_path / "killed.json")]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while (not folder.is_dir() or len(os.listdir(folder)) < 20) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists(), "the export finished before it could be killed"
    assert 0 < len(os.listdir(folder)) < len(os.listdir(tmp_path / "whole" / "1_hakubooru"))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert folder_files(folder) == folder_files(tmp_path / "whole" / "1_hakubooru")
    assert not [p for p in (tmp_path).iterdir() if p.name.endswith(".export-tmp")]
    whole = json.loads((tmp_path / "whole.json").read_text())
    killed = json.loads((tmp_path / "killed.json").read_text())
    assert list(killed.values()) == list(whole.values())


@pytest.mark.parametrize("args, message", [
    (["--link", "hard"], "cannot be hard-linked (a hard link names a whole file); use --link copy"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--name", "a/b"], "--name must be a non-empty folder name"),
])
def test_bad_export_options_are_one_line(shards, tmp_path, args, message):
    done = hakubooru("export", shards, "--to", "kohya", tmp_path / "d", *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "d").exists()


def test_other_targets_and_a_shard_file_are_refused(shards, tmp_path):
    done = hakubooru("export", shards, "--to", "diffusers", tmp_path / "d")
    assert (done.returncode, done.stderr.strip()) == (
        2, "error: --to diffusers: the only export format is kohya (sd-scripts folders)")
    shard = shards / "shard-000000.tar"
    done = hakubooru("export", shard, "--to", "kohya", tmp_path / "d")
    assert (done.returncode, done.stderr.strip()) == (
        2, f"error: {shard} is one shard; pass the folder that holds the shards and "
           f"index.parquet ({shards})")


def test_empty_caption_gets_no_file_and_is_counted(tmp_path, capsys):
    """Three samples, the middle one with every caption group empty (an empty .txt): two caption
    files, none for it (sd-scripts refuses empty caption files), and the counts say so — also on
    a rerun, which keeps every file ("captions" counts the files present after the run)."""
    from hakubooru.export import export_kohya
    from tests.helpers.shards import write_shard_folder

    def record(post_id, keep):
        return {"id": post_id, "width": 8, "height": 8, "keep": keep, "general": [], "quality": [],
                "year": [], "meta": [], "rating_tags": []}

    samples = [(record(1, ["1girl"]), b"png one"), (record(2, []), b"png two"),
               (record(3, ["1boy"]), b"png three")]
    shards = write_shard_folder(tmp_path / "shards", samples)  # not images: export copies bytes
    folder = tmp_path / "train" / "1_hakubooru"
    for copied, kept in ((3, 0), (0, 3)):
        result = export_kohya(shards, tmp_path / "train", progress=False)
        assert (result.images, result.copied, result.kept, result.captions, result.no_caption) == (
            3, copied, kept, 2, 1)
        assert capsys.readouterr().err == (f"{folder}: 3 images ({copied} copied, {kept} already "
                                           "there), 2 captions, 1 without caption\n")
        assert sorted(p.name for p in folder.iterdir()) == ["1.png", "1.txt", "2.png", "3.png", "3.txt"]
        assert (folder / "1.txt").read_text() == "1girl" and (folder / "3.txt").read_text() == "1boy"


def test_export_refuses_what_is_not_a_readable_shard_folder(tmp_path):
    """shard_folder / read_index: a missing folder, a file, a folder without index.parquet (with
    the commands that make one) and an unreadable index are each one HakubooruError line."""
    from hakubooru.errors import HakubooruError
    from hakubooru.export import export_kohya

    dest = tmp_path / "train"
    (tmp_path / "notes.txt").write_text("not shards")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.parquet").write_bytes(b"not parquet")
    for shards, message in [
        (tmp_path / "nope", f"shard folder {tmp_path / 'nope'} does not exist"),
        (tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file; pass a shard folder"),
        (empty, f"{empty} has no index.parquet: build it with `python -m hakubooru build`, or index "
                f"a webdataset folder with `python -m hakubooru index {empty}`"),
    ]:
        with pytest.raises(HakubooruError) as e:
            export_kohya(shards, dest, progress=False)
        assert str(e.value) == message
    with pytest.raises(HakubooruError) as e:
        export_kohya(broken, dest, progress=False)
    assert str(e.value).startswith(f"cannot read {broken / 'index.parquet'}: ") and "\n" not in str(e.value)
    assert not dest.exists()


def test_export_refuses_to_run_without_to(tmp_path, capsys):
    """--to FORMAT DIR is required (argparse's exit 2 naming it); with it, a missing folder is
    the one-line error of the export itself."""
    from hakubooru.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "shards")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m hakubooru export: error: the following arguments are required: --to")
    assert main(["export", str(tmp_path / "shards"), "--to", "kohya", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == f"error: shard folder {tmp_path / 'shards'} does not exist\n"


def test_webdataset_keys_become_stems_and_a_clash_is_refused(tmp_path):
    """An indexed webdataset folder: the stem is the key with '/' written '_', files go shard by
    shard in name order (the metadata JSON's order); keys that would name one file are refused
    before anything is written."""
    import webdataset as wds

    from hakubooru.errors import HakubooruError
    from hakubooru.export import export_kohya
    from hakubooru.wdsindex import index_webdataset

    def folder(name, shards):
        root = tmp_path / name
        root.mkdir()
        for shard, keys in shards.items():
            with wds.TarWriter(str(root / shard)) as sink:
                for key in keys:
                    png = tmp_path / "one.png"
                    Image.new("RGB", (2, 3)).save(png)
                    sink.write({"__key__": key, "png": png.read_bytes(), "txt": f"caption of {key}"})
        index_webdataset(root, progress=False)
        return root

    good = folder("good", {"b.tar": ["cats/x1", "cats/x0"], "a.tar": ["dogs/y"]})
    meta = tmp_path / "meta.json"
    export_kohya(good, tmp_path / "train", metadata_json=meta, progress=False)
    out = tmp_path / "train" / "1_hakubooru"
    assert sorted(p.name for p in out.iterdir()) == ["cats_x0.png", "cats_x0.txt", "cats_x1.png", "cats_x1.txt",
                                                    "dogs_y.png", "dogs_y.txt"]
    assert (out / "cats_x0.txt").read_text() == "caption of cats/x0"
    assert [os.path.basename(k) for k in json.loads(meta.read_text())] == ["dogs_y.png", "cats_x1.png", "cats_x0.png"]
    clash = folder("clash", {"a.tar": ["a/b", "a_b"]})
    with pytest.raises(HakubooruError, match="two samples would get the same file name"):
        export_kohya(clash, tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()
