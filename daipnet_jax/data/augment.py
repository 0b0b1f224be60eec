"""SSD / RFBNet training augmentation in pure TensorFlow ops, one testable step each.

Stateless draws from a seed [2]: (config.seed, example index) gives the same example in any
tf.data parallelism. Boxes normalised corners; images float32 RGB 0..255. RFBNet's `preproc`:
IoU crop → photometric → expand → mirror → resize → drop boxes < 0.01 → else the plain example.
choices (fused expand + resize, bounded crop rounds): docs/design.md, Augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

# The seven IoU modes of SSD / RFBNet: `None` (no crop), min IoU 0.1 … 0.9, and "any" (-inf).
CROP_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9, float("-inf"))
NUM_CROP_MODES = 1 + len(CROP_MIN_IOUS)  # mode 0 = no crop
CROP_TRIES = 50
CROP_ROUNDS = 8
INTERPOLATIONS = ("bilinear", "area", "bicubic", "nearest", "lanczos3")
MIN_BOX_SIZE = 0.01


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` independent stateless seeds [2] from one seed [2]."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)
    return [seeds[i] for i in range(num)]


def _uniform(seed: tf.Tensor, shape: Sequence[int] = (), lo: float = 0.0, hi: float = 1.0):
    return tf.random.stateless_uniform(list(shape), seed=seed, minval=lo, maxval=hi)


def box_iou_1toN(window: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """IoU of windows [K, 4] with boxes [N, 4] (corners) → [K, N]."""
    w = window[:, None, :]
    b = boxes[None, :, :]
    iw = tf.maximum(tf.minimum(w[..., 2], b[..., 2]) - tf.maximum(w[..., 0], b[..., 0]), 0.0)
    ih = tf.maximum(tf.minimum(w[..., 3], b[..., 3]) - tf.maximum(w[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_w = (w[..., 2] - w[..., 0]) * (w[..., 3] - w[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / tf.maximum(area_w + area_b - inter, 1e-12)


def sample_crop(
    seed: tf.Tensor, boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """RFBNet's IoU-constrained crop: boxes [N, 4] → (window [4] int32 pixels, keep [N], mode).

    mode 0 = no crop, 1..6 = min IoU 0.1, 0.3, 0.5, 0.7, 0.9, any; 50 tries per round:
    s ~ U(0.3, 1), r² ~ U(max(0.5, s²), min(2, 1/s²)), w = s·r·W, h = s/r·H; accepted when
    min IoU ≥ the mode's and a box centre is inside. At most `CROP_ROUNDS` rounds.
    """
    m, k = CROP_ROUNDS, CROP_TRIES
    s_mode, s_scale, s_ratio, s_left, s_top = split_seed(seed, 5)
    modes = tf.random.stateless_uniform(
        [m], seed=s_mode, minval=0, maxval=NUM_CROP_MODES, dtype=tf.int32
    )
    min_iou = tf.gather(tf.constant((0.0, *CROP_MIN_IOUS), tf.float32), modes)  # [M]
    hf = tf.cast(height, tf.float32)
    wf = tf.cast(width, tf.float32)
    scale = _uniform(s_scale, [m, k], 0.3, 1.0)
    lo = tf.maximum(0.5, scale * scale)
    hi = tf.minimum(2.0, 1.0 / (scale * scale))
    ratio = tf.sqrt(lo + (hi - lo) * _uniform(s_ratio, [m, k]))
    cw = tf.maximum(tf.floor(scale * ratio * wf), 1.0)
    ch = tf.maximum(tf.floor(scale / ratio * hf), 1.0)
    left = tf.floor(_uniform(s_left, [m, k]) * (wf - cw))
    top = tf.floor(_uniform(s_top, [m, k]) * (hf - ch))
    px = tf.reshape(tf.stack([left, top, left + cw, top + ch], axis=-1), [m * k, 4])
    win = px / tf.stack([wf, hf, wf, hf])  # [M·K, 4]
    iou = tf.reshape(box_iou_1toN(win, boxes), [m, k, -1])  # [M, K, N]
    iou_ok = tf.reduce_min(iou, axis=2) >= min_iou[:, None]  # N = 0 gives +inf
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0  # [N, 2]
    inside = tf.reduce_all(
        (win[:, None, :2] < centre[None]) & (centre[None] < win[:, None, 2:]), axis=-1
    )  # [M·K, N]
    ok = iou_ok & tf.reshape(tf.reduce_any(inside, axis=1), [m, k])  # [M, K]
    ends = tf.logical_or(tf.equal(modes, 0), tf.reduce_any(ok, axis=1))  # [M]
    first_round = tf.argmax(tf.cast(ends, tf.int32), output_type=tf.int32)
    mode = tf.where(tf.reduce_any(ends), modes[first_round], 0)
    crop = mode > 0
    first_try = tf.argmax(tf.cast(ok[first_round], tf.int32), output_type=tf.int32)
    index = first_round * k + first_try
    full = tf.stack([0, 0, tf.cast(width, tf.int32), tf.cast(height, tf.int32)])
    window = tf.where(crop, tf.cast(px[index], tf.int32), full)
    keep = tf.where(crop, inside[index], tf.ones_like(boxes[:, 0], tf.bool))
    return window, keep, mode


def apply_crop(
    image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, window: tf.Tensor, keep: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Crop [H, W, 3] to `window`; kept boxes clipped and renormalised → ([h, w, 3], [M, 4], [M])."""
    hw = tf.shape(image)[:2]
    hf, wf = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    left, t, r, b = (window[i] for i in range(4))
    cropped = image[t:b, left:r]
    boxes = tf.boolean_mask(boxes, keep)
    labels = tf.boolean_mask(labels, keep)
    px = boxes * tf.stack([wf, hf, wf, hf])
    lt = tf.cast(tf.stack([left, t, left, t]), tf.float32)
    size = tf.cast(tf.stack([r - left, b - t, r - left, b - t]), tf.float32)
    lo = tf.cast(tf.stack([left, t]), tf.float32)
    hi = tf.cast(tf.stack([r, b]), tf.float32)
    px = tf.concat([tf.maximum(px[:, :2], lo), tf.minimum(px[:, 2:], hi)], axis=1)
    return cropped, (px - lt) / size, labels


