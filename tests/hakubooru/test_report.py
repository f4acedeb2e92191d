"""`python -m hakubooru report`: the numbers on the page against counts made directly from the
shards' tar members (read with tarfile, not through the index), and hand-derived token cuts.
The training buckets are the trainer's: tests/trainer/observe/test_dataset_report.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hakubooru import open_db
from hakubooru.tagrules import PEOPLE_COUNT_TAGS, format_tag
from tests.helpers import REPO as ROOT
from tests.helpers.builds import build_every_post
from tests.helpers.html_tables import Tables
from tests.helpers.shards import make_test_shards, write_shard_folder

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

GROUPS = ("keep", "general", "quality", "year", "meta", "rating_tags")


def run_report(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hakubooru", "report", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def records_from_tars(folder: Path) -> list[dict]:
    out = []
    for tar_path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.loads(tar.extractfile(m).read()))
    return out


@pytest.fixture(scope="module")
def demo_report(synth_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    build_every_post(synth_demo, tmp, tmp / "out", shard_size=40)
    proc = run_report(tmp / "out", "--html", tmp / "report.html", "--db", synth_demo[0], "--quiet")
    assert proc.returncode == 0, proc.stderr
    return tmp, Tables((tmp / "report.html").read_text()), records_from_tars(tmp / "out"), proc


@pytest.mark.slow
def test_counts_on_the_page_match_the_shards(demo_report):
    tmp, page, records, proc = demo_report
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    overview = {r[0]: r[1] for r in page.tables["overview"]}
    assert overview["dataset fingerprint"] == manifest["fingerprint"]
    assert int(overview["samples"].replace(",", "")) == len(records) == manifest["counts"]["written"]
    assert page.counts("rating") == Counter(r["rating"] for r in records)
    assert page.counts("year") == Counter(r["year"][0] if r["year"] else "none" for r in records)
    assert page.counts("quality") == Counter(r["quality"][0] if r["quality"] else "none" for r in records)
    assert page.counts("skipped") == manifest["counts"]["skipped_by_reason"]
    assert sum(page.counts("aspect").values()) == len(records)
    assert page.images >= 8  # embedded charts
    assert f"{len(records):,} samples" in proc.stderr


@pytest.mark.slow
def test_two_workers_write_the_same_page(demo_report, synth_demo):
    tmp, _, _, _ = demo_report
    proc = run_report(tmp / "out", "--html", tmp / "report-2.html", "--db", synth_demo[0], "--workers", "2",
                      "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "report-2.html").read_bytes() == (tmp / "report.html").read_bytes()


@pytest.mark.slow
def test_tag_tables_match_the_shards(demo_report, synth_demo):
    tmp, page, records, _ = demo_report
    db = open_db(synth_demo[0])
    kinds = {format_tag(name): kind for name, kind in db.execute_sql("SELECT name, type FROM tag")}
    type_names = ("general", "artist", "character", "copyright", "meta")
    people = {format_tag(t) for t in PEOPLE_COUNT_TAGS}
    direct = {c: Counter() for c in ("people", "character", "copyright", "artist", "general", "meta")}
    for r in records:
        direct["general"].update(r["general"])
        direct["meta"].update(r["meta"])
        for t in r["keep"]:
            direct["people" if t in people else type_names[kinds[t]]][t] += 1
    thresholds = {row[0]: row for row in page.tables["tag-thresholds"]}
    for cat, counter in direct.items():
        if not counter:
            continue
        top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:50]
        assert [(r[0], int(r[1].replace(",", ""))) for r in page.tables[f"tags-{cat}"]] == top
        assert int(thresholds[cat][1].replace(",", "")) == len(counter)
        assert int(thresholds[cat][4].replace(",", "")) == sum(c >= 100 for c in counter.values())
    assert "tags-character" in page.tables and "tags-artist" in page.tables


@pytest.mark.slow
def test_token_lengths_match_whole_caption_tokenization(demo_report):
    from hakubooru.clip_tokenizer import sdxl_tokenizer

    tmp, page, records, _ = demo_report
    tok = sdxl_tokenizer(1)
    captions = [", ".join(t for g in GROUPS for t in r[g]) for r in records]
    lengths = [len(ids) for ids in tok(captions, add_special_tokens=False).input_ids]
    over = page.counts("tokens")
    assert over["over 75 tokens"] == sum(n > 75 for n in lengths)
    assert over["over 150 tokens"] == sum(n > 150 for n in lengths)
    assert over["cut (over 225 = 3 × 75)"] == sum(n > 225 for n in lengths)
    stats = {r[0]: float(r[1]) for r in page.tables["token-stats"]}
    assert stats == pytest.approx({"median": np.percentile(lengths, 50), "90 %": np.percentile(lengths, 90),
                                   "99 %": np.percentile(lengths, 99), "max": max(lengths),
                                   "mean": np.mean(lengths)}, rel=1e-3)  # 4 significant digits


def _record(post_id, general, keep=("1girl",)):
    return {"id": post_id, "width": 64, "height": 64, "rating": "general", "keep": list(keep),
            "general": list(general), "meta": [], "quality": ["masterpiece"], "year": ["newest"],
            "rating_tags": ["safe"]}


@pytest.mark.slow
def test_cut_captions_and_tags_by_hand(tmp_path):
    # "cat" is one CLIP token and "," another: "1girl, cat×117, masterpiece, newest, safe" is
    # 3 ("1", "girl", ",") + 117·2 + 2 + 2 + 1 = 242 tokens. Cat i (0-based) ends at token
    # 3 + 2·i + 1, past 225 from i = 111: cats 111..116 (6), masterpiece, newest and safe are
    # cut, and 242 − 225 = 17 tokens.
    from hakubooru.clip_tokenizer import sdxl_tokenizer

    long_caption = ", ".join(["1girl"] + ["cat"] * 117 + ["masterpiece", "newest", "safe"])
    assert len(sdxl_tokenizer(1)(long_caption, add_special_tokens=False).input_ids) == 242
    samples = [(_record(1, ["cat"] * 117), b"x"), (_record(2, ["cat"]), b"y")]
    folder = write_shard_folder(tmp_path / "out", samples)  # not images: the report never decodes them
    assert run_report(folder, "--html", tmp_path / "r.html", "--quiet").returncode == 0
    page = Tables((tmp_path / "r.html").read_text())
    assert page.counts("tokens") == {"over 75 tokens": 1, "over 150 tokens": 1, "over 225 tokens": 1,
                                     "cut (over 225 = 3 × 75)": 1}
    assert page.counts("cut-tags") == {"keep": 0, "general": 6, "quality": 1, "year": 1, "meta": 0,
                                       "rating_tags": 1}


def test_bad_folder_is_one_error_line(tmp_path):
    proc = run_report(tmp_path / "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: shard folder {tmp_path / 'nope'} does not exist"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.parquet").write_bytes(b"not parquet")
    proc = run_report(tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read") and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_screenshot_script(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<html><body style='background:#c00'><h1>hi</h1></body></html>")
    out = tmp_path / "shot.png"
    proc = subprocess.run([str(ROOT / "scripts" / "screenshot.sh"), str(page), str(out), "400,300"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (400, 300) and im.convert("RGB").getpixel((390, 290)) == (204, 0, 0)


def test_three_samples_by_hand(tmp_path):
    # 40×128, 64×64, 128×40: widths (and heights) min / median / max 40 / 64 / 128; ratings
    # general, general, explicit: shares 2/3 = 66.7 % and 1/3 = 33.3 %. write_shard_folder's
    # manifest has a format and a fingerprint but no database fingerprint (shown "—").
    sizes = [(40, 128), (64, 64), (128, 40)]
    samples = []
    for i, ((w, h), rating) in enumerate(zip(sizes, ["general", "general", "explicit"]), start=1):
        rec = {**_record(i, ["cat"]), "width": w, "height": h, "rating": rating}
        samples.append((rec, b"x"))
    folder = write_shard_folder(tmp_path / "out", samples)
    from hakubooru.cli import main  # in this process: quicker than run_report
    assert main(["report", str(folder), "--html", str(tmp_path / "r.html"), "--json",
                 str(tmp_path / "r.json"), "--quiet"]) == 0
    page = Tables((tmp_path / "r.html").read_text())
    assert page.tables["rating"] == [["general", "2", "66.7 %"], ["explicit", "1", "33.3 %"]]
    sizes_table = dict(page.tables["image-sizes"])
    assert sizes_table["width (min / median / max)"] == "40 / 64 / 128"
    assert sizes_table["height (min / median / max)"] == "40 / 64 / 128"
    provenance = dict(page.tables["provenance"])
    assert provenance["format"] == "hakubooru-shards/1"
    assert provenance["db_fingerprint"] == "—" and provenance["shard_size"] == "—"
    text = (tmp_path / "r.json").read_text()  # sorted keys, one-space indent, a final newline
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    images = json.loads(text)["images"]
    assert images["width"] == images["height"] == {"0": 40.0, "50": 64.0, "100": 128.0}
    assert (images["landscape"], images["portrait"], images["square"]) == (1, 1, 1)


def test_record_without_a_rating_is_one_error_line(tmp_path, capsys):
    # the report reads "rating" from each .json record; one without it is named, not a traceback
    from hakubooru.cli import main

    rec = _record(2, ["cat"])
    del rec["rating"]
    folder = write_shard_folder(tmp_path / "out", [(_record(1, ["cat"]), b"x"), (rec, b"y")])
    assert main(["report", str(folder), "--html", str(tmp_path / "r.html"), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: post 2 in {folder / 'shard-000000.tar'}: its .json record lacks the caption groups "
        "(keep, general, quality, year, meta, rating_tags)"]


def _png_size(tag: str) -> tuple[int, int]:
    """(width, height) in pixels of the PNG embedded in an <img> tag."""
    import base64
    import io

    from PIL import Image
    uri = tag.split("src='", 1)[1].split("'", 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return im.size


def test_chart_sizes_and_table_cells_by_hand():
    # charts are saved at 100 dpi with their figure size in inches: the default figure 6 × 3.2 in
    # (600 × 320 px), a vertical bar chart 5.6 × 2.8, a horizontal one 5.6 × max(2.4, 0.2 per
    # label + 0.8) (3 labels: 2.4, 10 labels: 2.8), a histogram 5.4 × 3.0
    from hakubooru import htmlpage as h

    fig, _ = h.figure()
    assert _png_size(h.img(h.png_data_uri(fig), "empty")) == (600, 320)
    assert _png_size(h.bar_chart(["a", "b", "c"], [1, 2, 3], "t")) == (560, 280)
    assert _png_size(h.bar_chart(["a", "b", "c"], [1, 2, 3], "t", horizontal=True)) == (560, 240)
    assert _png_size(h.bar_chart(list("abcdefghij"), range(10), "t", horizontal=True)) == (560, 280)
    assert _png_size(h.histogram([1, 2, 2, 3], [1, 2, 3, 4], "t", "x")) == (540, 300)
    # numbers (None too, as "—") are right-aligned; True is text, not the number 1
    assert h.table(["v"], [[3], [None], [True], [0.125]]) == (
        "<table><thead><tr><th>v</th></tr></thead><tbody><tr><td class='n'>3</td></tr>"
        "<tr><td class='n'>—</td></tr><tr><td>True</td></tr><tr><td class='n'>0.125</td></tr>"
        "</tbody></table>")


def test_page_goes_into_the_shard_folder_by_default(tmp_path, capsys):
    # docs/report.md: --html defaults to SHARDS/report.html; the end line names it
    from hakubooru.cli import main

    folder = write_shard_folder(tmp_path / "out", [(_record(1, ["cat"]), b"x")])
    assert main(["report", str(folder), "--quiet"]) == 0
    assert (folder / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert capsys.readouterr().err.startswith(f"wrote {folder / 'report.html'}: 1 samples in 1 shards")


def test_trainer_options_point_to_the_trainer_in_one_line(tmp_path):
    shards = make_test_shards(tmp_path / "out", n=4, learnable=False)
    proc = run_report(shards.dir, "--config", "tiny", "--gpus", "2")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: the training buckets are the trainer's section: run python -m trainers.lokr report "
        f"--dataset {shards.dir} --config tiny --gpus 2"]
    assert not (shards.dir / "report.html").exists()


def test_general_tags_from_the_stored_counts_by_hand(tmp_path):
    # With tag_counts.parquet the general tags are the stored counts less the other groups'.
    # Shard 0 (posts 1-2) holds only stored (lower-case) tags; shard 1 (post 3) holds "Cat",
    # which the stored counts know only as "cat": that shard's general tags are counted as
    # written. Stored: cat 3 (2 general + "Cat"), dog 1, 1girl 3, masterpiece 3, newest 3,
    # safe 3. General on the page: cat 2, dog 1, Cat 1 — nothing else (1girl is kept, the
    # quality, year and rating tags are in their own groups). The third count of "1girl" is
    # shard 1's keep tag, so it is not a general tag either.
    from hakubooru.cli import main
    from hakubooru.tagcounts import write_tag_counts

    samples = [(_record(1, ["cat", "dog"]), b"x"), (_record(2, ["cat"]), b"y"), (_record(3, ["Cat"]), b"z")]
    folder = write_shard_folder(tmp_path / "out", samples, per_shard=2)
    fingerprint = json.loads((folder / "manifest.json").read_text())["fingerprint"]
    write_tag_counts(folder, {"cat": 3, "dog": 1, "1girl": 3, "masterpiece": 3, "newest": 3, "safe": 3},
                     fingerprint)
    assert main(["report", str(folder), "--json", str(tmp_path / "r.json"), "--html",
                 str(tmp_path / "r.html"), "--quiet"]) == 0
    general = json.loads((tmp_path / "r.json").read_text())["tags"]["general"]
    assert general["top"] == [["cat", 2], ["Cat", 1], ["dog", 1]]
    assert (general["distinct"], general["occurrences"]) == (3, 4)
    # the general counts are the stored ones: a stored "dog" 5 shows as 5 …
    stored = {"cat": 3, "dog": 5, "1girl": 3, "masterpiece": 3, "newest": 3, "safe": 3}
    for fp, dogs in ((fingerprint, 5), ("another build", 1)):  # … unless they are another build's
        write_tag_counts(folder, stored, fp)
        assert main(["report", str(folder), "--json", str(tmp_path / "r.json"), "--html",
                     str(tmp_path / "r.html"), "--quiet"]) == 0
        top = json.loads((tmp_path / "r.json").read_text())["tags"]["general"]["top"]
        assert top == sorted([["cat", 2], ["Cat", 1], ["dog", dogs]], key=lambda kv: (-kv[1], kv[0]))


def _rewrite_record(folder: Path, post_id: int, data: bytes) -> None:
    """Put ``data``, as long as the record it replaces, in place of a post's ``.json`` member."""
    import pyarrow.parquet as pq

    row = next(r for r in pq.read_table(folder / "index.parquet").to_pylist() if r["id"] == post_id)
    assert len(data) == row["json_size"]
    with open(folder / row["shard"], "r+b") as f:
        f.seek(row["json_offset"])
        f.write(data)


