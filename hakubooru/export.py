"""Export a shard folder as the folders kohya-ss/sd-scripts reads without code.

sd-scripts' DreamBooth-style datasets (``--train_data_dir DIR``) take every sub-folder named
``<repeats>_<name>`` (``library/config_util.py``: the part before the first ``_`` is the repeat
count, the rest the class tokens, used as the caption of an image without a caption file),
with images ``<stem>.{png,jpg,jpeg,webp,bmp}`` and captions ``<stem>.txt``
(``--caption_extension .txt``; the first line is read; an empty caption file is an error there,
so an empty caption gets no file). The optional metadata JSON is the file sd-scripts'
``finetune/merge_captions_to_metadata.py --full_path`` writes, ``{image path: {"caption": …}}``
(plus ``image_size`` [w, h], which sd-scripts' fine-tuning dataset reads), for ``--in_json``.

Streaming: each image and caption is read from its shard at the offsets in ``index.parquet``
(shard by shard, in offset order), never by extracting a tar. Resumable: every file is written
under a temporary name and renamed, and a rerun keeps the files already right (image of the
indexed size, caption of the same bytes), so a rerun after a kill ends with the same files.
Members inside a tar cannot be hard-linked (a hard link names a whole file), so images are
copied; ``link="hard"`` is refused with that reason.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from .captioner import caption_text
from .errors import HakubooruError
from .manifest import MANIFEST_FILE, read_json
from .shardfolder import read_index, shard_folder

KOHYA_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")  # sd-scripts' IMAGE_EXTENSIONS
LINK_MODES = ("copy", "hard")
STYLE_KEYS = ("groups", "separator", "group_separator", "escape_parentheses")
_TMP_SUFFIX = ".export-tmp"
_NUMERIC = ("id", "image_offset", "image_size", "txt_offset", "txt_size", "json_offset",
            "json_size", "width", "height")


@dataclass
class ExportResult:
    """What export_kohya did."""

    folder: Path
    images: int = 0
    copied: int = 0      # image files written by this run
    kept: int = 0        # image files already right (a resumed export)
    captions: int = 0    # caption files present after the run
    no_caption: int = 0  # samples with an empty caption (no .txt: sd-scripts refuses empty files)
    metadata: Path | None = None

    def summary(self) -> str:
        """One line of counts."""
        meta = f"; metadata {self.metadata}" if self.metadata else ""
        return (f"{self.folder}: {self.images} images ({self.copied} copied, {self.kept} already "
                f"there), {self.captions} captions, {self.no_caption} without caption{meta}")


def export_kohya(shards, dest, *, repeats: int = 1, name: str = "hakubooru", link: str = "copy",
                 metadata_json=None, keep_separator: str | None = None,
                 progress: bool = True) -> ExportResult:
    """Write the samples of the shard folder ``shards`` as ``dest/<repeats>_<name>/<stem>.<ext>``
    + ``<stem>.txt`` (stem: the sample's key, else its id), and with ``metadata_json`` the
    fine-tuning metadata JSON. ``keep_separator`` (e.g. ``"|||"``) rebuilds each caption from
    its ``.json`` record in the build's style as ``keep SEP general SEP quality, year, meta,
    rating``, for sd-scripts' ``--keep_tokens_separator`` (only the general tags move); otherwise the shards' ``.txt`` are written as they
    are. Prints the summary line; returns the counts."""
    root = shard_folder(shards)
    plan = plan_export(root, repeats=repeats, name=name, link=link, keep_separator=keep_separator)
    folder = Path(dest) / f"{int(repeats)}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".*{_TMP_SUFFIX}"):  # left by a killed run
        stale.unlink()
    result = ExportResult(folder, images=len(plan.order))
    result.metadata = None if metadata_json is None else Path(metadata_json)
    col, current, tar = plan.columns, None, None
    with _MetadataFile(result.metadata) as meta, \
            tqdm(total=len(plan.order), desc="exporting", unit="img", disable=not progress) as bar:
        try:
            for i in plan.order.tolist():
                row = {c: int(col[c][i]) for c in _NUMERIC}
                if plan.shard[i] != current:
                    if tar is not None:
                        tar.close()
                    current = plan.shard[i]
                    tar = open(root / plan.shard_names[current], "rb")
                image = folder / f"{plan.stem(i)}.{plan.ext_names[plan.ext[i]]}"
                caption = _caption(tar, row, plan.style, keep_separator, root / plan.shard_names[current])
                _export_sample(tar, row, image, caption, result)
                meta.add(os.path.abspath(image),
                         {"caption": caption, "image_size": [row["width"], row["height"]]})
                bar.update(1)
        finally:
            if tar is not None:
                tar.close()
    print(result.summary(), file=sys.stderr)
    return result


@dataclass
class ExportPlan:
    """What an export reads, decided before it writes anything: the index columns as NumPy
    (strings as codes), the rows in file order (shard by shard in name order, members by
    offset: one pass over each tar), the caption style, and each row's file stem."""

    columns: dict
    shard: np.ndarray       # code into shard_names (sorted names)
    shard_names: list
    ext: np.ndarray         # code into ext_names
    ext_names: list
    order: np.ndarray
    style: dict
    keys: object            # pyarrow array of stems ('/' → '_'), or None: the stem is the id

    def stem(self, i: int) -> str:
        """Row ``i``'s file stem."""
        return str(self.columns["id"][i]) if self.keys is None else self.keys[i].as_py()


def plan_export(root: Path, *, repeats: int = 1, name: str = "hakubooru", link: str = "copy",
                keep_separator: str | None = None) -> ExportPlan:
    """Read the index of shard folder ``root`` and check the options against it (one error line
    for what the export cannot serve); no Python object per sample."""
    table = read_index(root, [*_NUMERIC, "shard", "ext"], optional=["key"])
    style = _style(root)
    _check(root, table, style, repeats, name, link, keep_separator)
    shard, shard_names = _codes(table.column("shard"), sort=True)
    ext, ext_names = _codes(table.column("ext"))
    columns = {c: table.column(c).to_numpy() for c in _NUMERIC}
    return ExportPlan(columns, shard, shard_names, ext, ext_names,
                      np.lexsort((columns["image_offset"], shard)), style, _stems(table))


def _codes(column, sort: bool = False) -> tuple[np.ndarray, list]:
    """A string column as int32 codes and the values they index (with ``sort``, in sorted order,
    so that codes compare as the strings do)."""
    encoded = column.combine_chunks().dictionary_encode()
    codes, values = encoded.indices.to_numpy().astype(np.int32), encoded.dictionary.to_pylist()
    if not sort:
        return codes, values
    rank = np.argsort(np.argsort(np.array(values, dtype=object))).astype(np.int32)
    return rank[codes], sorted(values)


def _check(root: Path, table, style: dict, repeats, name, link, keep_separator) -> None:
    """Refuse, before writing anything, options and indexes the export cannot serve."""
    if int(repeats) < 1:
        raise HakubooruError(f"--repeats must be at least 1, got {repeats}")
    if not name or "/" in name or name != name.strip():
        raise HakubooruError(f"--name must be a non-empty folder name, got {name!r}")
    if link not in LINK_MODES:
        raise HakubooruError(f"--link must be one of {', '.join(LINK_MODES)}, not {link!r}")
    if link == "hard":
        raise HakubooruError(f"{root}: the images are members inside tar shards, which cannot be "
                             "hard-linked (a hard link names a whole file); use --link copy")
    if table.num_rows == 0:
        raise HakubooruError(f"{root}/index.parquet has no samples")
    odd = sorted({e for e in table.column("ext").unique().to_pylist()
                  if e.lower() not in KOHYA_IMAGE_EXTS})
    if odd:
        raise HakubooruError(f"sd-scripts does not read .{odd[0]} images; rebuild the shards with "
                             "--format webp|jpeg|png")
    if keep_separator is None:
        return
    if not keep_separator.strip():
        raise HakubooruError(f"--keep-separator must be visible text, got {keep_separator!r}")
    if pc.min(table.column("json_size")).as_py() < 0:
        raise HakubooruError(f"{root}: --keep-separator rebuilds captions from the .json "
                             "records, and some samples have none")
    if list(style["groups"][:2]) != ["keep", "general"]:
        raise HakubooruError(f"{root} was captioned without the keep and general groups first "
                             f"(groups {style['groups']}); --keep-separator needs them")


def _export_sample(tar, row: dict, image: Path, caption: str, result: ExportResult) -> None:
    """Write one sample's image and caption file unless they are already right."""
    if image.is_file() and image.stat().st_size == row["image_size"]:
        result.kept += 1
    else:
        _write(image, _read(tar, row["image_offset"], row["image_size"]))
        result.copied += 1
    text = image.with_suffix(".txt")
    if caption:
        data = caption.encode()
        if not (text.is_file() and text.read_bytes() == data):
            _write(text, data)
        result.captions += 1
    else:
        text.unlink(missing_ok=True)
        result.no_caption += 1


class _MetadataFile:
    """sd-scripts' metadata JSON, written entry by entry to a temporary name and renamed into
    place when complete (a killed export leaves no half file); does nothing for path None."""

    def __init__(self, path: Path | None):
        self.path, self.file, self.first = path, None, True

    def __enter__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.name}{_TMP_SUFFIX}")
            self.file = open(self.tmp, "w", encoding="utf-8")
            self.file.write("{")
        return self

    def add(self, key: str, entry: dict) -> None:
        if self.file is not None:
            self.file.write(("\n" if self.first else ",\n") + _json_entry(key, entry))
            self.first = False

    def __exit__(self, kind, *_):
        if self.file is None:
            return
        if kind is None:
            self.file.write("\n}\n")
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _json_entry(key: str, entry: dict) -> str:
    """One ``"key": {...}`` member as ``json.dumps(..., indent=2)`` writes it inside the top
    object (what sd-scripts' merge scripts write)."""
    inner = json.dumps(entry, indent=2, ensure_ascii=False).replace("\n", "\n  ")
    return f"  {json.dumps(key, ensure_ascii=False)}: {inner}"