def photometric_params(seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """SSD's photometric draws, each with p = 0.5 (else identity): brightness ±32, contrast and
    saturation 0.5–1.5, hue ±18°; contrast before or after the HSV steps."""
    s = split_seed(seed, 9)
    apply = [_uniform(s[i]) < 0.5 for i in range(4)]
    return dict(
        brightness=tf.where(apply[0], _uniform(s[4], (), -32.0, 32.0), 0.0),
        contrast=tf.where(apply[1], _uniform(s[5], (), 0.5, 1.5), 1.0),
        saturation=tf.where(apply[2], _uniform(s[6], (), 0.5, 1.5), 1.0),
        hue=tf.where(apply[3], _uniform(s[7], (), -18.0, 18.0), 0.0),
        contrast_first=_uniform(s[8]) < 0.5,
    )


def apply_photometric(image: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """Apply `photometric_params` to image [h, w, 3] float32 0..255 (clipped after each step)."""
    x = tf.clip_by_value(image + params["brightness"], 0.0, 255.0)
    alpha = params["contrast"]
    x = tf.where(params["contrast_first"], tf.clip_by_value(x * alpha, 0.0, 255.0), x)

    def hsv(img: tf.Tensor) -> tf.Tensor:
        h, s, v = tf.unstack(tf.image.rgb_to_hsv(img / 255.0), axis=-1)
        s = tf.clip_by_value(s * params["saturation"], 0.0, 1.0)
        h = tf.math.floormod(h + params["hue"] / 360.0, 1.0)
        return tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([h, s, v], -1)) * 255.0, 0.0, 255.0)

    needs_hsv = tf.logical_or(
        tf.not_equal(params["saturation"], 1.0), tf.not_equal(params["hue"], 0.0)
    )
    x = tf.cond(needs_hsv, lambda: hsv(x), lambda: x)
    x = tf.where(params["contrast_first"], x, tf.clip_by_value(x * alpha, 0.0, 255.0))
    return x


