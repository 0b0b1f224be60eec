"""Batched, static-shape SSD inference post-processing on device.

`detect` = softmax → decode → per class: score > threshold, greedy NMS, ≤ per_class_max → the
max_detections best per image; fixed-size with a validity mask (docs/design.md, Post-processing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from daipnet_jax import boxes as box_lib

# choice: candidates per sub-row of the greedy NMS loop (see `_per_class_nms`); a class with more
# candidates takes several sub-rows.
SUB_WIDTH = 64
# choice: sub-rows per (image, class) row that one NMS loop holds; rows beyond that capacity are
# done in further loops (flat, early-training outputs).
SUB_ROWS_PER_ROW = 2
# choice: when every image has at most P // ACTIVE_FRACTION priors that may have a class above
# the threshold, candidates are selected among those priors only (see `detect`).
ACTIVE_FRACTION = 4
_WORD = 32  # priors per bit-packed mask word


def _box_planes(boxes: jax.Array) -> jax.Array:
    """boxes [..., 4] corners → planes [5, ...]: x0, y0, x1, y1, area."""
    c = jnp.moveaxis(boxes, -1, 0)
    return jnp.concatenate([c, ((c[2] - c[0]) * (c[3] - c[1]))[None]], 0)


def _overlaps(chosen: jax.Array, planes: jax.Array, nms_iou: float) -> jax.Array:
    """IoU > nms_iou between chosen boxes and boxes, both as `_box_planes` (broadcast); the IoU
    as `boxes.iou`."""
    wx = jnp.maximum(jnp.minimum(chosen[2], planes[2]) - jnp.maximum(chosen[0], planes[0]), 0.0)
    wy = jnp.maximum(jnp.minimum(chosen[3], planes[3]) - jnp.maximum(chosen[1], planes[1]), 0.0)
    inter = wx * wy
    union = chosen[4] + planes[4] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0) > nms_iou


def greedy_nms(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, nms_iou: float, max_keep: int
) -> jax.Array:
    """Greedy NMS of rows of boxes [..., w, 4], scores [..., w], valid [..., w] → the kept
    positions [..., max_keep] in keeping order (-1: none). Score ties: lower position first.
    IoU as `boxes.iou`."""
    # One while-loop step per kept box for all rows at once: ≤ max_keep steps, no w × w matrix.
    # Each step keeps the best alive candidate (max score, then lowest position), so rows need
    # not be sorted. For XLA:CPU: float reductions only (its fast reduction path), coordinates
    # as planes [5, ..., w] gathered by index, a flag for the loop test.
    w = boxes.shape[-2]
    lead = valid.shape[:-1]
    ranks = jnp.arange(w, dtype=jnp.float32)
    planes = _box_planes(boxes)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array, jax.Array]) -> jax.Array:
        step, going, _, _ = state
        return (step < max_keep) & going

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        step, _, alive, kept = state  # alive: scores, -inf once kept, suppressed or invalid
        best = jnp.max(alive, axis=-1, keepdims=True)
        pick = (alive == best) & (alive > -jnp.inf)
        first_f = jnp.min(jnp.where(pick, ranks, float(w)), axis=-1)  # w: none alive
        first = first_f.astype(jnp.int32)
        has = first < w
        at = jnp.broadcast_to(jnp.minimum(first, w - 1)[None, ..., None], (5, *lead, 1))
        chosen = jnp.take_along_axis(planes, at, axis=-1)  # [5, ..., 1]
        dead = _overlaps(chosen, planes, nms_iou) | (ranks == first_f[..., None])
        kept = jax.lax.dynamic_update_index_in_dim(kept, jnp.where(has, first, -1), step, -1)
        return step + 1, jnp.any(has), jnp.where(dead, -jnp.inf, alive), kept

    alive = jnp.where(valid, scores, -jnp.inf)
    kept = jnp.full((*lead, max_keep), -1, jnp.int32)
    init = (jnp.asarray(0), jnp.asarray(True), alive, kept)
    return jax.lax.while_loop(cond, body, init)[3]


def _logit_bound(score_threshold: float) -> float:
    """What fg_max − bg must exceed for a prior to have a foreground softmax score above the
    threshold (the score is at most sigmoid(fg_max − bg)): logit(threshold), less a margin far
    above float32 rounding so that the test never drops a candidate."""
    t = float(score_threshold)
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t / (1.0 - t)) - 1e-3


def _pack_mask(mask: jax.Array) -> jax.Array:
    """mask [N, K] bool → words [K, ceil(N / 32)] uint32, bit j of word b = mask[32·b + j]."""
    # Two 16-bit halves summed in float32 (exact below 2^24): XLA:CPU runs a float sum about
    # twice as fast as the same sum over shifted uint32 bits.
    n, num_k = mask.shape
    nw = -(-n // _WORD)
    bits = jnp.pad(mask, ((0, nw * _WORD - n), (0, 0))).reshape(nw, 2, _WORD // 2, num_k)
    half = jnp.where(bits, (2.0 ** jnp.arange(_WORD // 2, dtype=jnp.float32))[:, None], 0.0)
    w = half.sum(2).astype(jnp.uint32)  # [nw, 2, K]
    return (w[:, 0] | (w[:, 1] << 16)).T


def _nth_set(words: jax.Array, cum: jax.Array, q: jax.Array) -> jax.Array:
    """Positions [R, W] of the q-th set bits (q [R, W], counted from 1) of each row of words
    [R, nw] (inclusive popcount prefix sums cum [R, nw]); 32·nw where a row has fewer."""
    b = jax.vmap(lambda c, qq: jnp.searchsorted(c, qq, side="left"))(cum, q)  # the q-th's word
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


def _segmented_greedy(
    alive: jax.Array,
    prior: jax.Array,
    cand: jax.Array,
    sub_row: jax.Array,
    table: jax.Array,
    planes: jax.Array,
    row_img: jax.Array,
    nms_iou: float,
    slots: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS of rows held as sub-rows: alive [S, w] scores (-inf: none), prior [S, w] their
    prior indices as float, cand [5, S, w] their `_box_planes`, sub_row [S] the row of each,
    table [R, T] the sub-rows of each row (S: none); planes [5, B, M] of all boxes, row_img [R]
    → kept scores [R, slots] (-inf: none) and boxes [R, slots], by descending score (ties:
    lower prior)."""
    none = float(planes.shape[-1])
    pad_s = jnp.full((1,), -jnp.inf)
    pad_p = jnp.full((1,), none)

    Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]

    def cond(state: Carry) -> jax.Array:
        return (state[0] < slots) & state[1]

    def body(state: Carry) -> Carry:
        step, _, alive, kept_s, kept_i = state
        # a row's best over its sub-rows: each sub-row's max, gathered by the table ([R, T])
        best = jnp.max(jnp.concatenate([jnp.max(alive, -1), pad_s])[table], -1)  # [R]
        at_best = (alive == best[sub_row][:, None]) & (alive > -jnp.inf)
        first = jnp.min(jnp.where(at_best, prior, none), -1)  # [S]; ties: the lower prior
        first = jnp.min(jnp.concatenate([first, pad_p])[table], -1)  # [R]
        has = first < none
        chosen_i = jnp.minimum(first, none - 1).astype(jnp.int32)
        chosen = planes[:, row_img, chosen_i][:, sub_row, None]  # [5, S, 1]
        dead = _overlaps(chosen, cand, nms_iou) | (prior == first[sub_row][:, None])
        kept_s = jax.lax.dynamic_update_index_in_dim(
            kept_s, jnp.where(has, best, -jnp.inf), step, -1
        )
        kept_i = jax.lax.dynamic_update_index_in_dim(kept_i, jnp.where(has, chosen_i, 0), step, -1)
        return step + 1, jnp.any(has), jnp.where(dead, -jnp.inf, alive), kept_s, kept_i

    n_rows = table.shape[0]
    kept_s = jnp.full((n_rows, slots), -jnp.inf)
    kept_i = jnp.zeros((n_rows, slots), jnp.int32)
    init = (jnp.asarray(0), jnp.asarray(True), alive, kept_s, kept_i)
    out = jax.lax.while_loop(cond, body, init)
    return out[3], out[4]


