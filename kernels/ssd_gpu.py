"""GPU launcher of the SSD kernels: plain ``pl.pallas_call`` lowered through Triton (interpret mode on CPU).

Kernels (all index arithmetic through multi-dimensional BlockSpecs and per-dimension ``pl.ds`` offsets, so
Pallas emits 64-bit offsets whenever an array exceeds 4 GiB: no flat int32 offsets at 1M+ tokens):

* ``chunk_scalars`` dt and the in-chunk cumulative log-decays in the ``(b, h, L)`` layout every kernel reads.
* ``state_scan``  one program per (head, state rows block, batch) runs one loop over every (chunk, row step), the
  state being the matmul accumulator (forward: states entering each chunk; backward, in reverse: the state
  gradients; with state_norm, a loop over chunks around the row steps). Variant ``"segments"`` (few long
  sequences) runs the same loop over runs of chunks side by side, each from a zero state, and joins the runs in
  XLA (``run_entering``, ``add_entering``) or inside the output kernel; variant ``"split"`` (state_norm with few
  sequences) computes the local states in a separate fully parallel kernel (``chunk_states``) and only passes
  them sequentially.
* ``chunk_cb``    ``C B^T`` per (group, chunk), written once for the heads of the group (read by ``output``,
  and by ``bwd_cols`` when configured).
* ``output``      one program per (head block, row block, chunk, batch): masked intra-chunk product (``C B^T``
  read from ``chunk_cb`` or computed per block pair; the diagonal block first) plus the inter-chunk output (and
  ``D x``). On Hopper ``forward`` uses ``ssd_mosaic_gpu.output`` (Mosaic GPU, wgmma) instead where it applies.
* ``bwd_cols``    per (head block, source block, chunk, batch): ``dx``, ``dw`` and the state terms.
* ``bwd_pairs``   per (head block, row block, source block, chunk, batch), looping over the heads: ``dCB`` summed
  over the heads and the row/column sums of ``dCB o CB`` per head (the log-decay gradient).
* ``bwd_group_rows`` per (group, state-column block, row block, chunk, batch), looping over the group's heads:
  ``dC`` and ``dB`` (state terms, then the intra-chunk terms from ``dCB``) and the ``dy.y_off`` terms.

Layouts: ``x, dy, y, dx (b, L, h, p)``; ``B, C (b, L, g, n)``; per-position scalars ``(b, h, L)`` float32;
states ``(b, h, c, p, n)`` in ``state_dtype``; ``C B^T`` ``(b, c, g, Q, Q)``; ``L`` padded to a multiple of the chunk
by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import ssd_common as cm
from . import ssd_mosaic_gpu

try:  # Triton compiler parameters select the Triton lowering for plain pallas_call (not Mosaic GPU).
    from jax.experimental.pallas import triton as pltriton

    _TritonParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
except ImportError:  # pragma: no cover - very old / stripped jax
    pltriton = None
    _TritonParams = None


def _params(cfg, which):
    if _TritonParams is None or cfg.interpret:
        return None
    warps, stages = cfg.launch_for(which)
    return _TritonParams(num_warps=warps, num_stages=stages)


def _call(kernel, cfg, which, **kw):
    return pl.pallas_call(kernel, interpret=cfg.interpret, compiler_params=_params(cfg, which), **kw)


def _col(v):
    return v[:, None]


def _row(v):
    return v[None, :]


def _flat(v):
    return v.reshape(v.shape[0])


# -------------------------------------------------------------------------------------------------
# sequential state pass (forward: entering states; backward: state gradients, in reverse)
# -------------------------------------------------------------------------------------------------


def _rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, rows, cs_last, doc_last, backward, dots):
    """Rows ``r0 ... r0 + rows`` of one chunk: their share of its local state, forward ``(x o w o d)^T B``,
    backward ``(dy o e)^T C`` (``X = x`` or ``dy``, ``M = B`` or ``C``; ``doc_ref`` None without documents)."""
    cs = _col(cs_ref[pl.ds(r0, rows)])
    doc = None if doc_ref is None else _col(doc_ref[pl.ds(r0, rows)])
    if backward:
        coef = cm.decay_from_start(cs, doc)
    else:
        coef = _col(w_ref[pl.ds(r0, rows)]) * cm.decay_to_end(cs, cs_last, doc, doc_last)
    return cm.chunk_state(X_ref[pl.ds(r0, rows), :], coef, M_ref[pl.ds(r0, rows), :],
                          dots["bstate" if backward else "state"])


def _scan_kernel(*refs, Q, nc, backward, fused, has_doc, has_init, clip, dots, acc, sub, run=0):
    it = iter(refs)
    if fused:
        X_ref, M_ref, cs_ref = next(it), next(it), next(it)
        w_ref = None if backward else next(it)
        doc_ref = next(it) if has_doc else None
    else:
        S_ref = next(it)
        g_ref = next(it)
    init_ref = next(it) if has_init else None
    if clip:
        mn_ref = next(it)
        if backward:
            scale_in_ref, hout_ref = next(it), next(it)
    states_ref, final_ref = next(it), next(it)
    aux_ref = next(it) if clip else None  # forward: clip scales; backward: max_norm gradient parts

    shape = final_ref.shape
    carry0 = init_ref[...].astype(acc) if has_init else jnp.zeros(shape, acc)
    lo, n_run = 0, nc  # the chunks [lo, lo + n_run) this program scans
    if run:  # segments: a run of `run` chunks from a zero state (the initial state enters the first run only)
        seg = pl.program_id(3).astype(jax.dtypes.canonicalize_dtype(jnp.int64))  # the default int (as in fused)
        lo = seg * run
        n_run = jnp.minimum(run, nc - lo)
        if has_init:
            carry0 = jnp.where(seg == (pl.num_programs(3) - 1 if backward else 0), carry0, 0.0).astype(acc)

    def part(r0, rows, cs_last, doc_last):
        return _rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, rows, cs_last, doc_last, backward, dots)

    def chunk_ends(c):  # the last position's cumulative log-decay (and document) of chunk c
        last = c * Q + Q - 1
        return cs_ref[last], (doc_ref[last] if has_doc else None)

    if fused and not clip:
        # One loop over every (chunk, row step): the state is the matmul accumulator. At a chunk's first step the
        # state entering it is stored (masked store: no branch) and scaled by the chunk's decay, then each step
        # adds its rows' share: Triton pipelines the loads across chunk boundaries (measured: 0.091 vs 0.106 ms
        # forward, 0.121 vs 0.130 backward at b8 x L4096 on an H200, against a loop over chunks around a loop over
        # row steps, which state_norm's per-chunk clip still uses).
        steps = Q // sub

        def step(k, state):
            kk = cm.idiv(k, steps)
            r = k - kk * steps
            c = lo + n_run - 1 - kk if backward else lo + kk
            first = r == 0
            pltriton.store(states_ref.at[c], state.astype(states_ref.dtype), mask=jnp.broadcast_to(first, shape))
            cs_last, doc_last = chunk_ends(c)
            state = jnp.where(first, cm.chunk_decay(cs_last, doc_last), 1.0).astype(acc) * state
            return state + part(c * Q + r * sub, sub, cs_last, doc_last)

        final_ref[...] = lax.fori_loop(0, n_run * steps, step, carry0).astype(final_ref.dtype)
        return

    def local_state(c):
        if not fused:
            return S_ref[c].astype(acc), g_ref[c].astype(acc)
        q0 = c * Q
        cs_last, doc_last = chunk_ends(c)
        if sub >= Q:
            S = part(q0, Q, cs_last, doc_last)
        else:
            S = lax.fori_loop(1, Q // sub, lambda r, S: S + part(q0 + r * sub, sub, cs_last, doc_last),
                              part(q0, sub, cs_last, doc_last))
        return S, cm.chunk_decay(cs_last, doc_last)

    def body(k, carry):
        c = nc - 1 - k if backward else k
        S, g = local_state(c)
        if backward:
            if clip:
                carry, dm = cm.clip_backward(carry, scale_in_ref[c], hout_ref[c].astype(acc))
                aux_ref[c] = jnp.sum(dm)
            states_ref[c] = carry.astype(states_ref.dtype)
            return g * carry + S
        states_ref[c] = carry.astype(states_ref.dtype)
        new = g * carry + S
        if clip:
            scale = cm.clip_scale(new, mn_ref[...])
            aux_ref[c] = jnp.sum(scale)
            new = new * scale
        return new

    final_ref[...] = lax.fori_loop(0, nc, body, carry0).astype(final_ref.dtype)


def _chunk_states_kernel(X_ref, M_ref, cs_ref, *refs, Q, sub, backward, has_doc, dots, acc):
    it = iter(refs)
    w_ref = None if backward else next(it)
    doc_ref = next(it) if has_doc else None
    S_ref = next(it)
    cs_last = cs_ref[Q - 1]
    doc_last = doc_ref[Q - 1] if has_doc else None

    def part(r0):
        return _rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, sub, cs_last, doc_last, backward, dots)

    # Row steps in a loop (loads pipelined) rather than the whole chunk's operands at once.
    S = part(0) if sub >= Q else lax.fori_loop(1, Q // sub, lambda r, S: S + part(r * sub), part(0))
    S_ref[...] = S.astype(S_ref.dtype)


def state_scan(cfg, X, M, cs, w, doc, init, *, backward, max_norm=None, scale_in=None, hout=None,
               join_later=False):
    """Sequential pass over chunks.

    Forward (``backward=False``): ``X = x``, ``M = B``; returns the states entering each chunk
    ``(b, h, c, p, n)``, the final state and (with ``max_norm``) the clip scales ``(b, h, c)``.
    Backward: ``X = dy``, ``M = C``, ``init = dfinal``; returns the gradients of the states leaving each
    chunk (after the clip's backward), the gradient of the initial state and (with ``max_norm``) the
    max_norm gradient parts ``(b, h, c)``.
    With ``join_later`` it returns ``(states, final, clip scales or None, join or None)``: with the ``"segments"``
    variant the states are then the runs' local ones and ``join = (entering, decay, run)`` (:func:`run_entering`)
    completes them: the output kernel adds it to the states it loads, so that a forward pass alone does not go
    through the states twice.
    """
    b, L, h, p = X.shape
    g, n = M.shape[2], M.shape[3]
    k = h // g
    Q = cfg.chunk
    nc = L // Q
    acc = cfg.acc
    clip = max_norm is not None
    has_doc = doc is not None
    has_init = init is not None
    variant = "split" if (clip and cfg.state_variant == "segments") else cfg.state_variant
    fused = variant != "split"
    bp = p if clip else min(p, cfg.state_rows)
    npb = p // bp
    run = segment_run(nc, b * h * npb, cfg.scan_programs) if variant == "segments" else 0
    run = run if run < nc else 0  # one run: the plain fused scan
    nseg = -(-nc // run) if run else 1
    grid = (h, npb, b, nseg) if run else (h, npb, b)

    out_shape = [
        jax.ShapeDtypeStruct((b, h, nc, p, n), acc if (clip or cfg.state_dtype is None) else cfg.state_dtype),
        jax.ShapeDtypeStruct((b, h, nseg, p, n) if run else (b, h, p, n), acc),
    ]
    out_specs = [
        pl.BlockSpec((None, None, nc, bp, n), lambda hh, pb, bb, *s: (bb, hh, 0, pb, 0)),
        pl.BlockSpec((None, None, None, bp, n), lambda hh, pb, bb, s: (bb, hh, s, pb, 0)) if run else
        pl.BlockSpec((None, None, bp, n), lambda hh, pb, bb: (bb, hh, pb, 0)),
    ]
    if clip:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc), acc))
        out_specs.append(pl.BlockSpec((None, None, nc), lambda hh, pb, bb: (bb, hh, 0)))

    ins, in_specs = [], []
    if fused:
        ins += [X, M, cs]
        in_specs += [
            pl.BlockSpec((None, L, None, bp), lambda hh, pb, bb, *s: (bb, 0, hh, pb)),
            pl.BlockSpec((None, L, None, n), lambda hh, pb, bb, *s: (bb, 0, cm.idiv(hh, k), 0)),
            pl.BlockSpec((None, None, L), lambda hh, pb, bb, *s: (bb, hh, 0)),
        ]
        if not backward:
            ins.append(w)
            in_specs.append(pl.BlockSpec((None, None, L), lambda hh, pb, bb, *s: (bb, hh, 0)))
        if has_doc:
            ins.append(doc)
            in_specs.append(pl.BlockSpec((None, L), lambda hh, pb, bb, *s: (bb, 0)))
    else:
        S = chunk_states(cfg, X, M, cs, w, doc, backward=backward)
        gdec = chunk_decays(cs, doc, Q)
        ins += [S, gdec]
        in_specs += [
            pl.BlockSpec((None, None, nc, bp, n), lambda hh, pb, bb, *s: (bb, hh, 0, pb, 0)),
            pl.BlockSpec((None, None, nc), lambda hh, pb, bb, *s: (bb, hh, 0)),
        ]
    if has_init:
        ins.append(init)
        in_specs.append(pl.BlockSpec((None, None, bp, n), lambda hh, pb, bb, *s: (bb, hh, pb, 0)))
    if clip:
        ins.append(max_norm.astype(acc))
        in_specs.append(pl.BlockSpec((None,), lambda hh, pb, bb, *s: (hh,)))
        if backward:
            ins += [scale_in, hout]
            in_specs += [
                pl.BlockSpec((None, None, nc), lambda hh, pb, bb, *s: (bb, hh, 0)),
                pl.BlockSpec((None, None, nc, bp, n), lambda hh, pb, bb, *s: (bb, hh, 0, pb, 0)),
            ]

    kernel = functools.partial(
        _scan_kernel, Q=Q, nc=nc, backward=backward, fused=fused, has_doc=has_doc, has_init=has_init, clip=clip,
        dots=cfg.dots(), acc=acc, sub=min(cfg.scan_block, Q), run=run,
    )
    outs = _call(kernel, cfg, "scan", grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                 name="ssd_state_scan_bwd" if backward else "ssd_state_scan")(*ins)
    join = None
    if run:
        entering, decay, final = run_entering(outs[1], chunk_decays(cs, doc, Q), run, backward=backward)
        join = (entering, decay, run)
        outs = [outs[0] if join_later else add_entering(outs[0], *join), final]
    if join_later:
        return outs[0], outs[1], (outs[2] if clip else None), join
    return outs


MAX_RUNS = 64  # runs per sequence of the "segments" scan (their join costs runs^2 state-sized products)


def segment_run(nc: int, programs: int, wanted: int) -> int:
    """Chunks per run of the ``"segments"`` state scan: runs short enough for ``wanted`` programs in all (each of
    the ``programs`` (head, row block, batch) scans ``nc / run`` runs side by side), at least one chunk, at most
    ``MAX_RUNS`` runs."""
    runs = max(1, min(nc, MAX_RUNS, -(-wanted // programs)))
    return -(-nc // runs)


def run_entering(finals, gdec, run: int, *, backward: bool):
    """What the ``"segments"`` scan's runs lacked: the true state entering each run and the decay from a run's start
    to each chunk.

    ``finals (b, h, nseg, p, n)``: each run's last carried state (from a zero state; the initial state in the first
    run only); ``gdec (b, h, nc)``: the decay over each chunk. The state entering run ``s`` is
    ``E_s = sum_{j<s} (prod_{j<i<s} G_i) F_j`` with ``G_i`` the decay over run ``i``: one small matrix product over
    the runs. Backward (state gradients, runs scanned in reverse) is the same recurrence with the runs and chunks
    reversed. Returns ``(entering (b, h, nseg, p, n), decay (b, h, nc), final (b, h, p, n))``; a chunk's true state
    is its run-local state plus ``decay * entering`` of its run (:func:`add_entering`, or inside the output kernel).
    """
    b, h, nc = gdec.shape
    nseg = finals.shape[2]
    acc = finals.dtype
    pad = nseg * run - nc  # chunks past the end (decay 1) fill the last run
    log_g = jnp.log(jnp.pad(gdec.astype(acc), ((0, 0), (0, 0), (0, pad)), constant_values=1.0))
    log_g = log_g.reshape(b, h, nseg, run)  # (b, h, runs, chunks per run)
    if backward:  # the scan's order (only these small arrays are reversed)
        log_g = log_g[:, :, ::-1, ::-1]
    # log decay from a run's start to each of its chunks (exclusive cumulative sum; -inf after a document change)
    into = jnp.concatenate([jnp.zeros_like(log_g[..., :1]), jnp.cumsum(log_g[..., :-1], axis=-1)], axis=-1)
    total = jnp.sum(log_g, axis=-1)  # (b, h, runs)
    i = jnp.arange(nseg)
    # exponent[t, j] = sum_{j < i <= t} total_i: the decay from the end of run j to the end of run t
    exponent = jnp.cumsum(jnp.where(i[:, None] > i[None, :], total[..., :, None], 0.0), axis=-2)
    weights = jnp.where(i[None, :] <= i[:, None], jnp.exp(exponent), 0.0)  # (b, h, runs t, runs j)
    if backward:  # back to the sequence's order
        into, weights = into[:, :, ::-1, ::-1], weights[:, :, ::-1, ::-1]
    # states leaving each run: an exact float32 sum over the runs (a few; an XLA dot of this shape was slower)
    leaving = jnp.sum(weights[..., None, None] * finals[:, :, None], axis=3)  # (b, h, runs, p, n)
    zero = jnp.zeros_like(leaving[:, :, :1])
    if backward:
        entering, final = jnp.concatenate([leaving[:, :, 1:], zero], axis=2), leaving[:, :, 0]
    else:
        entering, final = jnp.concatenate([zero, leaving[:, :, :-1]], axis=2), leaving[:, :, -1]
    return entering, jnp.exp(into).reshape(b, h, nseg * run)[:, :, :nc], final


def add_entering(local, entering, decay, run: int):
    """True chunk states ``(b, h, nc, p, n)`` from the run-local ones and :func:`run_entering`'s results."""
    nc = local.shape[2]
    entering = jnp.repeat(entering.astype(decay.dtype), run, axis=2)[:, :, :nc]  # (b, h, nc, p, n)
    return (local.astype(decay.dtype) + decay[..., None, None] * entering).astype(local.dtype)


