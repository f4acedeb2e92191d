"""Image validation and re-encoding (hakubooru.images), on images made here with PIL."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hakubooru.errors import HakubooruError
from hakubooru.images import BadImage, ImagePolicy, fit_pixels, prepare, to_rgb, webp_size

PASS = ImagePolicy()


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def noisy(width=96, height=64, seed=0) -> Image.Image:
    """An RGB image with texture, so lossy encoders keep real entropy-coded data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height (8-bit RGB) with an empty IDAT: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"")
            + png_chunk(b"IEND", b""))


def reason(data: bytes, ext: str, policy=PASS) -> str:
    with pytest.raises(BadImage) as e:
        prepare(data, ext, policy)
    return e.value.reason


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("PNG", "png"), ("JPEG", "jpg")])
def test_pass_through_keeps_bytes_and_reads_size(fmt, ext):
    data = encode(noisy(96, 64), fmt)
    stored = prepare(data, ext, PASS)
    assert stored.data == data  # untouched
    assert (stored.ext, stored.width, stored.height) == (ext, 96, 64)


def test_jpeg_extension_is_stored_as_jpg():
    stored = prepare(encode(noisy(), "JPEG"), "jpeg", PASS)
    assert stored.ext == "jpg"


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_images_are_caught_in_pass_through(fmt, ext, keep):
    data = encode(noisy(96, 64), fmt)
    assert reason(data[: int(len(data) * keep)], ext) == "truncated"


def test_bad_bytes_get_their_reason():
    assert reason(b"", "webp") == "empty"
    assert reason(np.random.default_rng(1).bytes(5000), "webp") == "not_image"
    assert reason(b"hello, this is a readme", "png") == "not_image"
    assert reason(encode(noisy(), "PNG"), "mp4") == "not_image"  # not a still-image extension
    assert reason(encode(noisy(), "PNG"), "webp") == "wrong_format"  # PNG bytes named .webp


def test_decompression_bomb_header_is_refused_before_decoding():
    # 100000 x 100000 = 1e10 pixels > Pillow's 178,956,970 error threshold
    assert reason(png_header_only(100_000, 100_000), "png") == "too_large"
    # a tighter cap is honoured: 96 x 64 = 6144 > 6000
    assert reason(encode(noisy(96, 64), "PNG"), "png", ImagePolicy(max_source_pixels=6000)) \
        == "too_large"


