"""Augmentation invariants over many seeds, against NumPy references."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from daipnet_jax.data import augment as aug
from daipnet_jax.data import pipeline

MEAN = (123.0, 117.0, 104.0)
_crop = tf.function(aug.sample_crop, reduce_retracing=True)
_photo = tf.function(aug.photometric_params)
_augment = tf.function(aug.augment, reduce_retracing=True)


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 0.7, (n, 2))
    wh = rng.uniform(0.05, 0.3, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1).astype(np.float32)


def _np_iou(win: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(win[2], boxes[:, 2]) - np.maximum(win[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(win[3], boxes[:, 3]) - np.maximum(win[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(win) + area(boxes) - inter)


def test_sample_crop_invariants_over_seeds():
    rng = np.random.default_rng(0)
    h, w = 240, 320
    min_ious = {1: 0.1, 2: 0.3, 3: 0.5, 4: 0.7, 5: 0.9, 6: -np.inf}
    modes, cropped = [], 0
    for s in range(300):
        boxes = _random_boxes(rng, int(rng.integers(1, 6)))
        win, keep, mode = (t.numpy() for t in _crop(tf.constant([7, s]), tf.constant(boxes), h, w))
        modes.append(int(mode))
        x0, t, r, b = win
        assert 0 <= x0 < r <= w and 0 <= t < b <= h
        if (x0, t, r, b) == (0, 0, w, h):
            assert keep.all()
            continue
        cropped += 1
        assert mode > 0
        nwin = np.array([x0 / w, t / h, r / w, b / h])
        # Scale s ∈ [0.3, 1]: the crop covers s² ∈ [0.09, 1] of the image (floor: ≥ 0.085).
        assert 0.085 <= (r - x0) * (b - t) / (w * h) <= 1.0
        # Kept boxes are exactly those whose centre is strictly inside; at least one.
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((nwin[:2] < centre) & (centre < nwin[2:]), axis=1)
        np.testing.assert_array_equal(keep, inside)
        assert keep.any()
        assert _np_iou(nwin, boxes).min() >= min_ious[int(mode)] - 1e-6
    assert np.bincount(modes, minlength=7)[[0, 6]].min() > 100  # "none" and "any" dominate here
    assert cropped > 150  # rounds are redrawn until a crop succeeds or mode 'none' is drawn


def test_sample_crop_modes_all_reachable():
    # One large box: every min-IoU mode can succeed, so each of the 7 modes ends some rounds.
    box = tf.constant([[0.05, 0.05, 0.95, 0.95]])
    modes = [int(_crop(tf.constant([3, s]), box, 100, 100)[2]) for s in range(200)]
    counts = np.bincount(modes, minlength=7)
    assert counts.min() >= 10, counts  # uniform over 7: ~29 each


def test_apply_crop_hand_worked():
    image = np.arange(100 * 200 * 3, dtype=np.float32).reshape(100, 200, 3)
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.9, 0.9, 1.0, 1.0]], np.float32)
    window = tf.constant([40, 20, 140, 80])  # left, top, right, bottom (pixels)
    img, b, lab = aug.apply_crop(
        tf.constant(image),
        tf.constant(boxes),
        tf.constant([3, 4]),
        window,
        tf.constant([True, False]),
    )
    np.testing.assert_array_equal(img.numpy(), image[20:80, 40:140])
    # Box pixels (20, 10, 100, 50) → clipped (40, 20, 100, 50) → minus (40, 20) → / (100, 60).
    np.testing.assert_allclose(b.numpy(), [[0.0, 0.0, 0.6, 0.5]], atol=1e-6)
    assert lab.numpy().tolist() == [3]


def test_photometric_params_in_range_and_frequencies():
    ps = [_photo(tf.constant([1, s])) for s in range(400)]
    get = lambda k: np.array([float(p[k]) for p in ps])  # noqa: E731
    b, c, sat, hue = get("brightness"), get("contrast"), get("saturation"), get("hue")
    assert np.all(np.abs(b) <= 32) and np.all((c >= 0.5) & (c <= 1.5))
    assert np.all((sat >= 0.5) & (sat <= 1.5)) and np.all(np.abs(hue) <= 18)
    for v, identity in ((b, 0.0), (c, 1.0), (sat, 1.0), (hue, 0.0)):
        applied = np.mean(v != identity)
        assert 0.4 < applied < 0.6  # each step with p = 0.5
        assert np.ptp(v[v != identity]) > 0.8 * {0.0: 64 if v is b else 36, 1.0: 1.0}[identity]
    assert 0.4 < np.mean([bool(p["contrast_first"]) for p in ps]) < 0.6


def _np_photometric(img: np.ndarray, p: dict) -> np.ndarray:
    x = np.clip(img + p["brightness"], 0, 255)
    if p["contrast_first"]:
        x = np.clip(x * p["contrast"], 0, 255)
    if p["saturation"] != 1.0 or p["hue"] != 0.0:
        out = np.empty_like(x)
        for i in np.ndindex(x.shape[:2]):
            h, s, v = colorsys.rgb_to_hsv(*(x[i] / 255.0))
            s = min(max(s * p["saturation"], 0.0), 1.0)
            h = (h + p["hue"] / 360.0) % 1.0
            out[i] = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
        x = np.clip(out, 0, 255)
    if not p["contrast_first"]:
        x = np.clip(x * p["contrast"], 0, 255)
    return x


@pytest.mark.parametrize("contrast_first", [True, False])
def test_apply_photometric_matches_numpy(contrast_first):
    img = np.random.default_rng(3).uniform(0, 255, (6, 7, 3)).astype(np.float32)
    p = dict(
        brightness=20.0, contrast=1.3, saturation=0.7, hue=-12.0, contrast_first=contrast_first
    )
    got = aug.apply_photometric(tf.constant(img), {k: tf.constant(v) for k, v in p.items()}).numpy()
    np.testing.assert_allclose(got, _np_photometric(img.astype(np.float64), p), atol=0.05)


def test_flip_maps_boxes_exactly():
    img = np.zeros((50, 80, 3), np.float32)
    img[10:20, 8:24] = 255.0  # object at x 8..24, y 10..20 (pixels)
    boxes = np.array([[8 / 80, 10 / 50, 24 / 80, 20 / 50], [0.1, 0.2, 0.3, 0.4]], np.float32)
    fimg, fb = (t.numpy() for t in aug.flip(tf.constant(img), tf.constant(boxes)))
    np.testing.assert_array_equal(fimg, img[:, ::-1])
    np.testing.assert_allclose(fb[1], [0.7, 0.2, 0.9, 0.4], atol=1e-7)
    x0, y0, x1, y1 = np.round(fb[0] * [80, 50, 80, 50]).astype(int)
    assert (fimg[y0:y1, x0:x1] == 255).all() and fimg.sum() == 255.0 * 3 * (y1 - y0) * (x1 - x0)
    _, back = aug.flip(tf.constant(fimg), tf.constant(fb))
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-7)


def test_place_keeps_pixel_mean_fill_and_maps_boxes():
    inner = np.full((40, 40, 3), 7.0, np.float32)
    inner[10:30, 20:40] = 250.0
    canvas, b = aug.place(
        tf.constant(inner), tf.constant([[0.5, 0.25, 1.0, 0.75]]), 100, 13, 21, tf.constant(MEAN)
    )
    canvas, b = canvas.numpy(), b.numpy()
    fill = np.ones((100, 100), bool)
    fill[21:61, 13:53] = False
    np.testing.assert_array_equal(canvas[fill], np.broadcast_to(MEAN, (fill.sum(), 3)))
    np.testing.assert_array_equal(canvas[21:61, 13:53], inner)
    np.testing.assert_allclose(
        b, [[(13 + 20) / 100, (21 + 10) / 100, (13 + 40) / 100, (21 + 30) / 100]], atol=1e-6
    )


def test_expand_params_ranges():
    draws = [
        tuple(int(v) for v in aug.expand_params(tf.constant([2, s]), 300, 0.6, 4.0))
        for s in range(300)
    ]
    inner = np.array([d[0] for d in draws])
    assert all(x >= 0 and y >= 0 and x + n <= 300 and y + n <= 300 for n, x, y in draws)
    assert inner.min() >= 75 and inner.max() == 300
    assert 0.5 < np.mean(inner < 300) < 0.7  # p = 0.6


def _example(rng: np.random.Generator, h: int, w: int):
    img = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
    return img, _random_boxes(rng, int(rng.integers(1, 6)))


def test_augment_invariants_over_seeds():
    rng = np.random.default_rng(1)
    fell_back = 0
    for s in range(60):
        img, boxes = _example(rng, int(rng.integers(80, 200)), int(rng.integers(80, 200)))
        labels = np.arange(1, len(boxes) + 1, dtype=np.int32)
        args = (tf.constant(img), tf.constant(boxes), tf.constant(labels), tf.constant([5, s]))
        kwargs = dict(size=96, pixel_mean=MEAN, expand_prob=0.6, max_expand_ratio=4.0)
        out, b, lab, fb = _augment(*args, **kwargs)
        out, b, lab = out.numpy(), b.numpy(), lab.numpy()
        fell_back += bool(fb)
        assert (
            out.shape == (96, 96, 3)
            and np.isfinite(out).all()
            and out.min() >= 0
            and out.max() <= 255
        )
        assert len(b) == len(lab) >= 1 and set(lab.tolist()) <= set(labels.tolist())
        assert np.all((b >= 0) & (b <= 1))
        assert np.all(b[:, 2] - b[:, 0] >= 0.01) and np.all(b[:, 3] - b[:, 1] >= 0.01)
        # Same seed → same example.
        again = _augment(*args, **kwargs)
        np.testing.assert_array_equal(again[0].numpy(), out)
        np.testing.assert_array_equal(again[1].numpy(), b)
    assert fell_back < 10


def test_augment_expand_fill_is_pixel_mean():
    rng = np.random.default_rng(2)
    for s in range(20):
        img, boxes = _example(rng, 120, 150)
        seed = tf.constant([9, s])
        out, *_ = _augment(
            tf.constant(img),
            tf.constant(boxes),
            tf.constant(np.ones(len(boxes), np.int32)),
            seed,
            size=64,
            pixel_mean=MEAN,
            expand_prob=1.0,
            max_expand_ratio=4.0,
        )
        inner, _, _ = aug.expand_params(aug.split_seed(seed, 5)[2], 64, 1.0, 4.0)
        is_mean = np.all(out.numpy() == np.array(MEAN, np.float32), axis=-1)
        assert is_mean.sum() >= 64 * 64 - int(inner) ** 2


def test_augment_falls_back_when_no_box_survives():
    img = np.random.default_rng(4).uniform(0, 255, (100, 100, 3)).astype(np.float32)
    boxes = np.array([[0.5, 0.5, 0.504, 0.505]], np.float32)  # < 0.01 wide: always dropped
    out, b, lab, fb = aug.augment(
        tf.constant(img),
        tf.constant(boxes),
        tf.constant([2]),
        tf.constant([0, 1]),
        size=50,
        pixel_mean=MEAN,
        expand_prob=0.6,
        max_expand_ratio=4.0,
    )
    assert bool(fb)
    np.testing.assert_array_equal(b.numpy(), boxes)
    np.testing.assert_array_equal(lab.numpy(), [2])
    np.testing.assert_allclose(out.numpy(), tf.image.resize(img, [50, 50]).numpy(), atol=1e-4)


def test_pad_targets_and_truncation():
    boxes = tf.constant(np.arange(20, dtype=np.float32).reshape(5, 4) / 20)
    b, lab, mask, trunc = pipeline.pad_targets(boxes, tf.constant([1, 2, 3, 4, 5]), 3)
    assert int(trunc) == 2 and mask.numpy().tolist() == [True] * 3
    np.testing.assert_array_equal(b.numpy(), boxes.numpy()[:3])
    b, lab, mask, trunc = pipeline.pad_targets(boxes[:2], tf.constant([1, 2]), 4)
    assert int(trunc) == 0 and mask.numpy().tolist() == [True, True, False, False]
    assert lab.numpy().tolist() == [1, 2, 0, 0] and not b.numpy()[2:].any()


def test_sanitize_repairs_and_counts():
    nan = float("nan")
    boxes = tf.constant(
        [
            [0.1, 0.1, 0.5, 0.5],  # fine
            [-0.2, 0.3, 0.4, 1.3],  # out of range → clipped
            [0.6, 0.6, 0.2, 0.9],  # inverted x → dropped
            [0.3, 0.3, 0.3, 0.6],  # zero width → dropped
            [nan, 0.1, 0.2, 0.3],  # non-finite → dropped
            [1.2, 0.1, 1.5, 0.3],  # entirely outside → zero width after clipping → dropped
            [0.2, 0.2, 0.9, 0.9],  # crowd → not a target
        ],
        tf.float32,
    )
    crowd = tf.constant([False] * 6 + [True])
    b, lab, c = pipeline.sanitize(boxes, tf.range(1, 8), crowd)
    np.testing.assert_allclose(b.numpy(), [[0.1, 0.1, 0.5, 0.5], [0.0, 0.3, 0.4, 1.0]])
    assert lab.numpy().tolist() == [1, 2]
    assert {k: int(v) for k, v in c.items()} == dict(
        crowd_boxes=1, clipped_boxes=1, invalid_boxes=4
    )