@pytest.mark.parametrize("across_lines", [False, True])
@pytest.mark.parametrize("stored_counts", [False, True])
def test_records_as_other_writers_write_them_by_hand(tmp_path, capsys, across_lines, stored_counts):
    # Post 1: a tag holding a line break ("a\nb", escaped in the JSON), "café", a null rating
    # (counted "unknown"). Post 2: "ü" written as raw UTF-8 (ensure_ascii=False, padded with
    # spaces to the record's length). Post 3, with across_lines: its record spread over lines,
    # ", " -> ",\n" (the report then reads those records one by one). By hand: ratings general 2,
    # unknown 1; general cat 2, dog 1, café 1, "a\nb" 1; meta ü 1; the caption lengths those of
    # the whole captions tokenized — with the stored counts too (general = stored less the rest).
    from hakubooru.cli import main
    from hakubooru.clip_tokenizer import sdxl_tokenizer
    from hakubooru.tagcounts import add_tags, record_tags, write_tag_counts

    recs = [{**_record(1, ["café", "a\nb"]), "rating": None}, {**_record(2, ["cat"]), "meta": ["ü"]},
            _record(3, ["cat", "dog"])]
    folder = write_shard_folder(tmp_path / "out", [(r, b"x") for r in recs])
    plain = json.dumps(recs[1], ensure_ascii=False).encode()
    _rewrite_record(folder, 2, plain + b" " * (len(json.dumps(recs[1])) - len(plain)))
    if across_lines:
        _rewrite_record(folder, 3, json.dumps(recs[2]).replace(", ", ",\n").encode())
    if stored_counts:
        counts = {}
        for r in recs:
            add_tags(counts, record_tags(r))
        write_tag_counts(folder, counts, json.loads((folder / "manifest.json").read_text())["fingerprint"])
    assert main(["report", str(folder), "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"),
                 "--quiet"]) == 0, capsys.readouterr().err
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["rating"] == [["general", 2], ["unknown", 1]]
    assert out["tags"]["general"]["top"] == [["cat", 2], ["a\nb", 1], ["café", 1], ["dog", 1]]
    assert out["tags"]["meta"]["top"] == [["ü", 1]]
    assert out["tags"]["people"]["top"] == [["1girl", 3]]
    captions = [", ".join(t for g in GROUPS for t in r[g]) for r in recs]
    lengths = [len(ids) for ids in sdxl_tokenizer(1)(captions, add_special_tokens=False).input_ids]
    assert out["tokens"]["histogram"] == np.bincount(lengths).tolist()


def test_bad_records_and_a_missing_shard_are_one_error_line_each(tmp_path, capsys):
    # shards are read in order, so post 2's bad record (shard 0) is named before the missing
    # shard 1; bytes that are not UTF-8 are not valid JSON either
    from hakubooru.cli import main

    folder = write_shard_folder(tmp_path / "out", [(_record(i, ["cat"]), b"x") for i in range(1, 5)], per_shard=2)
    shard0, shard1 = folder / "shard-000000.tar", folder / "shard-000001.tar"
    good = json.dumps(_record(2, ["cat"])).encode()
    shard1.unlink()
    for bad in (b"x" + good[1:], good.replace(b'"cat"', b'"ca\xff"')):
        _rewrite_record(folder, 2, bad)
        assert main(["report", str(folder), "--html", str(tmp_path / "r.html"), "--quiet"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: post 2 in {shard0}: its .json record is not valid JSON; rebuild the shard"]
    _rewrite_record(folder, 2, good)
    assert main(["report", str(folder), "--html", str(tmp_path / "r.html"), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {shard1} is named in index.parquet but missing"]