def test_full_validation_decodes_webp():
    data = bytearray(encode(noisy(96, 64), "WEBP", lossless=True))
    data[40:240] = bytes(200)  # zero part of the VP8L bitstream; the container stays valid
    assert reason(bytes(data), "webp", ImagePolicy(validate="full")) == "corrupt"


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (2, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    im.putpixel((1, 0), (0, 0, 0, 255))  # opaque black stays black
    stored = prepare(encode(im, "PNG"), "png", ImagePolicy(image_format="png"))
    out = Image.open(io.BytesIO(stored.data))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_rgb_on_white():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 255, 10, 20, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    data = encode(im, "PNG", transparency=0)  # palette entry 0 (blue) is transparent
    stored = prepare(data, "png", ImagePolicy(image_format="png"))
    out = Image.open(io.BytesIO(stored.data))
    assert out.mode == "RGB"
    assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 255, 255), (10, 20, 30)]


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    stored = prepare(encode(im, "JPEG", quality=95), "jpg", ImagePolicy(image_format="png"))
    out = Image.open(io.BytesIO(stored.data))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied_when_reencoding():
    im = noisy(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    data = encode(im, "JPEG", exif=exif)
    stored = prepare(data, "jpg", ImagePolicy(image_format="webp"))
    # stored 40x20 pixels, displayed (and re-encoded) as 20x40
    assert (stored.width, stored.height, stored.ext) == (20, 40, "webp")
    assert Image.open(io.BytesIO(stored.data)).size == (20, 40)


def test_downscale_keeps_aspect_ratio_under_the_cap():
    # 400x100 = 40000 px, cap 10000: scale sqrt(10000/40000) = 0.5 -> 200x50
    stored = prepare(encode(noisy(400, 100), "PNG"), "png", ImagePolicy(max_pixels=10_000))
    assert (stored.width, stored.height, stored.ext) == (200, 50, "png")
    assert Image.open(io.BytesIO(stored.data)).size == (200, 50)
    # below the cap nothing changes, bytes included
    data = encode(noisy(50, 50), "PNG")
    assert prepare(data, "png", ImagePolicy(max_pixels=10_000)).data == data


def test_fit_pixels():
    assert fit_pixels(400, 100, 10_000) == (200, 50)
    assert fit_pixels(3, 3, 4) == (2, 2)  # scale 2/3 -> floor(2.0) = 2
    assert fit_pixels(1000, 1, 10) == (10, 1)  # never below one pixel
    assert fit_pixels(30, 20, 600) == (30, 20)


def test_reencoding_is_deterministic_and_uses_quality():
    data = encode(noisy(128, 96), "PNG")
    hi = prepare(data, "png", ImagePolicy(image_format="jpeg", quality=95))
    lo = prepare(data, "png", ImagePolicy(image_format="jpeg", quality=30))
    assert hi.data == prepare(data, "png", ImagePolicy(image_format="jpeg", quality=95)).data
    assert hi.ext == "jpg" and len(lo.data) < len(hi.data)


def test_policy_options_are_checked():
    for bad in (dict(image_format="gif"), dict(quality=0), dict(max_pixels=0),
                dict(validate="some")):
        with pytest.raises(HakubooruError):
            ImagePolicy(**bad)


@pytest.mark.parametrize("kind", ["lossy", "lossless", "extended"])
def test_webp_container_walk_reads_the_size(kind):
    im = noisy(97, 45)
    if kind == "extended":  # alpha makes Pillow write a VP8X chunk first
        im = im.convert("RGBA")
        im.putpixel((0, 0), (1, 2, 3, 4))
    data = encode(im, "WEBP", lossless=kind == "lossless")
    chunk = {"lossy": b"VP8 ", "lossless": b"VP8L", "extended": b"VP8X"}[kind]
    assert data[12:16] == chunk
    assert webp_size(data) == (97, 45)


def test_webp_container_walk_catches_a_short_chunk():
    data = bytearray(encode(noisy(64, 64), "WEBP"))
    # claim 1000 more bytes in the image chunk than there are, RIFF size left consistent
    struct.pack_into("<I", data, 16, struct.unpack_from("<I", data, 16)[0] + 1000)
    assert reason(bytes(data), "webp") == "truncated"
    data = bytearray(encode(noisy(64, 64), "WEBP"))
    data[12:16] = b"JUNK"  # first chunk is not an image header
    assert reason(bytes(data), "webp") == "corrupt"


def test_avif_passes_through_but_cannot_be_downscaled_in_its_own_format():
    data = encode(noisy(32, 24), "AVIF")
    stored = prepare(data, "avif", PASS)
    assert (stored.data, stored.ext, stored.width, stored.height) == (data, "avif", 32, 24)
    # 32x24 = 768 px > 500: needs re-encoding, and AVIF is not an output format
    with pytest.raises(HakubooruError, match="--format"):
        prepare(data, "avif", ImagePolicy(max_pixels=500))
    assert prepare(data, "avif", ImagePolicy(image_format="png", max_pixels=500)).ext == "png"


def grey_ramp_16bit() -> np.ndarray:
    """64x64 uint16: pixel (y, x) = (64y + x) * 16, i.e. 0, 16, ..., 65520, each value once."""
    return ((np.arange(64)[:, None] * 64 + np.arange(64)[None, :]) * 16).astype(np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped_to_white():
    data = encode(Image.fromarray(grey_ramp_16bit()), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # a real 16-bit grey PNG
    out = Image.open(io.BytesIO(prepare(data, "png", ImagePolicy(image_format="png")).data))
    # top 8 bits: (64y + x) * 16 >> 8 = (64y + x) // 16, so each of 0..255 appears 16 times
    # -> mean 127.5 (clipping to 255 would give ~255: every value above 255 turns white)
    assert out.mode == "RGB"
    assert np.asarray(out).mean() == 127.5
    assert np.asarray(out)[0, :16, 0].tolist() == [0] * 16  # 0..240 >> 8 = 0


def test_32bit_and_float_grey_become_8bit():
    # mode I: read as 16-bit samples, like the ramp above
    assert np.asarray(to_rgb(Image.fromarray(grey_ramp_16bit().astype(np.int32)))).mean() == 127.5
    # mode F: 0..1 -> 0..255; 0.5 * 255 = 127.5 rounds (half to even) to 128
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
@pytest.mark.parametrize("policy", [PASS, ImagePolicy(validate="full"),
                                    ImagePolicy(image_format="webp")])
def test_png_cut_inside_its_iend_crc_is_truncated(cut, policy):
    data = encode(noisy(32, 32), "PNG")
    assert data.endswith(b"IEND\xaeB`\x82")  # the last 4 bytes are IEND's CRC
    assert reason(data[:-cut], "png", policy) == "truncated"


def test_png_with_bytes_after_iend_passes():
    data = encode(noisy(32, 32), "PNG") + b"appended"
    assert prepare(data, "png", PASS).data == data


def test_bmp_passes_through():
    data = encode(noisy(20, 10), "BMP")
    stored = prepare(data, "bmp", PASS)
    assert (stored.data, stored.ext, stored.width, stored.height) == (data, "bmp", 20, 10)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_webp_under_full_validation_is_truncated(keep):
    """With validate=full a cut-short WebP is opened by Pillow, whose error does not say
    'truncated'; its RIFF header declaring more bytes than present still makes it truncated."""
    data = encode(noisy(96, 64), "WEBP")
    assert struct.unpack_from("<I", data, 4)[0] + 8 == len(data)  # RIFF size: the whole file
    assert reason(data[: int(len(data) * keep)], "webp", ImagePolicy(validate="full")) == "truncated"


def png_with_broken_pixel_data() -> bytes:
    """A 32x32 PNG whose IDAT holds a broken zlib stream under a correct CRC."""
    data = encode(noisy(32, 32), "PNG")
    length = struct.unpack_from(">I", data, 33)[0]  # 8 signature + 25 IHDR chunk: IDAT next
    assert data[37:41] == b"IDAT"
    broken = data[41:43] + b"\xff" * (length - 2)  # zlib header kept, deflate data garbage
    return data[:33] + png_chunk(b"IDAT", broken) + data[33 + 12 + length:]


def test_full_validation_decodes_png_pixels_that_chunk_crcs_miss():
    """Standard validation of a PNG checks chunk CRCs (verify), which a broken zlib stream under
    a correct CRC passes; validate=full decodes every pixel and calls it corrupt."""
    data = png_with_broken_pixel_data()
    assert prepare(data, "png", PASS).data == data  # the documented cheap check passes it
    assert reason(data, "png", ImagePolicy(validate="full")) == "corrupt"