def _per_class_nms(
    scores: jax.Array,
    words: jax.Array,
    decoded: jax.Array,
    k: int,
    score_threshold: float,
    nms_iou: float,
    slots: int,
) -> tuple[jax.Array, jax.Array]:
    """scores [B, M, K], their candidate bits words [B, K, ceil(M / 32)] (`_pack_mask`), decoded
    [B, M, 4] → (kept scores [B·K, slots], -inf = none; indices into M), image-major, each row
    by descending score."""
    # Every (image, class) row of at most k candidates is cut into SUB_WIDTH-wide sub-rows of
    # its candidates in prior order (read off the bit-packed mask), and one greedy loop runs
    # them all; rows with more than k take their k best by top_k (docs/design.md).
    num_b, num_m, num_k = scores.shape
    n_rows = num_b * num_k
    words = words.reshape(n_rows, -1)
    rows_img = jnp.arange(n_rows) // num_k
    rows_cls = jnp.arange(n_rows) % num_k
    cum = jnp.cumsum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)
    count = cum[:, -1]
    planes = _box_planes(decoded)  # [5, B, M]

    # Sub-rows are handed out in groups of whole rows: a group's rows start within its first
    # cap - per_row sub-rows, so they end within cap; one loop per group (usually one).
    n_sub = jnp.where(count <= k, -(-count // SUB_WIDTH), 0)
    ends = jnp.cumsum(n_sub)
    starts = ends - n_sub
    per_row = -(-k // SUB_WIDTH)
    cap = max(SUB_ROWS_PER_ROW * n_rows, 2 * per_row)
    group = starts // (cap - per_row)
    n_groups = jnp.where(ends[-1] > 0, group[-1] + 1, 0)

    Carry = tuple[jax.Array, jax.Array, jax.Array]

    def group_body(state: Carry) -> Carry:
        g, kept_s, kept_i = state
        mine = group == g
        first = (cap - per_row) * g
        s = first + jnp.arange(cap)
        sub_row = jnp.minimum(jnp.searchsorted(ends, s, side="right"), n_rows - 1)
        used = (s < ends[-1]) & (group[sub_row] == g)
        q = (s - starts[sub_row])[:, None] * SUB_WIDTH + jnp.arange(1, SUB_WIDTH + 1)
        pos = _nth_set(words[sub_row], cum[sub_row], q)
        valid = (pos < num_m) & used[:, None]
        pos = jnp.minimum(pos, num_m - 1)
        img = rows_img[sub_row][:, None]
        alive = jnp.where(valid, scores[img, pos, rows_cls[sub_row][:, None]], -jnp.inf)
        t = jnp.arange(per_row)
        table = jnp.where(mine[:, None] & (t < n_sub[:, None]), starts[:, None] - first + t, cap)
        s2, i2 = _segmented_greedy(
            alive,
            pos.astype(jnp.float32),
            planes[:, img, pos],
            sub_row,
            table,
            planes,
            rows_img,
            nms_iou,
            slots,
        )
        mine = mine[:, None]
        return g + 1, jnp.where(mine, s2, kept_s), jnp.where(mine, i2, kept_i)

    kept_s = jnp.full((n_rows, slots), -jnp.inf)
    kept_i = jnp.zeros((n_rows, slots), jnp.int32)
    init = (jnp.asarray(0, n_groups.dtype), kept_s, kept_i)
    _, kept_s, kept_i = jax.lax.while_loop(lambda st: st[0] < n_groups, group_body, init)

    # Rows of more than k candidates, in chunks of rows: their k best by top_k (ties: lower
    # prior), then `greedy_nms`.
    over = count > k
    chunk = min(n_rows, 8)
    over_rows = jnp.nonzero(over, size=n_rows + chunk, fill_value=n_rows)[0]
    n_over = jnp.sum(over)

    def top_body(state: Carry) -> Carry:
        j, kept_s, kept_i = state
        idx = jax.lax.dynamic_slice_in_dim(over_rows, j, chunk)  # n_rows = padding
        sel = jnp.minimum(idx, n_rows - 1)
        img, cls = rows_img[sel][:, None], rows_cls[sel][:, None]
        s, pos = jax.lax.top_k(scores[img, jnp.arange(num_m), cls], k)
        kept = greedy_nms(decoded[img, pos], s, s > score_threshold, nms_iou, slots)
        ok = kept >= 0
        kept = jnp.maximum(kept, 0)
        s2 = jnp.where(ok, jnp.take_along_axis(s, kept, axis=-1), -jnp.inf)
        i2 = jnp.take_along_axis(pos, kept, axis=-1)
        kept_s = kept_s.at[idx].set(s2, mode="drop")
        kept_i = kept_i.at[idx].set(i2, mode="drop")
        return j + chunk, kept_s, kept_i

    init = (jnp.asarray(0, n_over.dtype), kept_s, kept_i)
    _, kept_s, kept_i = jax.lax.while_loop(lambda st: st[0] < n_over, top_body, init)
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

    # One max pass over the logits: a prior's best foreground softmax score is at most
    # sigmoid(fg_max − bg) (the other classes only add to the denominator), so priors below
    # `_logit_bound` have no candidate and their softmax is never computed.
    fg_bias = jnp.where(jnp.arange(num_c) > 0, 0.0, -jnp.inf)  # a slice would be copied
    fg_max = (logits + fg_bias).max(-1)
    maybe = fg_max - logits[..., 0] > _logit_bound(score_threshold)  # [B, P]

    def fg_scores(lg: jax.Array) -> jax.Array:
        # foreground softmax scores [N, K] of logits [N, C], as jax.nn.softmax
        e = jnp.exp(lg - lg.max(-1, keepdims=True))
        return e[:, 1:] / e.sum(-1, keepdims=True)

    def on_all(_: None) -> tuple[jax.Array, jax.Array]:
        # One image at a time: the scores of all priors of a batch would be a temporary large
        # enough (> 32 MB at batch 8) for malloc to map fresh pages on every call.
        def one(a: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            lg, boxes = a
            s = fg_scores(lg)
            words = _pack_mask(s > score_threshold)
            return _per_class_nms(s[None], words[None], boxes[None], k, **opts)  # type: ignore[arg-type]

        kept_s, kept_i = jax.lax.map(one, (logits, decoded))  # [B, K, slots]
        return kept_s.reshape(num_b * num_k, -1), kept_i.reshape(num_b * num_k, -1)

    num_active = num_p // ACTIVE_FRACTION
    words_p = _pack_mask(maybe.T)  # [B, ceil(P / 32)]
    cum_p = jnp.cumsum(jax.lax.population_count(words_p).astype(jnp.int32), axis=-1)
    n_act = cum_p[:, -1]  # [B]
    if not 0 < num_active < num_p:
        kept_s, kept_i = on_all(None)
    else:

        def on_active(_: None) -> tuple[jax.Array, jax.Array]:
            # the maybe-active priors in ascending prior order (keeps the tie rule); padding
            # entries get score 0 (never candidates)
            q = jnp.broadcast_to(jnp.arange(1, num_active + 1), (num_b, num_active))
            active = jnp.minimum(_nth_set(words_p, cum_p, q), num_p - 1)  # [B, A]
            pad = (jnp.arange(num_active) >= n_act[:, None])[..., None]
            flat = (active + num_p * jnp.arange(num_b)[:, None]).reshape(-1)
            sub_logits = jnp.take(logits.reshape(-1, num_c), flat, axis=0, mode="clip")
            sub_boxes = jnp.take(decoded.reshape(-1, 4), flat, axis=0, mode="clip")
            scores = jax.vmap(fg_scores)(sub_logits.reshape(num_b, num_active, num_c))
            scores = jnp.where(pad, 0.0, scores)
            words = jax.vmap(_pack_mask)(scores > score_threshold)
            kept_s, kept_j = _per_class_nms(
                scores,
                words,
                sub_boxes.reshape(num_b, num_active, 4),
                min(k, num_active),
                **opts,  # type: ignore[arg-type]
            )
            rows_img = jnp.arange(num_b * num_k) // num_k
            return kept_s, active[rows_img[:, None], kept_j]

        kept_s, kept_i = jax.lax.cond(jnp.max(n_act) <= num_active, on_active, on_all, None)

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