def chunk_states(cfg, X, M, cs, w, doc, *, backward):
    """Fully parallel local chunk states ``(b, h, c, p, n)`` (the ``"split"`` variant's first kernel)."""
    b, L, h, p = X.shape
    g, n = M.shape[2], M.shape[3]
    k = h // g
    Q = cfg.chunk
    nc = L // Q
    ins = [X, M, cs]
    in_specs = [
        pl.BlockSpec((None, Q, None, p), lambda hh, c, bb: (bb, c, hh, 0)),
        pl.BlockSpec((None, Q, None, n), lambda hh, c, bb: (bb, c, cm.idiv(hh, k), 0)),
        pl.BlockSpec((None, None, Q), lambda hh, c, bb: (bb, hh, c)),
    ]
    if not backward:
        ins.append(w)
        in_specs.append(pl.BlockSpec((None, None, Q), lambda hh, c, bb: (bb, hh, c)))
    if doc is not None:
        ins.append(doc)
        in_specs.append(pl.BlockSpec((None, Q), lambda hh, c, bb: (bb, c)))
    kernel = functools.partial(_chunk_states_kernel, Q=Q, sub=min(cfg.scan_block, Q), backward=backward,
                               has_doc=doc is not None, dots=cfg.dots(), acc=cfg.acc)
    return _call(
        kernel, cfg, "chunk_states", grid=(h, nc, b), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, p, n), lambda hh, c, bb: (bb, hh, c, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nc, p, n), cfg.acc), name="ssd_chunk_states",
    )(*ins)


