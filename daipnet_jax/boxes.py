"""Prior boxes, IoU, box encoding and ground-truth matching (SSD, paper Section 3.5).

Boxes are normalised corners (xmin, ymin, xmax, ymax); priors normalised centre form
(cx, cy, w, h). All but `prior_boxes` (host NumPy) are static-shape `jax.numpy`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Variances = Sequence[float]

# choice: widths/heights below this are clamped before the log of `encode`, so a degenerate
# (zero-size) truth gives a large finite target instead of -inf. Real boxes are far larger
# (the data pipeline drops boxes under 0.01), so encode/decode stay exact inverses for them.
_MIN_SIZE = 1e-6


def _prior_section(config: Any) -> tuple[Any, int]:
    """(priors table, image size) from a full config (`config.priors`, `config.model.image_size`)."""
    return config.priors, int(config.model.image_size)


def prior_boxes(config: Any) -> np.ndarray:
    """SSD prior boxes of `config`, [P, 4] float32 normalised centre form (cx, cy, w, h).

    For each source k (in head order), for each cell (i row, j column, row-major),
    centre ((j + 0.5)/f_k, (i + 0.5)/f_k) with f_k = S / step_k, then the sizes in this order:
    min_k; sqrt(min_k·max_k); for each ratio r: (min_k·√r, min_k/√r), (min_k/√r, min_k·√r); all
    divided by S; (row, column, anchor) is the heads' NHWC order. `priors.clip` clamps cx, cy,
    w, h to [0, 1] (as ssd.pytorch's PriorBox).
    """
    table, size = _prior_section(config)
    out: list[list[float]] = []
    for k, f in enumerate(table.feature_maps):
        f_k = size / float(table.steps[k])
        s_min = float(table.min_sizes[k]) / size
        s_max = math.sqrt(s_min * float(table.max_sizes[k]) / size)
        for i, j in itertools.product(range(int(f)), repeat=2):
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            out.append([cx, cy, s_min, s_min])
            out.append([cx, cy, s_max, s_max])
            for r in table.aspect_ratios[k]:
                sr = math.sqrt(float(r))
                out.append([cx, cy, s_min * sr, s_min / sr])
                out.append([cx, cy, s_min / sr, s_min * sr])
    priors = np.asarray(out, dtype=np.float64)
    if bool(table.get("clip", True)):
        priors = np.clip(priors, 0.0, 1.0)
    return priors.astype(np.float32)


def center_to_corners(boxes: jax.Array) -> jax.Array:
    """[..., 4] (cx, cy, w, h) → [..., 4] (xmin, ymin, xmax, ymax)."""
    return jnp.concatenate(
        [boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1
    )


def corners_to_center(boxes: jax.Array) -> jax.Array:
    """[..., 4] (xmin, ymin, xmax, ymax) → [..., 4] (cx, cy, w, h)."""
    return jnp.concatenate(
        [(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1
    )


def iou(a: Any, b: Any, xp: Any = jnp) -> Any:
    """IoU of corner boxes a [..., N, 4], b [..., M, 4] → [..., N, M] (docs/design.md, Box areas)."""
    a = jnp.asarray(a, jnp.float32) if xp is jnp else np.asarray(a)
    b = jnp.asarray(b, jnp.float32) if xp is jnp else np.asarray(b)
    lo = xp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = xp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = xp.maximum(hi - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def encode(matched: jax.Array, priors: jax.Array, variances: Variances = (0.1, 0.2)) -> jax.Array:
    """matched [..., P, 4] corners, priors [P, 4] → ((g_c − p_c) / (v0·p_wh), log(g_wh / p_wh) / v1)."""
    priors = jnp.asarray(priors, jnp.float32)
    g = corners_to_center(jnp.asarray(matched, jnp.float32))
    g_c = (g[..., :2] - priors[:, :2]) / (variances[0] * priors[:, 2:])
    g_wh = jnp.log(jnp.maximum(g[..., 2:], _MIN_SIZE) / priors[:, 2:]) / variances[1]
    return jnp.concatenate([g_c, g_wh], -1)


def decode(loc: jax.Array, priors: jax.Array, variances: Variances = (0.1, 0.2)) -> jax.Array:
    """Inverse of `encode`: loc [..., P, 4], priors [P, 4] centre → [..., P, 4] corners."""
    priors = jnp.asarray(priors, jnp.float32)
    loc = jnp.asarray(loc, jnp.float32)
    c = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    wh = priors[:, 2:] * jnp.exp(loc[..., 2:] * variances[1])
    return jnp.concatenate([c - wh / 2, c + wh / 2], -1)


def _match_one(
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: jax.Array,
    iou_threshold: float,
    variances: Variances,
) -> tuple[jax.Array, jax.Array]:
    """`match` for one image: gt_boxes [G, 4], gt_labels [G], gt_mask [G], priors [P, 4]."""
    num_truths = gt_boxes.shape[0]
    num_p = priors.shape[0]
    overlaps = iou(gt_boxes, center_to_corners(priors))  # [G, P]
    # Invalid (padded) truths get -1: below every real IoU (≥ 0), so never any prior's best truth
    # while the image has a valid one, and they never force a prior (mask below).
    overlaps = jnp.where(gt_mask[:, None], overlaps, -1.0)
    best_truth_overlap = overlaps.max(0)  # [P]
    best_truth_idx = overlaps.argmax(0)  # [P], ties: lower truth index (as torch.max)
    best_prior_idx = overlaps.argmax(1)  # [G], ties: lower prior index
    # Forced matches: each valid truth takes its best prior; when several truths share one
    # best prior, the later truth wins (ssd.pytorch's sequential loop) = the largest index.
    truth_ids = jnp.where(gt_mask, jnp.arange(num_truths), -1)
    forced = jnp.full((num_p,), -1, jnp.int32).at[best_prior_idx].max(truth_ids.astype(jnp.int32))
    is_forced = forced >= 0
    best_truth_idx = jnp.where(is_forced, forced, best_truth_idx)
    best_truth_overlap = jnp.where(is_forced, 2.0, best_truth_overlap)
    positive = best_truth_overlap >= iou_threshold
    cls = jnp.where(positive, gt_labels[best_truth_idx].astype(jnp.int32), 0)
    loc = encode(gt_boxes[best_truth_idx], priors, variances)
    # choice: background priors get zero regression targets (never used by the loss; keeps the
    # targets finite when an image has no valid truth and the "matched" box is padding).
    loc = jnp.where(positive[:, None], loc, 0.0)
    return loc, cls


def match(
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_mask: jax.Array,
    priors: jax.Array,
    *,
    iou_threshold: float = 0.5,
    variances: Variances = (0.1, 0.2),
) -> tuple[jax.Array, jax.Array]:
    """SSD matching: gt_boxes [B, G, 4], gt_labels [B, G] in 1..K, gt_mask [B, G], priors [P, 4]
    → (loc_targets [B, P, 4] f32, 0 on background; cls_targets [B, P] int32, 0 = background).

    Each prior takes its best truth (ties: lower index); each valid truth forces its best prior
    (overlap 2, later truth wins); best overlap < `iou_threshold` → background.
    """
    priors = jnp.asarray(priors, jnp.float32)
    one = functools.partial(
        _match_one, priors=priors, iou_threshold=iou_threshold, variances=tuple(variances)
    )
    return jax.vmap(one)(
        jnp.asarray(gt_boxes, jnp.float32),
        jnp.asarray(gt_labels, jnp.int32),
        jnp.asarray(gt_mask, bool),
    )
