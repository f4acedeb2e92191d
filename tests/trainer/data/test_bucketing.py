"""Aspect-ratio buckets, assignment and crop boxes against hand-checked cases (recipe §3)."""
import math

import numpy as np
import pytest

from hakubooru.errors import HakubooruError
from trainers.lokr.data.bucketing import assign_buckets, crop_box, make_buckets

A = 1024 * 1024


def test_recipe_buckets_hand_checked():
    buckets = make_buckets()
    # h(w) = min(4096, ⌊⌊A/w⌋/64⌋·64):
    #   w=256:  A/256 = 4096            -> 4096       -> (256, 4096) and (4096, 256)
    #   w=320:  A/320 = 3276.8 -> 3276  -> 51·64=3264 -> (320, 3264) and (3264, 320)
    #   w=832:  A/832 = 1260.3 -> 19·64 = 1216        -> (832, 1216), (1216, 832)
    #   w=1280: A/1280 = 819.2 -> 12·64 = 768         -> (1280, 768), (768, 1280)
    #   w=1408: A/1408 = 744.7 -> 11·64 = 704         -> (1408, 704), (704, 1408)
    #   w=4096: A/4096 = 256                          -> (4096, 256)
    #   the square (1024, 1024)
    for b in [(256, 4096), (4096, 256), (320, 3264), (3264, 320), (832, 1216), (1216, 832),
              (1280, 768), (768, 1280), (1408, 704), (704, 1408), (1024, 1024)]:
        assert b in buckets
    # Count: 61 widths (256..4096 step 64) give 61 pairs (w, h(w)) and 61 transposes. A pair
    # is its own transpose's twin when h(h(w)) = w: true for the 13 widths 256..1024 (e.g.
    # h(320)=3264, h(3264)=⌊321.25⌋->320) and for their 12 partners above 1024 (1088, 1152,
    # 1216, 1344, 1472, 1600, 1792, 2048, 2304, 2688, 3264, 4096): 25 overlaps; the square
    # is h(1024). So 61 + 61 - 25 = 97 distinct buckets.
    assert len(buckets) == 97
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 4096 and 256 <= h <= 4096
        assert w * h <= A
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_small_bucket_set_listed_by_hand():
    # area 512², sides 256..1024, step 64. h(w) = min(1024, ⌊⌊262144/w⌋/64⌋·64):
    # 256->1024, 320->768 (819), 384->640 (682), 448->576 (585), 512->512, 576->448 (455),
    # 640->384 (409), 704->320 (372), 768->320 (341), 832->256 (315), 896->256 (292),
    # 960->256 (273), 1024->256. Transposes add (320,704), (256,832), (256,896), (256,960);
    # the others are already there. 13 + 4 = 17, sorted by w/h.
    expected = [(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704),
                (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
                (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    assert make_buckets(512 * 512, 256, 1024, 64) == expected


def test_impossible_bucket_settings_rejected():
    with pytest.raises(HakubooruError):
        make_buckets(A, 512, 256, 64)
    with pytest.raises(HakubooruError):
        make_buckets(A, 256, 4096, 0)
    for area, low in ((0, 256), (-64, 256), (A, 0)):  # each bound on its own
        with pytest.raises(HakubooruError, match="impossible buckets"):
            make_buckets(area, low, 4096, 64)
    assert make_buckets(64 * 64, 64, 64, 64) == [(64, 64)]  # min_side == max_side is possible


def test_assignment_nearest_aspect_ratio():
    buckets = make_buckets()
    idx = assign_buckets([500, 2000, 1000, 2300, 1920], [500, 1000, 1500, 1700, 1080], buckets)
    got = [buckets[i] for i in idx]
    # 500x500: ratio 1 -> the square exists.
    # 2000x1000: ratio 2 -> (1408, 704) has ratio exactly 2.
    # 1000x1500: ln(2/3) = -0.405; neighbours (768,1280) ln 0.6 = -0.511 (0.105 away) and
    #   (832,1216) ln 0.684 = -0.379 (0.026 away) -> (832, 1216).
    # 2300x1700: ln 1.353 = 0.302; (1152,896) ln 1.286 = 0.251 (0.051) vs (1216,832)
    #   ln 1.462 = 0.379 (0.077) -> (1152, 896).
    # 1920x1080: ln 1.778 = 0.575; (1344,768) ln 1.75 = 0.560 (0.015) vs (1408,704) ln 2
    #   = 0.693 (0.118) -> (1344, 768).
    assert got == [(1024, 1024), (1408, 704), (832, 1216), (1152, 896), (1344, 768)]


def test_assignment_ties_and_transposes():
    # 100x100 is ln 2 away from both 64x128 and 128x64: the tie goes to the smaller w/h,
    # whatever the listing order.
    assert assign_buckets([100], [100], [(64, 128), (128, 64)]).tolist() == [0]
    assert assign_buckets([100], [100], [(128, 64), (64, 128)]).tolist() == [1]
    # Equal aspect ratios: the first listed wins.
    assert assign_buckets([10], [10], [(128, 128), (64, 64)]).tolist() == [0]
    # An image and its transpose go to transposed buckets.
    buckets = make_buckets()
    w = np.array([300, 517, 1999, 4000, 640, 3000])
    h = np.array([1200, 401, 1003, 333, 480, 2999])
    a = [buckets[i] for i in assign_buckets(w, h, buckets)]
    b = [buckets[i] for i in assign_buckets(h, w, buckets)]
    assert b == [(bh, bw) for bw, bh in a]


def test_assignment_rejects_bad_sizes():
    with pytest.raises(HakubooruError):
        assign_buckets([0], [10], [(64, 64)])
    with pytest.raises(HakubooruError):
        assign_buckets([10], [10], [])


def test_crop_box_hand_checked():
    # 2000x1000 into 1408x704: same ratio (2000·704 = 1408·1000), scale 1408/2000 = 0.704,
    # resized exactly 1408x704, nothing to crop.
    assert crop_box(2000, 1000, 1408, 704) == (1408, 704, 0, 0)
    # Portrait 1000x1500 into 832x1216: 1000·1216 < 832·1500, so relatively taller: scale
    # 832/1000 -> 832 x 1248, 32 rows overhang, centred: top 16.
    assert crop_box(1000, 1500, 832, 1216) == (832, 1248, 16, 0)
    # Random crop position u: top = ⌊u·33⌋: u=0 -> 0, u=0.25 -> ⌊8.25⌋ = 8, u=0.999 -> 32.
    assert crop_box(1000, 1500, 832, 1216, random_crop=True, u=0.0) == (832, 1248, 0, 0)
    assert crop_box(1000, 1500, 832, 1216, random_crop=True, u=0.25) == (832, 1248, 8, 0)
    assert crop_box(1000, 1500, 832, 1216, random_crop=True, u=0.999) == (832, 1248, 32, 0)
    # 2300x1700 into 1152x896: relatively wider, scale 896/1700 -> width 1212.24 -> 1212,
    # 60 columns overhang, centred left 30; u=0.5 -> ⌊30.5⌋ = 30, u=0.9 -> ⌊54.9⌋ = 54.
    assert crop_box(2300, 1700, 1152, 896) == (1212, 896, 0, 30)
    assert crop_box(2300, 1700, 1152, 896, random_crop=True, u=0.9) == (1212, 896, 0, 54)
    # Half rounds up: 129x128 into 64x64 -> width 129·64/128 = 64.5 -> 65, overhang 1,
    # centred left ⌊1/2⌋ = 0.
    assert crop_box(129, 128, 64, 64) == (65, 64, 0, 0)
    # Small images are scaled up the same way: 100x50 into 1408x704 -> 1408x704.
    assert crop_box(100, 50, 1408, 704) == (1408, 704, 0, 0)


def test_crop_box_always_covers_the_bucket():
    rng = np.random.default_rng(0)
    buckets = make_buckets()
    for w, h in rng.integers(50, 5000, (300, 2)).tolist():
        bw, bh = buckets[int(assign_buckets([w], [h], buckets)[0])]
        for u in (0.0, 0.5, 0.999):
            rw, rh, top, left = crop_box(w, h, bw, bh, random_crop=True, u=u)
            assert rw >= bw and rh >= bh
            assert (rw == bw) or (rh == bh)
            assert 0 <= left <= rw - bw and 0 <= top <= rh - bh
            # the scaled image keeps the aspect ratio to within half a pixel of rounding
            assert math.isclose(rw / rh, w / h, rel_tol=0.5 / min(rw, rh) + 1e-9)


def test_crop_box_rejects_empty_sizes():
    with pytest.raises(HakubooruError):
        crop_box(0, 10, 64, 64)


def test_widest_and_tallest_buckets_reach_max_side():
    # w = 4096: h = min(4096, 1048576 // 4096 // 64 * 64) = 256 -> (4096, 256) and (256, 4096)
    buckets = make_buckets(1024 * 1024, 256, 4096, 64)
    assert (4096, 256) in buckets and (256, 4096) in buckets
    assert make_buckets() == buckets  # the defaults are the recipe's


def test_crop_offsets_by_hand():
    # 100x61 into 50x30: relatively taller (100*30 < 50*61) -> width fits: rw = 50,
    # rh = (2*61*50 + 100) // 200 = 31 -> overhang 0 x 1; centred top = 1 // 2 = 0
    assert crop_box(100, 61, 50, 30) == (50, 31, 0, 0)
    # 100x65 into 50x30: rh = (2*65*50+100)//200 = 33,
    # overhang 3, centred top 1 (an int: 3 // 2)
    top = crop_box(100, 65, 50, 30)[2]
    assert top == 1 and isinstance(top, int)
    # random crop at floor(u * (overhang + 1)): u = 0.999 reaches the last offset, 3; the default
    # u = 0.5 gives floor(0.5 * 4) = 2
    assert crop_box(100, 65, 50, 30, random_crop=True, u=0.999) == (50, 33, 3, 0)
    assert crop_box(100, 65, 50, 30, random_crop=True) == (50, 33, 2, 0)
    # 130x50 into 60x30: wider (130*30 > 60*50): rw = (2*130*30 + 50) // 100 = 78, overhang 18;
    # u = 0.999 -> left = floor(0.999 * 19) = 18, the last offset
    assert crop_box(130, 50, 60, 30, random_crop=True, u=0.999) == (78, 30, 0, 18)
    assert crop_box(130, 50, 60, 30) == (78, 30, 0, 9)
    assert crop_box(1, 1, 8, 8) == (8, 8, 0, 0)  # a one-pixel image is an image


def test_one_pixel_images_are_assigned():
    buckets = [(32, 128), (64, 64), (128, 32)]
    assert assign_buckets([1, 5, 1], [5, 1, 1], buckets).tolist() == [0, 2, 1]