def chunk_decays(cs, doc, Q):
    """``g`` per chunk ``(b, h, c)``: the decay over the whole chunk, 0 if it contains a document change."""
    b, h, L = cs.shape
    last = cs.reshape(b, h, L // Q, Q)[..., -1]
    d_last = None if doc is None else doc.reshape(b, 1, L // Q, Q)[..., -1]
    return cm.chunk_decay(last, d_last)


# -------------------------------------------------------------------------------------------------
# per-position scalars in the kernels' layout: dt and the in-chunk cumulative log-decays, (b, h, L)
# -------------------------------------------------------------------------------------------------


def _chunk_scalars_kernel(dt_ref, la_ref, w_ref, cs_ref):
    w_ref[...] = dt_ref[...].T  # (Q, HB) -> (HB, Q)
    cs_ref[...] = jnp.cumsum(la_ref[...], axis=0).T


def _chunk_scalars_call(cfg, dt_in, log_a):
    b, L, h = dt_in.shape
    Q = cfg.chunk
    HB = h & -h  # the largest power of two dividing h (Triton block dims are powers of two)
    while HB > 32:
        HB //= 2
    spec_in = pl.BlockSpec((None, Q, HB), lambda hb, c, bb: (bb, c, hb))
    spec_out = pl.BlockSpec((None, HB, Q), lambda hb, c, bb: (bb, hb, c))
    out = jax.ShapeDtypeStruct((b, h, L), dt_in.dtype)
    return _call(_chunk_scalars_kernel, cfg, "scalars", grid=(h // HB, L // Q, b), in_specs=[spec_in, spec_in],
                 out_specs=[spec_out, spec_out], out_shape=[out, out], name="ssd_chunk_scalars")(dt_in, log_a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_scalars(cfg, dt_in, log_a):
    """``(w, cs)``, both ``(b, h, L)``: ``w = dt_in`` and ``cs`` the in-chunk inclusive cumulative sum of ``log_a``,
    from ``(b, L, h)`` inputs (``L`` a multiple of the chunk) in one kernel (XLA needs two fusions for the
    transposes and the cumulative sum, 13 us at b8 x L4096 on an H200). The backward pass (transposes and a
    reversed in-chunk cumulative sum) stays in XLA."""
    return _chunk_scalars_call(cfg, dt_in, log_a)


def _chunk_scalars_fwd(cfg, dt_in, log_a):
    return _chunk_scalars_call(cfg, dt_in, log_a), None


def _chunk_scalars_bwd(cfg, _, cts):
    dw, dcs = cts  # (b, h, L)
    b, h, L = dcs.shape
    per_chunk = dcs.reshape(b, h, L // cfg.chunk, cfg.chunk)
    dla = jnp.flip(jnp.cumsum(jnp.flip(per_chunk, -1), -1), -1).reshape(b, h, L)
    return jnp.swapaxes(dw, 1, 2), jnp.swapaxes(dla, 1, 2)


chunk_scalars.defvjp(_chunk_scalars_fwd, _chunk_scalars_bwd)


# -------------------------------------------------------------------------------------------------
# C B^T once per (group, chunk) for every head of the group (read by the kernels named in cfg.cb_readers)
# -------------------------------------------------------------------------------------------------


def _chunk_cb_kernel(C_ref, B_ref, cb_ref, *, dots):
    cb_ref[...] = cm.mm(C_ref[...], B_ref[...], cm.NT, dots["cb"]).astype(cb_ref.dtype)


def chunk_cb(cfg, B, C, dtype):
    """``C_t . B_s`` of every position pair of a chunk, ``(b, c, g, Q, Q)`` in ``dtype``.

    One program per (group, row block of ``BT`` rows, chunk, batch) writes the ``(BT, Q)`` panel of its rows
    (the part above the diagonal is masked by every consumer, but written: finite values). With ``G`` groups
    and ``h`` heads this is ``h / G`` times less work than each head program computing its own ``C B^T``.
    """
    b, L, g, n = B.shape
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    kernel = functools.partial(_chunk_cb_kernel, dots=cfg.dots())
    return _call(
        kernel, cfg, "cb", grid=(g, nb, nc, b),
        in_specs=[pl.BlockSpec((None, BT, None, n), lambda gg, i, c, bb: (bb, c * nb + i, gg, 0)),
                  pl.BlockSpec((None, Q, None, n), lambda gg, i, c, bb: (bb, c, gg, 0))],
        out_specs=pl.BlockSpec((None, None, None, BT, Q), lambda gg, i, c, bb: (bb, c, gg, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nc, g, Q, Q), dtype), name="ssd_chunk_cb",
    )(C, B)


# -------------------------------------------------------------------------------------------------
# BlockSpecs of the kernels on the grid (head block, block inside the chunk, chunk, batch)
# -------------------------------------------------------------------------------------------------


class _ChunkSpecs:
    """The input BlockSpecs shared by the intra-chunk kernels: grid ``(hb, ..., c, bb)`` = (head block of ``HB``
    heads, blocks inside the chunk (one or two grid axes), chunk, batch); ``group(hb)`` is the B/C group the head
    block reads. Each method returns the spec of one kind of operand, whole chunk ``c``."""

    def __init__(self, Q: int, HB: int, p: int, n: int, group):
        self.Q, self.HB, self.p, self.n, self.group = Q, HB, p, n, group

    def heads(self):  # x, dy: (b, L, h, p)
        return pl.BlockSpec((None, self.Q, self.HB, self.p), lambda hb, *r: (r[-1], r[-2], hb, 0))

    def bc(self):  # B, C: (b, L, g, n)
        return pl.BlockSpec((None, self.Q, None, self.n), lambda hb, *r: (r[-1], r[-2], self.group(hb), 0))

    def scalars(self):  # cs, w: (b, h, L)
        return pl.BlockSpec((None, self.HB, self.Q), lambda hb, *r: (r[-1], hb, r[-2]))

    def states(self):  # (b, h, c, p, n)
        return pl.BlockSpec((None, self.HB, None, self.p, self.n), lambda hb, *r: (r[-1], hb, r[-2], 0, 0))

    def doc(self):  # (b, L)
        return pl.BlockSpec((None, self.Q), lambda hb, *r: (r[-1], r[-2]))

    def per_head(self):  # D: (h,)
        return pl.BlockSpec((self.HB,), lambda hb, *r: (hb,))

    def cb(self):  # (b, c, g, Q, Q) from chunk_cb
        return pl.BlockSpec((None, None, None, self.Q, self.Q), lambda hb, *r: (r[-1], r[-2], self.group(hb), 0, 0))


def _cb_block(cb_ref, Ci, B_ref, t0, s0, BT, dots, acc):
    """The ``(BT, BT)`` block of ``C B^T`` at rows ``t0`` and columns ``s0`` of the chunk: read from the
    precomputed ``cb_ref`` when there is one (in ``acc``, or its storage dtype for ``acc=None``), else computed
    from ``Ci`` (the row block of C) and ``B_ref``."""
    if cb_ref is not None:
        blk = cb_ref[pl.ds(t0, BT), pl.ds(s0, BT)]
        return blk if acc is None else blk.astype(acc)
    return cm.mm(Ci, B_ref[pl.ds(s0, BT), :], cm.NT, dots["cb"])


# -------------------------------------------------------------------------------------------------
# forward output
# -------------------------------------------------------------------------------------------------


def _output_kernel(*refs, Q, BT, HB, has_doc, has_D, has_cb, has_join, dots, acc):
    it = iter(refs)
    x_ref, C_ref, BorCB_ref, cs_ref, w_ref, st_ref = (next(it) for _ in range(6))
    B_ref, cb_ref = (None, BorCB_ref) if has_cb else (BorCB_ref, None)
    ent_ref, dec_ref = (next(it), next(it)) if has_join else (None, None)
    doc_ref = next(it) if has_doc else None
    D_ref = next(it) if has_D else None
    y_ref = next(it)

    def state(hh):  # the state entering the chunk (a "segments" scan's run-local state + decay * its run's)
        if not has_join:
            return st_ref[hh]
        return st_ref[hh].astype(acc) + dec_ref[hh, pl.program_id(2)] * ent_ref[hh]

    i = pl.program_id(1)  # row block
    t0 = i * BT
    Ci = C_ref[pl.ds(t0, BT), :]
    doc_t = _col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
    cs_t = [_col(cs_ref[hh, pl.ds(t0, BT)]) for hh in range(HB)]
    x_t = [x_ref[pl.ds(t0, BT), hh, :] for hh in range(HB)]  # the row block's own inputs (diagonal block, D x)
    # Source blocks before the row block: exp(cs_t - cs_s) = a_t b_s around c_ref = cs just before the row block
    # (0 at the chunk start); the carried state's decay exp(cs_t) = a_t exp(c_ref). Both are summed unscaled,
    # then multiplied by a_t once.
    c_ref = [jnp.where(i > 0, cs_ref[hh, jnp.maximum(t0 - 1, 0)], 0.0).astype(acc) for hh in range(HB)]

    # The diagonal block first, with the exact masked exponentials: its loads are issued before the state term and
    # the loop (measured: 0.242 vs 0.273 ms at b8 x L4096 on an H200 with the diagonal block last).
    CB = _cb_block(cb_ref, Ci, B_ref, t0, t0, BT, dots, acc)
    mask = cm.intra_mask(t0, t0, BT, BT, doc_t, _row(doc_ref[pl.ds(t0, BT)]) if has_doc else None)
    diag = []
    for hh in range(HB):
        L = cm.intra_decay(cs_t[hh], _row(cs_ref[hh, pl.ds(t0, BT)]), mask)
        diag.append(cm.intra_output(CB, L, _row(w_ref[hh, pl.ds(t0, BT)]), x_t[hh], dots['out_intra']))

    def below(j, accs):
        s0 = j * BT
        CB = cm.same_document(_cb_block(cb_ref, Ci, B_ref, t0, s0, BT, dots, None), doc_t,
                              _row(doc_ref[pl.ds(s0, BT)]) if has_doc else None)
        new = []
        for hh in range(HB):
            _, b_s = cm.split_decay(None, _col(cs_ref[hh, pl.ds(s0, BT)]), c_ref[hh])
            bw = b_s * _col(w_ref[hh, pl.ds(s0, BT)])
            new.append(accs[hh] + cm.intra_output_below(CB, bw, x_ref[pl.ds(s0, BT), hh, :], dots['out_intra']))
        return tuple(new)

    accs = tuple(
        cm.off_output(Ci, state(hh), cm.decay_from_start(jnp.broadcast_to(c_ref[hh], cs_t[hh].shape), doc_t),
                      dots['out_off'])
        for hh in range(HB)
    )
    accs = lax.fori_loop(0, i, below, accs)
    for hh in range(HB):
        y = diag[hh] + jnp.exp(cs_t[hh] - c_ref[hh]) * accs[hh]  # a_t, then the diagonal block
        if has_D:
            y = y + D_ref[hh].astype(acc) * x_t[hh].astype(acc)
        y_ref[:, hh, :] = y.astype(y_ref.dtype)


def output(cfg, x, B, C, cs, w, states, doc, D, out_dtype, cb=None, join=None):
    """``y`` of every chunk from its entering state; ``cb`` is ``chunk_cb``'s output or None (computed inline);
    ``join``: ``(entering, decay, run)`` of a ``"segments"`` scan whose run-local ``states`` these are."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    HB = cfg.heads_for(k)
    grid = (h // HB, nb, nc, b)
    spec = _ChunkSpecs(Q, HB, p, n, lambda hb: cm.idiv(hb * HB, k))
    ins = [x, C, B if cb is None else cb, cs, w, states]
    in_specs = [spec.heads(), spec.bc(), spec.bc() if cb is None else spec.cb(), spec.scalars(), spec.scalars(),
                spec.states()]
    if join is not None:
        entering, decay, run = join
        ins += [entering, decay]
        in_specs += [pl.BlockSpec((None, HB, None, p, n), lambda hb, i, c, bb: (bb, hb, cm.idiv(c, run), 0, 0)),
                     pl.BlockSpec((None, HB, nc), lambda hb, i, c, bb: (bb, hb, 0))]
    if doc is not None:
        ins.append(doc)
        in_specs.append(spec.doc())
    if D is not None:
        ins.append(D)
        in_specs.append(spec.per_head())
    kernel = functools.partial(
        _output_kernel, Q=Q, BT=BT, HB=HB, has_doc=doc is not None, has_D=D is not None, has_cb=cb is not None,
        has_join=join is not None, dots=cfg.dots(), acc=cfg.acc,
    )
    return _call(
        kernel, cfg, "out", grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec((None, BT, HB, p), lambda hb, i, c, bb: (bb, c * nb + i, hb, 0)),
        out_shape=jax.ShapeDtypeStruct((b, L, h, p), out_dtype), name="ssd_output",
    )(*ins)


# -------------------------------------------------------------------------------------------------
# backward
# -------------------------------------------------------------------------------------------------


def _bwd_cols_kernel(*refs, Q, BT, HB, nb, has_doc, has_D, has_cb, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, C_ref, B_ref, cs_ref, w_ref, G_ref = (next(it) for _ in range(7))
    cb_ref = next(it) if has_cb else None
    doc_ref = next(it) if has_doc else None
    D_ref = next(it) if has_D else None
    dx_ref, dw_ref, V_ref = next(it), next(it), next(it)
    dD_ref = next(it) if has_D else None

    j = pl.program_id(1)
    s0 = j * BT
    Bj = B_ref[pl.ds(s0, BT), :]
    doc_s = doc_ref[pl.ds(s0, BT)] if has_doc else None
    doc_last = doc_ref[Q - 1] if has_doc else None
    cs_s = [cs_ref[hh, pl.ds(s0, BT)] for hh in range(HB)]
    w_s = [_col(w_ref[hh, pl.ds(s0, BT)]) for hh in range(HB)]
    accs = []
    for hh in range(HB):
        d = cm.decay_to_end(_col(cs_s[hh]), cs_ref[hh, Q - 1], None if doc_s is None else _col(doc_s), doc_last)
        draw, V = cm.state_grad_terms(Bj, G_ref[hh], d, w_s[hh], x_ref[pl.ds(s0, BT), hh, :], dots['dx_state'])
        V_ref[hh, :] = _flat(V)
        accs.append(draw)
    doc_s_row = None if doc_s is None else _row(doc_s)

    def cb_block(t0, dtype):
        if cb_ref is None:
            return cm.mm(C_ref[pl.ds(t0, BT), :], Bj, cm.NT, dots['cb'])
        blk = cb_ref[pl.ds(t0, BT), pl.ds(s0, BT)]
        return blk if dtype is None else blk.astype(dtype)

    # The diagonal block exactly; the row blocks below it through exp(cs_t - cs_s) = a_t b_s around c_ref = cs
    # at the end of this source block (cm.split_decay): their sum is scaled by b_s once at the end.
    CB = cb_block(s0, acc)
    mask = cm.intra_mask(s0, s0, BT, BT, None if doc_s is None else _col(doc_s), doc_s_row)
    for hh in range(HB):
        L = cm.intra_decay(_col(cs_s[hh]), _row(cs_s[hh]), mask)
        accs[hh] = accs[hh] + cm.intra_input_grad(CB, L, dy_ref[pl.ds(s0, BT), hh, :], dots['dx_intra'])
    c_ref = [cs_ref[hh, s0 + BT - 1] for hh in range(HB)]

    def below(i, lows):
        t0 = i * BT
        doc_t = _col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
        CB = cm.same_document(cb_block(t0, None), doc_t, doc_s_row)
        new = []
        for hh in range(HB):
            a_t, _ = cm.split_decay(_col(cs_ref[hh, pl.ds(t0, BT)]), None, c_ref[hh])
            new.append(lows[hh] + cm.intra_input_grad_below(CB, dy_ref[pl.ds(t0, BT), hh, :], a_t, dots['dx_intra']))
        return tuple(new)

    lows = lax.fori_loop(j + 1, nb, below, tuple(jnp.zeros_like(a) for a in accs))
    for hh in range(HB):
        xs = x_ref[pl.ds(s0, BT), hh, :].astype(acc)
        _, b_s = cm.split_decay(None, _col(cs_s[hh]), c_ref[hh])
        draw = accs[hh] + b_s * lows[hh]
        dx = w_s[hh] * draw
        if has_D:
            dys = dy_ref[pl.ds(s0, BT), hh, :].astype(acc)
            dx = dx + D_ref[hh].astype(acc) * dys
            dD_ref[hh] = jnp.sum(dys * xs)
        dx_ref[:, hh, :] = dx.astype(dx_ref.dtype)
        dw_ref[hh, :] = jnp.sum(xs * draw, axis=1)


def bwd_cols(cfg, x, dy, B, C, cs, w, Gs, doc, D, cb=None):
    """``dx``, ``dw`` and the state terms ``V`` per source block; ``cb`` from ``chunk_cb`` or None (inline)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    HB = cfg.heads_for(k, cfg.cols_heads_per_block)
    spec = _ChunkSpecs(Q, HB, p, n, lambda hb: cm.idiv(hb * HB, k))
    ins = [x, dy, C, B, cs, w, Gs]
    in_specs = [spec.heads(), spec.heads(), spec.bc(), spec.bc(), spec.scalars(), spec.scalars(), spec.states()]
    if cb is not None:
        ins.append(cb)
        in_specs.append(spec.cb())
    if doc is not None:
        ins.append(doc)
        in_specs.append(spec.doc())
    if D is not None:
        ins.append(D)
        in_specs.append(spec.per_head())
    vec = lambda: pl.BlockSpec((None, HB, BT), lambda hb, j, c, bb: (bb, hb, c * nb + j))
    out_shape = [
        jax.ShapeDtypeStruct((b, L, h, p), x.dtype),
        jax.ShapeDtypeStruct((b, h, L), cfg.acc),
        jax.ShapeDtypeStruct((b, h, L), cfg.acc),
    ]
    out_specs = [pl.BlockSpec((None, BT, HB, p), lambda hb, j, c, bb: (bb, c * nb + j, hb, 0)), vec(), vec()]
    if D is not None:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc * nb), cfg.acc))
        out_specs.append(pl.BlockSpec((None, HB, None), lambda hb, j, c, bb: (bb, hb, c * nb + j)))
    kernel = functools.partial(
        _bwd_cols_kernel, Q=Q, BT=BT, HB=HB, nb=nb, has_doc=doc is not None, has_D=D is not None,
        has_cb=cb is not None, dots=cfg.dots(), acc=cfg.acc,
    )
    return _call(kernel, cfg, "cols", grid=(h // HB, nb, nc, b), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, name="ssd_bwd_cols")(*ins)


def _bwd_pairs_kernel(*refs, BT, k, has_doc, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, C_ref, B_ref, cs_ref, w_ref = (next(it) for _ in range(6))
    doc_ref = next(it) if has_doc else None
    dcb_ref, rowZ_ref, colZ_ref = next(it), next(it), next(it)

    i, j = pl.program_id(1), pl.program_id(2)
    t0, s0 = i * BT, j * BT

    def pair(causal):
        CB = cm.mm(C_ref[pl.ds(t0, BT), :], B_ref[pl.ds(s0, BT), :], cm.NT, dots['cb'])
        doc_t = _col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
        doc_s = _row(doc_ref[pl.ds(s0, BT)]) if has_doc else None
        mask = cm.intra_mask(t0, s0, BT, BT, doc_t, doc_s) if causal else None

        def head(hh, dCB):
            cs_t, cs_s = _col(cs_ref[hh, pl.ds(t0, BT)]), _row(cs_ref[hh, pl.ds(s0, BT)])
            if causal:
                L = cm.intra_decay(cs_t, cs_s, mask)
            else:  # below the diagonal: an outer product of factors around cs at the end of the source block
                a_t, b_s = cm.split_decay(cs_t, cs_s, cs_ref[hh, s0 + BT - 1])
                L = cm.same_document(a_t * b_s, doc_t, doc_s)
            dcb, rowZ, colZ = cm.intra_pair_terms(CB, L, _row(w_ref[hh, pl.ds(s0, BT)]), dy_ref[pl.ds(t0, BT), hh, :],
                                                  x_ref[pl.ds(s0, BT), hh, :], dots['dxx'])
            rowZ_ref[hh, :] = _flat(rowZ)
            colZ_ref[hh, :] = colZ[0]
            return dCB + dcb

        dcb_ref[...] = lax.fori_loop(0, k, head, jnp.zeros((BT, BT), acc)).astype(dcb_ref.dtype)

    pl.when(j < i)(lambda: pair(causal=False))
    pl.when(j == i)(lambda: pair(causal=True))

    @pl.when(j > i)
    def _():
        dcb_ref[...] = jnp.zeros(dcb_ref.shape, dcb_ref.dtype)
        for hh in range(k):  # one head row at a time: k need not be a power of two (Triton block shapes)
            rowZ_ref[hh, :] = jnp.zeros(rowZ_ref.shape[1:], rowZ_ref.dtype)
            colZ_ref[hh, :] = jnp.zeros(colZ_ref.shape[1:], colZ_ref.dtype)


def bwd_pairs(cfg, x, dy, B, C, cs, w, doc):
    """The (row block, source block) terms of the backward pass, one program per block pair and head block.

    Returns ``dCB`` (``(b, c, g * nhb, Q, Q)``: ``sum_heads L o w o (dy x^T)`` over each of the ``nhb`` head
    blocks of a group, zero above the block diagonal) and the row and column sums of ``dCB_h o CB`` per head,
    ``rowZ, colZ (b, nb, h, L)``: one slab per source block (rowZ) or row block (colZ), summed by the caller.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    nhb = max(1, cfg.rows_head_blocks)
    while k % nhb:
        nhb -= 1
    kk = k // nhb
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    acc = cfg.acc
    spec = _ChunkSpecs(Q, kk, p, n, lambda gq: cm.idiv(gq, nhb))
    ins = [x, dy, C, B, cs, w]
    in_specs = [spec.heads(), spec.heads(), spec.bc(), spec.bc(), spec.scalars(), spec.scalars()]
    if doc is not None:
        ins.append(doc)
        in_specs.append(spec.doc())
    out_shape = [
        jax.ShapeDtypeStruct((b, nc, g * nhb, Q, Q), acc),
        jax.ShapeDtypeStruct((b, nb, h, L), acc),
        jax.ShapeDtypeStruct((b, nb, h, L), acc),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, BT, BT), lambda gq, i, j, c, bb: (bb, c, gq, i, j)),
        pl.BlockSpec((None, None, kk, BT), lambda gq, i, j, c, bb: (bb, j, gq, c * nb + i)),
        pl.BlockSpec((None, None, kk, BT), lambda gq, i, j, c, bb: (bb, i, gq, c * nb + j)),
    ]
    kernel = functools.partial(_bwd_pairs_kernel, BT=BT, k=kk, has_doc=doc is not None, dots=cfg.dots(), acc=acc)
    return _call(kernel, cfg, "pairs", grid=(g * nhb, nb, nb, nc, b), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, name="ssd_bwd_pairs")(*ins)


def _bwd_group_rows_kernel(*refs, Q, BT, k, nb, nhb, has_doc, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, C_ref, B_ref, cs_ref, w_ref, H_ref, G_ref, dcb_ref = (next(it) for _ in range(9))
    doc_ref = next(it) if has_doc else None
    dC_ref, dB_ref, off_ref, dg_ref = (next(it) for _ in range(4))

    r = pl.program_id(1)
    t0 = r * BT
    Cr = C_ref[pl.ds(t0, BT), :]
    n = Cr.shape[1]
    doc_t = _col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
    doc_last = doc_ref[Q - 1] if has_doc else None

    # The state terms of the block's positions, summed over the heads of the group (a K loop over heads).
    def head_terms(hh, carry):
        dC, dB = carry
        H = H_ref[hh].astype(acc)
        G = G_ref[hh].astype(acc)
        cs_t = _col(cs_ref[hh, pl.ds(t0, BT)])
        e = cm.decay_from_start(cs_t, doc_t)
        d = cm.decay_to_end(cs_t, cs_ref[hh, Q - 1], doc_t, doc_last)
        dC_off, off = cm.off_row_terms(dy_ref[pl.ds(t0, BT), hh, :], H, Cr, e, dots['dc_off'])
        off_ref[hh, :] = _flat(off)
        dB = dB + cm.state_input_grad_B(x_ref[pl.ds(t0, BT), hh, :], _col(w_ref[hh, pl.ds(t0, BT)]) * d, G,
                                        dots['db_state'])
        dg_ref[hh] = jnp.sum(G * H)
        return dC + dC_off, dB

    zeros = jnp.zeros((BT, n), acc)
    dC, dB = lax.fori_loop(0, k, head_terms, (zeros, zeros))

    def dcb_block(ti, si):  # sum of the head blocks' partial dCB at block (ti, si)
        blk = dcb_ref[0, pl.ds(ti * BT, BT), pl.ds(si * BT, BT)]
        for q in range(1, nhb):
            blk = blk + dcb_ref[q, pl.ds(ti * BT, BT), pl.ds(si * BT, BT)]
        return blk

    # dC_t += sum_s dCB[t, s] B_s (this block's row of blocks); dB_s += sum_t dCB[t, s] C_t (its column).
    dC = lax.fori_loop(0, r + 1, lambda j, dC: dC + cm.mm(dcb_block(r, j), B_ref[pl.ds(j * BT, BT), :], cm.NN,
                                                          dots['dcb']), dC)
    dB = lax.fori_loop(r, nb, lambda i, dB: dB + cm.mm(dcb_block(i, r), C_ref[pl.ds(i * BT, BT), :], cm.TN,
                                                       dots['dcb']), dB)
    dC_ref[...] = dC.astype(dC_ref.dtype)
    dB_ref[...] = dB.astype(dB_ref.dtype)


def bwd_group_rows(cfg, x, dy, B, C, cs, w, Hs, Gs, doc, dcb):
    """``dC``, ``dB`` (both ``(b, L, g, n)``, complete) and the per-head ``dy.y_off`` and ``<G, H>`` terms: one
    program per (group and block of ``n / cfg.rows_state_splits`` state columns, row block, chunk, batch) loops
    over the group's heads for the state terms, then adds the intra-chunk terms from ``bwd_pairs``' ``dCB``.
    ``dy.y_off`` and ``<G, H>`` come back as one partial sum per state-column block, ``(b, splits, h, ...)``."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    nhb = dcb.shape[2] // g
    ns = max(1, cfg.rows_state_splits)
    while n % ns or (n // ns) < 16:
        ns -= 1
    nn = n // ns
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    acc = cfg.acc
    grp = lambda gs: cm.idiv(gs, ns)  # noqa: E731 - program axis 0 = group * ns + state-column block
    col = lambda gs: gs - grp(gs) * ns  # noqa: E731
    heads = pl.BlockSpec((None, Q, k, p), lambda gs, r, c, bb: (bb, c, grp(gs), 0))
    bc = pl.BlockSpec((None, Q, None, nn), lambda gs, r, c, bb: (bb, c, grp(gs), col(gs)))
    scal = pl.BlockSpec((None, k, Q), lambda gs, r, c, bb: (bb, grp(gs), c))
    st = pl.BlockSpec((None, k, None, p, nn), lambda gs, r, c, bb: (bb, grp(gs), c, 0, col(gs)))
    ins = [x, dy, C, B, cs, w, Hs, Gs, dcb]
    in_specs = [heads, heads, bc, bc, scal, scal, st, st,
                pl.BlockSpec((None, None, nhb, Q, Q), lambda gs, r, c, bb: (bb, c, grp(gs), 0, 0))]
    if doc is not None:
        ins.append(doc)
        in_specs.append(pl.BlockSpec((None, Q), lambda gs, r, c, bb: (bb, c)))
    out_shape = [
        jax.ShapeDtypeStruct((b, L, g, n), acc),
        jax.ShapeDtypeStruct((b, L, g, n), acc),
        jax.ShapeDtypeStruct((b, ns, h, L), acc),  # dy.y_off (partial over state-column blocks)
        jax.ShapeDtypeStruct((b, ns, h, nc * nb), acc),  # <G, H> (partial; identical in every row block)
    ]
    out_specs = [
        pl.BlockSpec((None, BT, None, nn), lambda gs, r, c, bb: (bb, c * nb + r, grp(gs), col(gs))),
        pl.BlockSpec((None, BT, None, nn), lambda gs, r, c, bb: (bb, c * nb + r, grp(gs), col(gs))),
        pl.BlockSpec((None, None, k, BT), lambda gs, r, c, bb: (bb, col(gs), grp(gs), c * nb + r)),
        pl.BlockSpec((None, None, k, None), lambda gs, r, c, bb: (bb, col(gs), grp(gs), c * nb + r)),
    ]
    kernel = functools.partial(_bwd_group_rows_kernel, Q=Q, BT=BT, k=k, nb=nb, nhb=nhb, has_doc=doc is not None,
                               dots=cfg.dots(), acc=acc)
    return _call(kernel, cfg, "group_rows", grid=(g * ns, nb, nc, b), in_specs=in_specs, out_specs=out_specs,
                 out_shape=out_shape, name="ssd_bwd_group_rows")(*ins)


# -------------------------------------------------------------------------------------------------
# launcher entry points used by ssd_ops
# -------------------------------------------------------------------------------------------------


def _output_kernel_for(cfg, x, B, C, cs, states, doc, out_dtype) -> str:
    """``"mosaic"`` where the config asks for it and ``ssd_mosaic_gpu.output`` supports the call, else ``"triton"``."""
    if cfg.output_kernel != "mosaic" or ssd_mosaic_gpu.unsupported(x, B, C, cs, states, doc, out_dtype, cfg.chunk):
        return "triton"
    return "mosaic"


def forward(cfg, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype):
    """Returns ``(y, final, states, clip_scales, C B^T or None)``."""
    states, final, scales, join = state_scan(cfg, x, B, cs, w, doc, h0, backward=False, max_norm=max_norm,
                                             join_later=True)
    cb = chunk_cb(cfg, B, C, cfg.cb_dtype or cfg.acc) if cfg.cb_readers else None
    # The output kernel reads the runs' entering states in the states' storage dtype (half the loads in bf16;
    # measured with float32 ones: 0.294 vs 0.242 ms for that kernel at b2 x L16384 on an H200).
    join_out = None if join is None else (join[0].astype(states.dtype), *join[1:])
    if join is not None and not cfg.join_in_output:
        states, join, join_out = add_entering(states, *join), None, None
    if _output_kernel_for(cfg, x, B, C, cs, states, doc, out_dtype) == "mosaic":
        cb_out = cb if cb is not None else chunk_cb(cfg, B, C, jnp.bfloat16)
        y = ssd_mosaic_gpu.output(cfg, x, B, C, cs, w, states, doc, D, out_dtype, cb_out.astype(jnp.bfloat16),
                                  join=join_out)
    else:
        y = output(cfg, x, B, C, cs, w, states, doc, D, out_dtype, cb if "out" in cfg.cb_readers else None, join_out)
    if join is not None:  # the true states, for the backward pass (unused, so not computed, in a forward pass)
        states = add_entering(states, *join)
    return y, final, states, scales, cb


def backward(cfg, x, w, cs, B, C, h0, doc, D, max_norm, states, final, scales, dy, dfinal, cb=None):
    """Returns ``(dx, dw, dcs, dB, dC, dh0, dD, dmax_norm)`` in the kernel layouts (see ssd_ops); ``cb`` is the
    forward pass's ``C B^T`` when it was kept (else recomputed here if ``bwd_cols`` reads it)."""
    b, L, h, p = x.shape
    Q, BT = cfg.chunk, cfg.block_t
    nb, nc = Q // BT, L // Q
    hout = None
    if max_norm is not None:
        hout = jnp.concatenate([states[:, :, 1:], final[:, :, None]], axis=2)
    outs = state_scan(cfg, dy, C, cs, w, doc, dfinal, backward=True, max_norm=max_norm, scale_in=scales, hout=hout)
    Gs, dh0 = outs[0], outs[1]
    dm_parts = outs[2] if max_norm is not None else None

    if "cols" not in cfg.cb_readers:
        cb = None
    elif cb is None:
        cb = chunk_cb(cfg, B, C, cfg.cb_dtype or cfg.acc)
    col_outs = bwd_cols(cfg, x, dy, B, C, cs, w, Gs, doc, D, cb)
    dx, dw, V = col_outs[:3]
    dD = None if D is None else jnp.sum(col_outs[3], axis=(0, 2))
    dcb, rowZp, colZp = bwd_pairs(cfg, x, dy, B, C, cs, w, doc)
    dC, dB, off, dg = bwd_group_rows(cfg, x, dy, B, C, cs, w, states, Gs, doc, dcb)
    off, dg = off.sum(1), dg.sum(1)
    # The intra-chunk log-decay terms rowZ - colZ - V (= rowZ - w dw) from one float32 matrix: independent of
    # the rounding of the dx product.
    intra = rowZp.sum(1) - colZp.sum(1) - V

    gdec = chunk_decays(cs, doc, Q)  # (b, h, c)
    dg = dg[:, :, ::nb]  # (b, h, c)
    Vsum = V.reshape(b, h, nc, Q).sum(-1)
    last = (Vsum + gdec * dg)[..., None] * (jnp.arange(Q) == Q - 1)
    dcs = intra + off + last.reshape(b, h, L)
    dm = None if max_norm is None else jnp.sum(dm_parts, axis=(0, 2))
    return dx, dw, dcs, dB, dC, (dh0 if h0 is not None else None), dD, dm


def states(cfg, x, w, cs, B, h0, doc, max_norm):
    """Recomputes ``(states entering each chunk, final state, clip scales)`` for the backward pass."""
    outs = state_scan(cfg, x, B, cs, w, doc, h0, backward=False, max_norm=max_norm)
    return outs[0], outs[1], (outs[2] if max_norm is not None else None)