def expand_params(
    seed: tf.Tensor, size: int, prob: float, max_ratio: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Expand placement (inner, left, top): inner = round(S / R), R ~ U(1, max_ratio) with p =
    `prob` (else 1), offsets ~ U{0 … S − inner}."""
    s_apply, s_ratio, s_left, s_top = split_seed(seed, 4)
    apply = _uniform(s_apply) < prob
    ratio = tf.where(apply, _uniform(s_ratio, (), 1.0, max_ratio), 1.0)
    inner = tf.clip_by_value(tf.cast(tf.round(size / ratio), tf.int32), 1, size)
    span = size - inner + 1
    left = tf.random.stateless_uniform([], seed=s_left, minval=0, maxval=span, dtype=tf.int32)
    top = tf.random.stateless_uniform([], seed=s_top, minval=0, maxval=span, dtype=tf.int32)
    return inner, left, top


def resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor, method: tf.Tensor) -> tf.Tensor:
    """Resize [h, w, 3] to [height, width, 3] with interpolation INTERPOLATIONS[method]; clipped."""
    branches = [
        (lambda m=m: tf.image.resize(image, tf.stack([height, width]), method=m))
        for m in INTERPOLATIONS
    ]
    out = tf.switch_case(method, branches)
    return tf.clip_by_value(out, 0.0, 255.0)


def place(image: tf.Tensor, boxes: tf.Tensor, size: int, left, top, fill: tf.Tensor):
    """Pad [n, n, 3] into an S×S `fill` canvas at (left, top); boxes [M, 4] follow."""
    n = tf.shape(image)[0]
    pad = [[top, size - n - top], [left, size - n - left], [0, 0]]
    canvas = tf.pad(image - fill, pad) + fill
    canvas = tf.ensure_shape(canvas, [size, size, 3])
    nf = tf.cast(n, tf.float32)
    off = tf.cast(tf.stack([left, top, left, top]), tf.float32)
    return canvas, (boxes * nf + off) / float(size)


def flip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Horizontal mirror of image [H, W, 3] and boxes [M, 4]: x ↦ 1 − x."""
    flipped = tf.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=1)
    return image[:, ::-1], flipped


def large_enough(boxes: tf.Tensor, min_size: float = MIN_BOX_SIZE) -> tf.Tensor:
    """[M] bool: boxes whose normalised width and height are both ≥ `min_size`."""
    return tf.logical_and(
        boxes[:, 2] - boxes[:, 0] >= min_size, boxes[:, 3] - boxes[:, 1] >= min_size
    )


def resize_plain(image: tf.Tensor, size: int) -> tf.Tensor:
    """Evaluation / un-augmented preprocessing: bilinear resize to [S, S, 3] (aspect not kept)."""
    out = tf.image.resize(image, [size, size], method="bilinear")
    return tf.ensure_shape(tf.clip_by_value(out, 0.0, 255.0), [size, size, 3])


def augment(
    image: tf.Tensor,
    boxes: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    size: int,
    pixel_mean: Sequence[float],
    expand_prob: float,
    max_expand_ratio: float,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """image [H, W, 3], boxes [N, 4], labels [N], seed [2] → (image [S, S, 3], boxes [M, 4],
    labels [M], fell_back: no box survived, the un-augmented example was returned)."""
    s_crop, s_photo, s_expand, s_interp, s_flip = split_seed(seed, 5)
    hw = tf.shape(image)[:2]
    window, keep, _ = sample_crop(s_crop, boxes, hw[0], hw[1])
    img, bxs, lbl = apply_crop(image, boxes, labels, window, keep)
    inner, left, top = expand_params(s_expand, size, expand_prob, max_expand_ratio)
    method = tf.random.stateless_uniform(
        [], seed=s_interp, minval=0, maxval=len(INTERPOLATIONS), dtype=tf.int32
    )
    img = resize(img, inner, inner, method)
    img = apply_photometric(img, photometric_params(s_photo))
    fill = tf.constant(pixel_mean, tf.float32)
    img, bxs = place(img, bxs, size, left, top, fill)
    do_flip = _uniform(s_flip) < 0.5
    img, bxs = tf.cond(do_flip, lambda: flip(img, bxs), lambda: (img, bxs))
    ok = large_enough(bxs)
    bxs = tf.boolean_mask(bxs, ok)
    lbl = tf.boolean_mask(lbl, ok)
    fell_back = tf.equal(tf.shape(bxs)[0], 0)
    img, bxs, lbl = tf.cond(
        fell_back,
        lambda: (resize_plain(image, size), boxes, labels),
        lambda: (img, bxs, lbl),
    )
    return tf.ensure_shape(img, [size, size, 3]), bxs, lbl, fell_back