def _style(root: Path) -> dict:
    """The caption style the folder was built with (the manifest's captioner settings)."""
    settings = (read_json(root / MANIFEST_FILE) or {}).get("captioner") or {}
    style = {k: settings[k] for k in STYLE_KEYS if k in settings}
    style.setdefault("groups", ["keep", "general", "quality", "year", "meta", "rating_tags"])
    return style


def _stems(table):
    """File stems: the webdataset keys ('/' → '_') where the index has them, else None (the id
    is the stem: ids are unique); keys must stay unique."""
    if "key" not in table.column_names:
        return None
    stems = pc.replace_substring(table.column("key").combine_chunks(), "/", "_")
    if pc.count_distinct(stems).as_py() != len(stems):
        raise HakubooruError("two samples would get the same file name (keys differing only in "
                             "'/' vs '_'); rename them in the shards")
    return stems


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise HakubooruError(f"{f.name} ends before the member at offset {offset} that "
                             "index.parquet names; the shard is cut short")
    return data


def _caption(tar, row: dict, style: dict, keep_separator, shard: Path) -> str:
    """A sample's caption: its .txt, or rebuilt from its .json record when asked (or when
    there is no .txt)."""
    if keep_separator is None and row["txt_size"] >= 0:
        return _read(tar, row["txt_offset"], row["txt_size"]).decode("utf-8").strip()
    if row["json_size"] < 0:
        return ""
    raw = _read(tar, row["json_offset"], row["json_size"])
    try:
        return caption_text(json.loads(raw), **style, keep_separator=keep_separator)
    except (ValueError, KeyError, TypeError):
        raise HakubooruError(f"{shard}: the .json of sample {row['id']} is not a caption record "
                             "(groups keep, general, …)") from None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
