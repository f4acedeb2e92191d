"""Image validation, re-encoding and downscaling for the shard builder.

Every image is checked before it goes into a shard, pass-through or not. A bad
image raises :class:`BadImage` with a short reason (``empty``, ``not_image``,
``truncated``, ``corrupt``, ``too_large``, ``wrong_format``) that the builder
counts; it never stops a build.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import HakubooruError
from .selector import STILL_IMAGE_EXTS

# Output format name -> (PIL format, file extension).
FORMATS = {"webp": ("WEBP", "webp"), "jpeg": ("JPEG", "jpg"), "png": ("PNG", "png")}
# Extensions read as still images, and the one each is stored under.
IMAGE_EXTS = {ext: "jpg" if ext == "jpeg" else ext for ext in STILL_IMAGE_EXTS}
PIL_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "AVIF": "avif",
                  "BMP": "bmp"}
# Output format that keeps a stored extension, for downscaling without --format.
OWN_FORMAT = {"jpg": "jpeg", "png": "png", "webp": "webp"}
# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_SOURCE_PIXELS = 178_956_970
VALIDATION_LEVELS = ("standard", "full")
# A PNG's last chunk, CRC included: Pillow's ``verify`` stops at IEND without reading its CRC.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# EXIF orientations that display the stored pixels transposed (width and height swapped).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# VP8X flag: the WebP carries an EXIF chunk.
_VP8X_EXIF = 0x08


class BadImage(Exception):
    """An image that cannot go into the dataset; ``reason`` names why, e.g. ``truncated``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImagePolicy:
    """What happens to each image: pass through untouched, or re-encode / downscale.

    ``image_format`` None keeps the source bytes (an image above ``max_pixels`` is then
    re-encoded in its own format); ``validate`` is ``standard`` (header, container and
    truncation checks) or ``full`` (decode every pixel).
    """

    image_format: str | None = None
    quality: int = 90
    max_pixels: int | None = None
    validate: str = "standard"
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS

    def __post_init__(self):
        if self.image_format is not None and self.image_format not in FORMATS:
            raise HakubooruError(
                f"unknown image format {self.image_format!r}; choose one of {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise HakubooruError(f"quality must be between 1 and 100, not {self.quality}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise HakubooruError(f"max pixels must be positive, not {self.max_pixels}")
        if self.validate not in VALIDATION_LEVELS:
            raise HakubooruError(
                f"unknown validation {self.validate!r}; choose one of {', '.join(VALIDATION_LEVELS)}")

    def to_dict(self) -> dict:
        """JSON-able description, recorded in the manifest."""
        return asdict(self)


@dataclass
class StoredImage:
    """The bytes that go into the shard, their extension and pixel size."""

    data: bytes
    ext: str
    width: int
    height: int


def _webp_truncated(data: bytes) -> bool:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return struct.unpack("<I", data[4:8])[0] + 8 > len(data)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not_image") from None
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        reason = "truncated" if "truncated" in str(e).lower() or _webp_truncated(data) else "corrupt"
        raise BadImage(reason, str(e)) from None


def _check_pixels(width: int, height: int, policy: ImagePolicy) -> None:
    if width < 1 or height < 1:
        raise BadImage("corrupt", f"size {width}x{height}")
    if width * height > policy.max_source_pixels:
        raise BadImage("too_large", f"{width}x{height} pixels")


def _webp_frame_size(fourcc: bytes, head: bytes) -> tuple[int, int]:
    if fourcc == b"VP8 " and len(head) >= 10 and head[3:6] == b"\x9d\x01\x2a":
        return (struct.unpack_from("<H", head, 6)[0] & 0x3FFF,
                struct.unpack_from("<H", head, 8)[0] & 0x3FFF)
    if fourcc == b"VP8L" and len(head) >= 5 and head[0] == 0x2F:
        bits = struct.unpack_from("<I", head, 1)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8X" and len(head) >= 10:
        return 1 + int.from_bytes(head[4:7], "little"), 1 + int.from_bytes(head[7:10], "little")
    raise BadImage("corrupt", f"WebP starts with a bad {fourcc!r} chunk")


def webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a WebP, after walking its RIFF chunks: every chunk must lie inside
    the declared RIFF size, and that size inside the data (else ``truncated``).

    This is the standard pass-through check for WebP: microseconds, where opening with
    Pillow (which builds a libwebp decoder) costs 1-2 ms per 1-Mpixel image."""
    riff_end = struct.unpack_from("<I", data, 4)[0] + 8
    if riff_end > len(data):
        raise BadImage("truncated", f"RIFF declares {riff_end} bytes, {len(data)} present")
    pos, size, has_image = 12, None, False
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise BadImage("corrupt", "chunk header crosses the RIFF end")
        fourcc, length = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if body + length > riff_end:
            raise BadImage("truncated", f"chunk {fourcc!r} crosses the RIFF end")
        if size is None:
            size = _webp_frame_size(fourcc, data[body:body + min(length, 10)])
        has_image |= fourcc in (b"VP8 ", b"VP8L", b"ANMF")
        pos = body + length + (length & 1)
    if not has_image:
        raise BadImage("corrupt", "WebP without image data")
    return size


def _decode(im: Image.Image, data: bytes, reduced: bool) -> None:
    """Decode the pixels (JPEG at 1/8 scale when ``reduced``: same entropy stream, less work)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if reduced and im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() or _webp_truncated(data) else "corrupt"
        raise BadImage(reason, str(e)) from None


def _check_png_end(data: bytes) -> None:
    """A PNG must hold its whole IEND chunk (bytes after it are tolerated): the pixels of a
    PNG cut inside IEND decode fine, but the file is still cut short."""
    if PNG_END not in data:
        raise BadImage("truncated", "PNG without a complete IEND chunk")


def _validate(im: Image.Image, data: bytes, policy: ImagePolicy) -> None:
    """Cheap by default: PNG by ``verify`` (every chunk's CRC, through IEND), JPEG by
    decoding its entropy-coded data at 1/8 scale; ``full`` decodes every pixel.
    (WebP's standard check is ``webp_size``.)"""
    if policy.validate == "full":
        _decode(im, data, reduced=False)
    elif im.format == "PNG":
        try:
            Image.open(io.BytesIO(data)).verify()
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
            reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
            raise BadImage(reason, str(e)) from None
    else:
        _decode(im, data, reduced=True)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grey (``I;16*``, ``I``: 16-bit PNGs) as its top 8 bits, float
    grey (``F``) read as 0..1; ``convert("RGB")`` would clip them, turning most pixels white."""
    if im.mode == "F":
        values = np.rint(np.clip(np.asarray(im, np.float64), 0.0, 1.0) * 255)
    else:
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode L


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an image as shown, i.e. after its EXIF orientation: the stored size
    with the sides swapped for orientations 5-8 (as ``ImageOps.exif_transpose`` rotates)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error):  # unreadable EXIF: shown as stored
        orientation = 1
    w, h = im.size
    return (h, w) if orientation in TRANSPOSING_ORIENTATIONS else (w, h)


def to_rgb(im: Image.Image) -> Image.Image:
    """EXIF orientation applied; CMYK, palette, grey (8, 16-bit or float) and alpha images as
    RGB (alpha on white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info)  # tRNS key colour
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels`` pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floating-point rounding at the boundary
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _encode(im: Image.Image, image_format: str, quality: int) -> bytes:
    pil_format = FORMATS[image_format][0]
    out = io.BytesIO()
    if pil_format == "PNG":
        im.save(out, pil_format)
    else:
        im.save(out, pil_format, quality=quality)
    return out.getvalue()


def prepare(data: bytes, source_ext: str, policy: ImagePolicy) -> StoredImage:
    """Validate one source image and return what to store (raises BadImage).

    Pass-through keeps ``data`` byte for byte; its width/height are those displayed (EXIF
    orientation applied, as every reader's ``to_rgb`` does), so buckets and crops agree with
    the pixels trained. Re-encoding writes RGB in the policy's format, downscaled
    to ``max_pixels`` keeping the aspect ratio.
    """
    if source_ext not in IMAGE_EXTS:
        raise BadImage("not_image", f"extension .{source_ext}")
    ext = IMAGE_EXTS[source_ext]
    if ext == "webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP" \
            and policy.validate == "standard":
        im = None
        width, height = webp_size(data)
        if data[12:16] == b"VP8X" and data[20] & _VP8X_EXIF:  # EXIF may rotate it: ask Pillow
            width, height = displayed_size(_open(data))
    else:
        im = _open(data)
        if PIL_FORMAT_EXT.get(im.format) != ext:
            raise BadImage("wrong_format", f".{source_ext} file holds {im.format}")
        if ext == "png":
            _check_png_end(data)
        # Pillow finds a PNG's EXIF only by decoding it: look only when the bytes hold some.
        no_exif = ext == "png" and b"eXIf" not in data and b"exif" not in data
        width, height = im.size if no_exif else displayed_size(im)
    _check_pixels(width, height, policy)
    reencode = policy.image_format is not None or (
        policy.max_pixels is not None and width * height > policy.max_pixels)
    if not reencode:
        if im is not None:
            _validate(im, data, policy)
        return StoredImage(data, ext, width, height)
    im = im or _open(data)
    _decode(im, data, reduced=False)
    rgb = to_rgb(im)
    if policy.max_pixels is not None:
        size = fit_pixels(*rgb.size, policy.max_pixels)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    image_format = policy.image_format or OWN_FORMAT.get(ext)
    if image_format is None:
        raise HakubooruError(f"cannot downscale .{ext} images in their own format; "
                             "choose one with --format webp|jpeg|png")
    return StoredImage(_encode(rgb, image_format, policy.quality),
                       FORMATS[image_format][1], rgb.width, rgb.height)
