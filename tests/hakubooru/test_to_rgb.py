"""images.to_rgb on grey images with alpha or a transparency key: composited on white, by hand."""
import io

import numpy as np
from PIL import Image

from hakubooru.images import to_rgb


def pixels(im):
    return [tuple(p) for p in np.asarray(im).reshape(-1, 3).tolist()]


def png(im, **kw) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_grey_alpha_on_white():
    # grey 100 at alpha 255, 0 and 128: 100; white 255; 100*128/255 + 255*127/255 = 177.2
    im = Image.new("LA", (3, 1))
    im.putdata([(100, 255), (100, 0), (100, 128)])
    got = pixels(to_rgb(im))
    assert got[0] == (100, 100, 100) and got[1] == (255, 255, 255)
    assert all(abs(c - 177) <= 1 for c in got[2])


def test_grey_alpha_png_from_bytes():
    im = Image.new("LA", (2, 1))
    im.putdata([(0, 0), (0, 255)])
    back = png(im)
    assert back.mode == "LA"
    assert pixels(to_rgb(back)) == [(255, 255, 255), (0, 0, 0)]


def test_grey_and_rgb_with_a_transparency_key():
    # PNG's tRNS chunk on an L or RGB image: the keyed value is transparent -> white
    im = Image.new("L", (2, 1))
    im.putdata([7, 200])
    back = png(im, transparency=7)
    assert back.mode == "L" and back.info["transparency"] == 7
    assert pixels(to_rgb(back)) == [(255, 255, 255), (200, 200, 200)]
    rgb = Image.new("RGB", (2, 1))
    rgb.putdata([(1, 2, 3), (9, 9, 9)])
    assert pixels(to_rgb(png(rgb, transparency=(1, 2, 3)))) == [(255, 255, 255), (9, 9, 9)]
