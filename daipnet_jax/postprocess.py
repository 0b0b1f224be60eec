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
    # Each step keeps the best alive candidate (max score, then lowest position), so rows need
    # not be sorted. For XLA:CPU: float reductions only (its fast reduction path), coordinates
    # as planes [5, ..., w] (x0, y0, x1, y1, area) gathered by index, a flag for the loop test.
    w = boxes.shape[-2]
    lead = valid.shape[:-1]
    ranks = jnp.arange(w, dtype=jnp.float32)
    c = jnp.moveaxis(boxes, -1, 0)
    area = (c[2] - c[0]) * (c[3] - c[1])
    planes = jnp.concatenate([c, area[None]], 0)

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
        b = jnp.take_along_axis(planes, at, axis=-1)  # [5, ..., 1], the chosen boxes
        wx = jnp.maximum(jnp.minimum(b[2], c[2]) - jnp.maximum(b[0], c[0]), 0.0)
        wy = jnp.maximum(jnp.minimum(b[3], c[3]) - jnp.maximum(b[1], c[1]), 0.0)
        inter = wx * wy
        union = b[4] + area - inter
        iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
        dead = (iou > nms_iou) | (ranks == first_f[..., None])
        kept = jax.lax.dynamic_update_index_in_dim(kept, jnp.where(has, first, -1), step, -1)
        return step + 1, jnp.any(has), jnp.where(dead, -jnp.inf, alive), kept

    alive = jnp.where(valid, scores, -jnp.inf)
    kept = jnp.full((*lead, max_keep), -1, jnp.int32)
    init = (jnp.asarray(0), jnp.asarray(True), alive, kept)
    return jax.lax.while_loop(cond, body, init)[3]


# choice: width of the first, cheap pass of per-class candidates (see `detect`). Most classes of an
# SSD output have fewer candidates above 0.01 than this; the others are redone at wider tiers.
FIRST_PASS_K = 64
# choice: when every image has at most P // ACTIVE_FRACTION priors with some class above the
# threshold, candidates are selected among those priors only (see `detect`).
ACTIVE_FRACTION = 4
_WORD = 32  # priors per bit-packed mask word


def _pack_mask(mask: jax.Array) -> jax.Array:
    """mask [N, K] bool → words [K, ceil(N / 32)] uint32, bit j of word b = mask[32·b + j]."""
    n, num_k = mask.shape
    nw = -(-n // _WORD)
    bits = jnp.pad(mask, ((0, nw * _WORD - n), (0, 0))).reshape(nw, _WORD, num_k)
    shifted = bits.astype(jnp.uint32) << jnp.arange(_WORD, dtype=jnp.uint32)[:, None]
    return jnp.sum(shifted, axis=1, dtype=jnp.uint32).T


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
    # Candidates in widening tiers FIRST_PASS_K, 4·FIRST_PASS_K, k, read off the bit-packed mask
    # in prior order; rows with more than k candidates take their k best by top_k (docs/design.md).
    num_b, num_m, num_k = scores.shape
    n_rows = num_b * num_k
    words = words.reshape(n_rows, -1)
    rows_img = jnp.arange(n_rows) // num_k
    rows_cls = jnp.arange(n_rows) % num_k
    cum = jnp.cumsum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)
    count = cum[:, -1]
    widths = sorted({min(k, FIRST_PASS_K), min(k, 4 * FIRST_PASS_K), k})

    def nms_rows(sel: jax.Array, width: int, top: bool) -> tuple[jax.Array, jax.Array]:
        img, cls = rows_img[sel][:, None], rows_cls[sel][:, None]
        if top:  # more than k candidates: the k best (ties: lower prior)
            s, pos = jax.lax.top_k(scores[img, jnp.arange(num_m), cls], width)
            valid = s > score_threshold
        else:  # every candidate of the row, in prior order
            pos = _nth_set(words[sel], cum[sel], width)
            valid = (pos < num_m) & (count[sel] <= width)[:, None]  # wider rows: redone later
            pos = jnp.minimum(pos, num_m - 1)
            s = scores[img, pos, cls]
        kept = greedy_nms(decoded[img, pos], s, valid, nms_iou, slots)
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

    # Softmax statistics per prior over the whole batch (vmap: no per-image copies of the logits,
    # which a lax.map makes on CPU): max, sum of exp, best foreground score.
    fg_bias = jnp.where(jnp.arange(num_c) > 0, 0.0, -jnp.inf)  # a slice would be copied
    fg_max = (logits + fg_bias).max(-1)
    m = jnp.maximum(logits[..., 0], fg_max)  # = logits.max(-1), one pass fewer
    total = jnp.exp(logits - m[..., None]).sum(-1)
    best = jnp.exp(fg_max - m) / total  # [B, P]

    def fg_scores(lg: jax.Array, m: jax.Array, total: jax.Array) -> tuple[jax.Array, jax.Array]:
        # foreground softmax scores [N, K] of logits [N, C] (as jax.nn.softmax), candidate bits
        s = jnp.exp(lg[:, 1:] - m[:, None]) / total[:, None]
        return s, _pack_mask(s > score_threshold)

    def on_all(_: None) -> tuple[jax.Array, jax.Array]:
        # One image at a time: the scores of all priors of a batch would be a temporary large
        # enough (> 32 MB at batch 8) for malloc to map fresh pages on every call (page faults
        # on every write, about 2x slower).
        def one(a: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
            lg, m_, t_, boxes = a
            scores, words = fg_scores(lg, m_, t_)
            return _per_class_nms(scores[None], words[None], boxes[None], k, **opts)  # type: ignore[arg-type]

        kept_s, kept_i = jax.lax.map(one, (logits, m, total, decoded))  # [B, K, slots]
        return kept_s.reshape(num_b * num_k, -1), kept_i.reshape(num_b * num_k, -1)

    num_active = num_p // ACTIVE_FRACTION
    n_act = jnp.sum(best > score_threshold, axis=-1)  # [B]
    if not min(k, FIRST_PASS_K) < num_active < num_p:
        kept_s, kept_i = on_all(None)
    else:

        def on_active(_: None) -> tuple[jax.Array, jax.Array]:
            def active_scores(
                lg: jax.Array, m_: jax.Array, t_: jax.Array, b_: jax.Array, n_: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
                # the active priors in ascending prior order (keeps the tie rule), padded with
                # prior 0 whose copies get score 0 (never candidates)
                idx = jnp.nonzero(b_ > score_threshold, size=num_active, fill_value=0)[0]
                s, _ = fg_scores(lg[idx], m_[idx], t_[idx])
                s = jnp.where((jnp.arange(num_active) < n_)[:, None], s, 0.0)
                return idx, s, _pack_mask(s > score_threshold)

            active, scores, words = jax.vmap(active_scores)(logits, m, total, best, n_act)
            sub_boxes = jnp.take_along_axis(decoded, active[..., None], axis=1)
            kept_s, kept_j = _per_class_nms(
                scores,
                words,
                sub_boxes,
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
