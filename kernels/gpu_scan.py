"""GPU launcher, state scan and join: the state entering each chunk (forward) and the state gradients (backward).

:func:`state_scan` runs one program per (head, block of state rows, batch) and one loop over every (chunk, row
step), the state being the matrix-product accumulator: at a chunk's first step the state entering it is stored
(a masked store, no branch) and scaled by the chunk's decay, then each step adds its rows' share of the chunk's
local state. Triton pipelines the loads across chunk boundaries that way. The backward pass is the same loop in
reverse over ``(dy, C)`` (the state gradients).

With fewer programs than ``KernelConfig.scan_programs`` (few long sequences) each program scans runs of chunks
side by side (a fourth grid axis), each run from a zero state; :func:`run_entering` then gives the true state
entering each run as an exact float32 sum over the runs, and :func:`add_entering` (or the Triton output kernel,
``gpu_output``) completes each chunk's state. State normalisation is not linear, so it has its own pass
(``gpu_state_norm``).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import gpu_launch
from . import ssd_common as cm
from .config import Plan
from .gpu_launch import col, pltriton

MAX_RUNS = 64  # runs per sequence of a scan over runs of chunks (their join costs runs^2 state-sized products)

Join = Tuple[jax.Array, jax.Array, int]  # (entering (b, h, runs, p, n), decay (b, h, nc), chunks per run)


def rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, rows, cs_last, doc_last, backward, dots):
    """Rows ``r0 ... r0 + rows`` of one chunk: their share of its local state, forward ``(x o w o d)^T B``,
    backward ``(dy o e)^T C`` (``X = x`` or ``dy``, ``M = B`` or ``C``; ``doc_ref`` None without documents)."""
    cs = col(cs_ref[pl.ds(r0, rows)])
    doc = None if doc_ref is None else col(doc_ref[pl.ds(r0, rows)])
    if backward:
        coef = cm.decay_from_start(cs, doc)
    else:
        coef = col(w_ref[pl.ds(r0, rows)]) * cm.decay_to_end(cs, cs_last, doc, doc_last)
    return cm.chunk_state(X_ref[pl.ds(r0, rows), :], coef, M_ref[pl.ds(r0, rows), :], dots.bstate if backward else dots.state)


def _scan_kernel(*refs, Q, nc, backward, has_doc, has_init, dots, acc, sub, run):
    it = iter(refs)
    X_ref, M_ref, cs_ref = next(it), next(it), next(it)
    w_ref = None if backward else next(it)
    doc_ref = next(it) if has_doc else None
    init_ref = next(it) if has_init else None
    states_ref, final_ref = next(it), next(it)

    shape = final_ref.shape
    carry0 = init_ref[...].astype(acc) if has_init else jnp.zeros(shape, acc)
    lo, n_run = 0, nc  # the chunks [lo, lo + n_run) this program scans
    if run:  # a run of `run` chunks from a zero state (the initial state enters the first run only)
        seg = pl.program_id(3).astype(jax.dtypes.canonicalize_dtype(jnp.int64))  # the default int, as lo = 0
        lo = seg * run
        n_run = jnp.minimum(run, nc - lo)
        if has_init:
            carry0 = jnp.where(seg == (pl.num_programs(3) - 1 if backward else 0), carry0, 0.0).astype(acc)

    def part(r0, rows, cs_last, doc_last):
        return rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, rows, cs_last, doc_last, backward, dots)

    def chunk_ends(c):  # the last position's cumulative log-decay (and document) of chunk c
        last = c * Q + Q - 1
        return cs_ref[last], (doc_ref[last] if has_doc else None)

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


def state_scan(plan: Plan, X, M, cs, w, doc, init, *, backward: bool) -> Tuple[jax.Array, jax.Array, Optional[Join]]:
    """Sequential pass over chunks.

    Forward (``backward=False``): ``X = x (b, L, h, p)``, ``M = B (b, L, g, n)``, ``w`` the input weights; returns
    the states entering each chunk ``(b, h, c, p, n)`` in ``plan.state_dtype`` and the final state. Backward:
    ``X = dy``, ``M = C``, ``init = dfinal``, ``w`` unused; returns the gradients of the states leaving each chunk
    and the gradient of the initial state. ``cs (b, h, L)``, ``doc (b, L)`` or None, ``init (b, h, p, n)`` or None.

    Third result: None, or the ``join`` of a scan over runs of chunks, whose states are then run-local:
    :func:`add_entering` completes them (or the Triton output kernel does, reading the join).
    """
    b, L, h, p = X.shape
    g, n = M.shape[2], M.shape[3]
    k = h // g
    Q = plan.chunk
    nc = L // Q
    acc = plan.acc
    has_doc = doc is not None
    has_init = init is not None
    bp = min(p, plan.config.state_rows)
    npb = p // bp
    run = segment_run(nc, b * h * npb, plan.config.scan_programs)
    run = run if run < nc else 0  # one run: the plain scan over the whole sequence
    nseg = -(-nc // run) if run else 1
    grid = (h, npb, b, nseg) if run else (h, npb, b)

    out_shape = [
        jax.ShapeDtypeStruct((b, h, nc, p, n), plan.state_dtype),
        jax.ShapeDtypeStruct((b, h, nseg, p, n) if run else (b, h, p, n), acc),
    ]
    out_specs = [
        pl.BlockSpec((None, None, nc, bp, n), lambda hh, pb, bb, *s: (bb, hh, 0, pb, 0)),
        pl.BlockSpec((None, None, None, bp, n), lambda hh, pb, bb, s: (bb, hh, s, pb, 0))
        if run
        else pl.BlockSpec((None, None, bp, n), lambda hh, pb, bb: (bb, hh, pb, 0)),
    ]
    ins = [X, M, cs]
    in_specs = [
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
    if has_init:
        ins.append(init)
        in_specs.append(pl.BlockSpec((None, None, bp, n), lambda hh, pb, bb, *s: (bb, hh, pb, 0)))

    kernel = functools.partial(
        _scan_kernel,
        Q=Q,
        nc=nc,
        backward=backward,
        has_doc=has_doc,
        has_init=has_init,
        dots=plan.dots,
        acc=acc,
        sub=min(plan.config.scan_block, Q),
        run=run,
    )
    states, final = gpu_launch.call(
        kernel,
        plan,
        plan.config.scan,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="ssd_state_scan_bwd" if backward else "ssd_state_scan",
    )(*ins)
    if not run:
        return states, final, None
    entering, decay, final = run_entering(final, chunk_decays(cs, doc, Q), run, backward=backward)
    return states, final, (entering, decay, run)


def segment_run(nc: int, programs: int, wanted: int) -> int:
    """Chunks per run of the state scan: runs short enough for ``wanted`` programs in all (each of the
    ``programs`` (head, row block, batch) scans ``nc / run`` runs side by side), at least one chunk, at most
    ``MAX_RUNS`` runs; ``nc`` (one run) when there are programs enough."""
    runs = max(1, min(nc, MAX_RUNS, -(-wanted // programs)))
    return -(-nc // runs)


def run_entering(finals, gdec, run: int, *, backward: bool):
    """What the runs of chunks lacked: the true state entering each run and the decay from a run's start to each
    chunk.

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


def complete(states, join: Optional[Join]):
    """``states`` as they are, or completed with ``join`` (:func:`add_entering`)."""
    return states if join is None else add_entering(states, *join)


def chunk_decays(cs, doc, Q: int):
    """``g`` per chunk ``(b, h, c)``: the decay over the whole chunk, 0 if it contains a document change."""
    b, h, L = cs.shape
    last = cs.reshape(b, h, L // Q, Q)[..., -1]
    d_last = None if doc is None else doc.reshape(b, 1, L // Q, Q)[..., -1]
    return cm.chunk_decay(last, d_last)
