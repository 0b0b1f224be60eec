"""Batched, static-shape SSD inference post-processing on device.

`detect` = softmax → decode → per class: score > threshold, greedy NMS, ≤ per_class_max → the
max_detections best per image; fixed-size with a validity mask (docs/design.md, Post-processing).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from daipnet_jax import boxes as box_lib


def greedy_nms(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, nms_iou: float, max_keep: int
) -> jax.Array:
    """Greedy NMS of rows of boxes [..., w, 4], scores [..., w], valid [..., w] → the kept
    positions [..., max_keep] in keeping order (-1: none). Score ties: lower position first.
    IoU as `boxes.iou`."""
    # One while-loop step per kept box for all rows at once: ≤ max_keep steps, no w × w matrix.
    # Each step keeps the best alive candidate (max, then lowest position), so rows need not be
    # sorted; coordinates are planes [4, ..., w] and chosen boxes masked maxima (vectorised on
    # CPU, unlike gathers of [..., 4] rows).
    w = boxes.shape[-2]
    ranks = jnp.arange(w)
    masked = jnp.where(valid, scores, -jnp.inf)
    c = jnp.moveaxis(boxes, -1, 0)
    area = (c[2] - c[0]) * (c[3] - c[1])
    planes = jnp.concatenate([c, area[None]], 0)  # [5, ..., w]

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        step, alive, _ = state
        return (step < max_keep) & jnp.any(alive)

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        step, alive, kept = state
        s = jnp.where(alive, masked, -jnp.inf)
        best = jnp.max(s, axis=-1, keepdims=True)
        first = jnp.min(jnp.where(alive & (s == best), ranks, w), axis=-1)  # w: none alive
        chosen = ranks == first[..., None]
        b = jnp.max(jnp.where(chosen, planes, -jnp.inf), axis=-1, keepdims=True)  # [5, ..., 1]
        wx = jnp.maximum(jnp.minimum(b[2], c[2]) - jnp.maximum(b[0], c[0]), 0.0)
        wy = jnp.maximum(jnp.minimum(b[3], c[3]) - jnp.maximum(b[1], c[1]), 0.0)
        inter = wx * wy
        union = b[4] + area - inter
        iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
        kept = jax.lax.dynamic_update_index_in_dim(kept, jnp.where(first < w, first, -1), step, -1)
        return step + 1, alive & ~(iou > nms_iou) & ~chosen, kept

    kept = jnp.full((*valid.shape[:-1], max_keep), -1, jnp.int32)
    return jax.lax.while_loop(cond, body, (jnp.asarray(0), valid, kept))[2]


# choice: width of the first, cheap pass of per-class candidates (see `detect`). Most classes of an
# SSD output have fewer candidates above 0.01 than this; the others are redone at wider tiers.
FIRST_PASS_K = 64
# choice: when every image has at most P // ACTIVE_FRACTION priors with some class above the
# threshold, candidates are selected among those priors only (see `detect`).
ACTIVE_FRACTION = 4
_WORD = 32  # priors per bit-packed mask word


def _pack_mask(mask: jax.Array) -> jax.Array:
    """mask [R, N] bool → words [R, ceil(N / 32)] uint32, bit j of word b = mask[:, 32·b + j]."""
    n = mask.shape[-1]
    nw = -(-n // _WORD)
    bits = jnp.pad(mask, ((0, 0), (0, nw * _WORD - n))).reshape(-1, nw, _WORD).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(_WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _nth_set(words: jax.Array, cum: jax.Array, width: int) -> jax.Array:
    """Positions [R, width] of the 1st..width-th set bits of each row of words [R, nw] (inclusive
    popcount prefix sums cum [R, nw]); 32·nw where a row has fewer."""
    q = jnp.arange(1, width + 1, dtype=cum.dtype)
    b = jax.vmap(lambda c: jnp.searchsorted(c, q, side="left"))(cum)  # word holding the q-th bit
    safe = jnp.minimum(b, cum.shape[-1] - 1)
    w = jnp.take_along_axis(words, safe, axis=-1)
    t = q - (
        jnp.take_along_axis(cum, safe, axis=-1) - jax.lax.population_count(w).astype(cum.dtype)
    )
    # binary search: the lowest bit p with popcount(w & (2^(p+1) - 1)) >= t
    p = jnp.zeros_like(t)
    for step in (16, 8, 4, 2, 1):
        low = w & ((jnp.uint32(1) << (p + step).astype(jnp.uint32)) - 1)
        p = jnp.where(jax.lax.population_count(low).astype(t.dtype) < t, p + step, p)
    return jnp.where(b < cum.shape[-1], b * _WORD + p, cum.shape[-1] * _WORD)


def _per_class_nms(
    fg: jax.Array,
    decoded: jax.Array,
    k: int,
    score_threshold: float,
    nms_iou: float,
    slots: int,
) -> tuple[jax.Array, jax.Array]:
    """fg [B, K, M], decoded [B, M, 4] → (kept scores [B·K, slots], -inf = none; indices into
    M), image-major, each row by descending score."""
    # Candidates in widening tiers FIRST_PASS_K, 4·FIRST_PASS_K, k, read off a bit-packed mask in
    # prior order; rows with more than k candidates take their k best by top_k (docs/design.md).
    num_b, num_k, num_m = fg.shape
    n_rows = num_b * num_k
    rows = fg.reshape(n_rows, num_m)  # [B·K, M]
    rows_img = jnp.arange(n_rows) // num_k
    words = _pack_mask(rows > score_threshold)
    cum = jnp.cumsum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)
    count = cum[:, -1]
    widths = sorted({min(k, FIRST_PASS_K), min(k, 4 * FIRST_PASS_K), k})

    def nms_rows(sel: jax.Array, width: int, top: bool) -> tuple[jax.Array, jax.Array]:
        if top:  # more than k candidates: the k best (ties: lower prior)
            s, pos = jax.lax.top_k(rows[sel], width)
            valid = s > score_threshold
        else:  # every candidate of the row, in prior order
            pos = _nth_set(words[sel], cum[sel], width)
            valid = (pos < num_m) & (count[sel] <= width)[:, None]  # wider rows: redone later
            pos = jnp.minimum(pos, num_m - 1)
            s = jnp.take_along_axis(rows[sel], pos, axis=-1)
        kept = greedy_nms(decoded[rows_img[sel][:, None], pos], s, valid, nms_iou, slots)
        ok = kept >= 0
        kept = jnp.maximum(kept, 0)
        kept_s = jnp.where(ok, jnp.take_along_axis(s, kept, axis=-1), -jnp.inf)
        return kept_s, jnp.take_along_axis(pos, kept, axis=-1)

    kept_s, kept_i = nms_rows(jnp.arange(n_rows), widths[0], False)
    stages = [(w, lo, False) for lo, w in itertools.pairwise(widths)] + [(k, k, True)]
    for tier, (width, lower, top) in enumerate(stages, start=1):
        over = count > lower  # [B·K]: rows with more candidates than the earlier tiers took
        chunk = min(n_rows, max(8, n_rows // 4**tier))
        over_rows = jnp.nonzero(over, size=n_rows + chunk, fill_value=n_rows)[0]
        n_over = jnp.sum(over)

        def body(
            state: tuple[jax.Array, jax.Array, jax.Array],
            width: int = width,
            chunk: int = chunk,
            over_rows: jax.Array = over_rows,
            top: bool = top,
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            j, kept_s, kept_i = state
            idx = jax.lax.dynamic_slice_in_dim(over_rows, j, chunk)  # n_rows = padding
            s2, i2 = nms_rows(jnp.minimum(idx, n_rows - 1), width, top)
            kept_s = kept_s.at[idx].set(s2, mode="drop")
            kept_i = kept_i.at[idx].set(i2, mode="drop")
            return j + chunk, kept_s, kept_i

        def cond(
            state: tuple[jax.Array, jax.Array, jax.Array], n_over: jax.Array = n_over
        ) -> jax.Array:
            return state[0] < n_over

        init = (jnp.asarray(0, n_over.dtype), kept_s, kept_i)
        _, kept_s, kept_i = jax.lax.while_loop(cond, body, init)
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
