"""The bytes of image archives and shard folders, for comparisons."""
import tarfile
from pathlib import Path


def archive_members(images_dir) -> dict[int, bytes]:
    """{post id: bytes} of every <id>.<ext> member of the tars under images_dir."""
    out = {}
    for path in sorted(Path(images_dir).rglob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    out[int(m.name.rsplit("/", 1)[-1].split(".")[0])] = tar.extractfile(m).read()
    return out


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a shard folder (bookkeeping included) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
