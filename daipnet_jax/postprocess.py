"""Batched, static-shape SSD inference post-processing on device.

`detect` = softmax → decode → per class: score > threshold, greedy NMS, ≤ per_class_max → the
max_detections best per image; fixed-size with a validity mask (docs/design.md, Post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from daipnet_jax import boxes as box_lib


def _iou_row(box: jax.Array, others: jax.Array) -> jax.Array:
    """IoU of box [..., 4] with others [..., k, 4] → [..., k] (same formula as `boxes.iou`)."""
    lo = jnp.maximum(box[..., None, :2], others[..., :2])
    hi = jnp.minimum(box[..., None, 2:], others[..., 2:])
    wh = jnp.maximum(hi - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    area_o = (others[..., 2] - others[..., 0]) * (others[..., 3] - others[..., 1])
    union = area_b[..., None] + area_o - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def greedy_nms(cand_boxes: jax.Array, valid: jax.Array, nms_iou: float, max_keep: int) -> jax.Array:
    """Greedy NMS of cand_boxes [..., k, 4] (by descending score), valid [..., k] → keep [..., k]."""
    # One while-loop step per kept box for all rows at once: ≤ max_keep steps, no k × k matrix.
    k = cand_boxes.shape[-2]
    ranks = jnp.arange(k)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        step, alive, _ = state
        return (step < max_keep) & jnp.any(alive)

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        step, alive, keep = state
        first = jnp.argmax(alive, axis=-1)  # [...], the best alive candidate of each row
        has = jnp.any(alive, axis=-1)
        box = jnp.take_along_axis(cand_boxes, first[..., None, None], axis=-2)[..., 0, :]
        chosen = (ranks == first[..., None]) & has[..., None]
        over = _iou_row(box, cand_boxes) > nms_iou
        return step + 1, alive & ~over & ~chosen, keep | chosen

    init = (jnp.asarray(0), valid, jnp.zeros_like(valid))
    return jax.lax.while_loop(cond, body, init)[2]


# choice: width of the first, cheap pass of per-class candidates (see `detect`). Most classes of an
# SSD output have fewer candidates above 0.01 than this; the others are redone at wider tiers.
FIRST_PASS_K = 64
# choice: when every image has at most P // ACTIVE_FRACTION priors with some class above the
# threshold, candidates are selected among those priors only (see `detect`).
ACTIVE_FRACTION = 4


def _kept_slots(
    keep: jax.Array, top_s: jax.Array, top_i: jax.Array, slots: int
) -> tuple[jax.Array, jax.Array]:
    """keep, top_s, top_i [R, w] → the first `slots` kept (scores [R, slots], -inf; indices)."""
    w = keep.shape[-1]
    if slots > w:
        pad = ((0, 0), (0, slots - w))
        keep, top_s, top_i = jnp.pad(keep, pad), jnp.pad(top_s, pad), jnp.pad(top_i, pad)
        w = slots
    # kept ranks get descending keys w, w-1, ...; the others 0: top_k returns kept ones in order
    key = jnp.where(keep, (w - jnp.arange(w)).astype(jnp.float32), 0.0)
    pos = jax.lax.top_k(key, slots)[1]
    ok = jnp.take_along_axis(keep, pos, axis=-1)
    scores = jnp.where(ok, jnp.take_along_axis(top_s, pos, axis=-1), -jnp.inf)
    return scores, jnp.take_along_axis(top_i, pos, axis=-1)


def _nms_rows(
    rows: jax.Array,
    rows_img: jax.Array,
    decoded: jax.Array,
    k: int,
    score_threshold: float,
    nms_iou: float,
    slots: int,
    skip_overflow: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NMS of rows [R, P] (image rows_img [R]) over their k best priors, decoded [B, P, 4] →
    (kept scores [R, slots], -inf = none; prior indices [R, slots]; k-th best score [R]).

    `skip_overflow`: rows whose k-th candidate passes the threshold (redone wider) get no NMS.
    """
    top_s, top_i = jax.lax.top_k(rows, k)  # [R, k], descending
    cand = decoded[rows_img[:, None], top_i]  # [R, k, 4]
    valid = top_s > score_threshold
    if skip_overflow:
        valid &= ~valid[:, -1:]
    keep = greedy_nms(cand, valid, nms_iou, slots)
    kept_s, kept_i = _kept_slots(keep, top_s, top_i, slots)
    # The k-th best score as a min (equal, top_s is sorted): XLA rewrites top_k followed by a
    # slice of its last column into a full sort (50x slower on CPU), and an optimization_barrier
    # around top_k aborts XLA's TopkDecomposer when the computation spans several devices.
    return kept_s, kept_i, jnp.min(top_s, axis=-1)


