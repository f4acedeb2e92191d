"""Small deterministic pictures for synthetic posts, with something a model can learn.

The picture has the post's aspect ratio. Its background is a gradient whose colours come
from the post id; on it, the people-count tag decides the shape (1girl: circle, 1boy:
square, 1other: triangle, no_humans: stripes, several girls: several circles) and the
hair colour tag decides the shape's colour, so the caption describes the picture.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ..rng import hash64

HAIR_COLOURS = {
    "blonde": (240, 210, 80), "brown": (130, 80, 40), "black": (25, 25, 30), "blue": (50, 90, 220),
    "red": (210, 40, 40), "pink": (240, 140, 190), "purple": (140, 70, 190), "white": (245, 245, 245),
    "grey": (140, 140, 140), "silver": (200, 205, 215), "green": (50, 170, 70), "orange": (240, 140, 30),
    "aqua": (60, 210, 210), "light_brown": (190, 140, 90), "light_blue": (140, 190, 245),
    "dark_blue": (20, 40, 120), "light_purple": (190, 150, 230),
}
HAIR_TAGS = {f"{c}_hair": rgb for c, rgb in HAIR_COLOURS.items()}
# First matching tag -> (shape, how many).
SHAPES = (("6+girls", "circle", 4), ("5girls", "circle", 4), ("4girls", "circle", 4),
          ("3girls", "circle", 3), ("2girls", "circle", 2), ("1girl", "circle", 1),
          ("1boy", "square", 1), ("2boys", "square", 2), ("1other", "triangle", 1),
          ("no_humans", "stripes", 1))
SHAPE_TAGS = frozenset(t for t, _, _ in SHAPES)
FORMATS = {"webp": ("WEBP", {"quality": 80, "method": 4}), "jpg": ("JPEG", {"quality": 90}),
           "png": ("PNG", {"optimize": False})}


def image_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The post's width x height scaled so the longest side is max_side (aspect kept)."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def render(post_id: int, width: int, height: int, tags, seed: int = 0, max_side: int = 128) -> Image.Image:
    """The picture of one post (RGB), a pure function of its arguments."""
    w, h = image_size(width, height, max_side)
    h1, h2 = hash64(seed, post_id, 1), hash64(seed, post_id, 2)
    c1 = np.array([(h1 >> s) & 255 for s in (0, 8, 16)], float)
    c2 = np.array([(h2 >> s) & 255 for s in (0, 8, 16)], float)
    t = (np.linspace(0, 1, h)[:, None] * 0.7 + np.linspace(0, 1, w)[None, :] * 0.3)[..., None]
    img = Image.fromarray((c1 * (1 - t) + c2 * t).astype(np.uint8), "RGB")

    colour = next((HAIR_TAGS[tag] for tag in sorted(tags) if tag in HAIR_TAGS), (128, 128, 128))
    shape, count = next(((s, k) for tag, s, k in SHAPES if tag in tags), (None, 0))
    draw = ImageDraw.Draw(img)
    r = max(1, min(w, h) // (2 + count))
    for i in range(count):
        cx = w * (i + 1) // (count + 1)
        cy = h // 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            for x in range(0, w, max(2, w // 6)):
                draw.rectangle((x, 0, x + max(1, w // 12), h), fill=colour)
    return img


def encode(img: Image.Image, ext: str) -> bytes:
    """The picture as a file of the given extension (webp, jpg or png)."""
    fmt, opts = FORMATS[ext]
    buf = io.BytesIO()
    img.save(buf, fmt, **opts)
    return buf.getvalue()