def _per_class_nms(
    fg: jax.Array,
    decoded: jax.Array,
    k: int,
    score_threshold: float,
    nms_iou: float,
    slots: int,
) -> tuple[jax.Array, jax.Array]:
    """fg [B, K, M], decoded [B, M, 4] → (kept scores [B·K, slots], indices into M), image-major."""
    # Widening tiers FIRST_PASS_K, 4·FIRST_PASS_K, k (exact; docs/design.md, Post-processing).
    num_b, num_k, num_m = fg.shape
    n_rows = num_b * num_k
    widths = sorted({min(k, FIRST_PASS_K), min(k, 4 * FIRST_PASS_K), k})
    rows = fg.reshape(n_rows, num_m)  # [B·K, M]
    rows_img = jnp.arange(n_rows) // num_k
    opts = dict(score_threshold=score_threshold, nms_iou=nms_iou, slots=slots)
    kept_s, kept_i, last = _nms_rows(
        rows,
        rows_img,
        decoded,
        widths[0],
        skip_overflow=len(widths) > 1,
        **opts,  # type: ignore[arg-type]
    )
    for tier, width in enumerate(widths[1:], start=1):
        over = last > score_threshold  # [B·K]: rows that may have more candidates
        chunk = min(n_rows, max(8, n_rows // (4 * 4 ** (tier - 1))))
        over_rows = jnp.nonzero(over, size=n_rows + chunk, fill_value=n_rows)[0]
        n_over = jnp.sum(over)
        skip = tier < len(widths) - 1

        def body(
            state: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
            width: int = width,
            chunk: int = chunk,
            over_rows: jax.Array = over_rows,
            skip: bool = skip,
        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
            j, kept_s, kept_i, last = state
            idx = jax.lax.dynamic_slice_in_dim(over_rows, j, chunk)  # n_rows = padding
            safe = jnp.minimum(idx, n_rows - 1)
            s2, i2, last2 = _nms_rows(
                rows[safe],
                rows_img[safe],
                decoded,
                width,
                skip_overflow=skip,
                **opts,  # type: ignore[arg-type]
            )
            kept_s = kept_s.at[idx].set(s2, mode="drop")
            kept_i = kept_i.at[idx].set(i2, mode="drop")
            last = last.at[idx].set(last2, mode="drop")
            return j + chunk, kept_s, kept_i, last

        def cond(
            state: tuple[jax.Array, jax.Array, jax.Array, jax.Array], n_over: jax.Array = n_over
        ) -> jax.Array:
            return state[0] < n_over

        init = (jnp.asarray(0, n_over.dtype), kept_s, kept_i, last)
        _, kept_s, kept_i, last = jax.lax.while_loop(cond, body, init)
    return kept_s, kept_i


def detect(
    loc: jax.Array,
    logits: jax.Array,
    priors: jax.Array,
    *,
    variances: Sequence[float] = (0.1, 0.2),
    score_threshold: float = 0.01,
    nms_iou: float = 0.45,
    per_class_max: int = 50,
    max_detections: int = 200,
    pre_nms_top_k: int = 1000,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """loc [B, P, 4], logits [B, P, C] (0 = background), priors [P, 4] centre form →
    boxes [B, D, 4] normalised corners (unclipped), scores [B, D], classes [B, D] int32 in 1..C−1,
    valid [B, D] (False: zeros); D = max_detections, by descending score.

    Ties: lower prior index, then lower class. Greedy NMS suppresses IoU > nms_iou (strict).
    """
    loc = jnp.asarray(loc, jnp.float32)
    logits = jnp.asarray(logits, jnp.float32)
    num_b, num_p, num_c = logits.shape
    num_k = num_c - 1
    k = min(int(pre_nms_top_k), num_p)
    slots = min(int(per_class_max), k)
    opts = dict(score_threshold=score_threshold, nms_iou=nms_iou, slots=slots)
    decoded = box_lib.decode(loc, priors, variances)  # [B, P, 4]

    def stats(lg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # softmax pieces of one image's logits [P, C]: max, sum of exp, best foreground score
        m = lg.max(-1)
        total = jnp.exp(lg - m[:, None]).sum(-1)
        return m, total, jnp.exp(lg[:, 1:].max(-1) - m) / total

    def fg_rows(lg: jax.Array, m: jax.Array, total: jax.Array) -> jax.Array:
        # foreground softmax scores, class-major: [N, C] logits → [K, N], as jax.nn.softmax
        return (jnp.exp(lg[:, 1:] - m[:, None]) / total[:, None]).T

    m, total, best = jax.lax.map(stats, logits)  # [B, P] each

    def on_all(_: None) -> tuple[jax.Array, jax.Array]:
        rows = jax.lax.map(lambda a: fg_rows(*a), (logits, m, total))  # [B, K, P]
        return _per_class_nms(rows, decoded, k, **opts)  # type: ignore[arg-type]

    num_active = num_p // ACTIVE_FRACTION
    if min(k, FIRST_PASS_K) < num_active < num_p:

        def on_active(_: None) -> tuple[jax.Array, jax.Array]:
            def gather(
                a: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
            ) -> tuple[jax.Array, jax.Array]:
                lg, m_, t_, b_ = a
                # the active priors in ascending prior order (keeps the tie rule), padded with
                # prior 0 whose copies get score 0 (never candidates)
                idx = jnp.nonzero(b_ > score_threshold, size=num_active, fill_value=0)[0]
                rows = fg_rows(lg[idx], m_[idx], t_[idx])
                real = jnp.arange(num_active) < jnp.sum(b_ > score_threshold)
                return jnp.where(real[None, :], rows, 0.0), idx

            rows, active = jax.lax.map(gather, (logits, m, total, best))  # [B, K, M], [B, M]
            sub_boxes = jnp.take_along_axis(decoded, active[..., None], axis=1)
            kept_s, kept_j = _per_class_nms(
                rows,
                sub_boxes,
                min(k, num_active),
                **opts,  # type: ignore[arg-type]
            )
            rows_img = jnp.arange(num_b * num_k) // num_k
            return kept_s, active[rows_img[:, None], kept_j]

        fits = jnp.max(jnp.sum(best > score_threshold, axis=-1)) <= num_active
        kept_s, kept_i = jax.lax.cond(fits, on_active, on_all, None)
    else:
        kept_s, kept_i = on_all(None)

    flat_s = kept_s.reshape(num_b, num_k * slots)  # class-major, then rank
    flat_i = kept_i.reshape(num_b, num_k * slots)
    if flat_s.shape[1] < max_detections:
        pad = max_detections - flat_s.shape[1]
        flat_s = jnp.pad(flat_s, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        flat_i = jnp.pad(flat_i, ((0, 0), (0, pad)))
    # Ties in score: lower flat index first = lower class, then lower rank (= lower prior index).
    out_s, out_j = jax.lax.top_k(flat_s, max_detections)  # [B, D]
    out_valid = out_s > -jnp.inf
    prior = jnp.take_along_axis(flat_i, out_j, axis=1)
    out_boxes = jnp.take_along_axis(decoded, prior[..., None], axis=1)
    out_cls = (out_j // slots + 1).astype(jnp.int32)
    return (
        jnp.where(out_valid[..., None], out_boxes, 0.0),
        jnp.where(out_valid, out_s, 0.0),
        jnp.where(out_valid, out_cls, 0),
        out_valid,
    )
