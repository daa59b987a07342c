"""Sequence (context) parallelism: the SSD scan and the Mamba-2 model with the sequence split over devices.

The sequence axis is split over one mesh axis (``seq_axis``); every device holds ``l_local = seqlen / D``
consecutive positions. Each shard

1. runs the ordinary chunked SSD (:func:`ssm_jax.ssd`, any ``impl``) on its positions from a zero state,
   which gives its outputs ``y0`` and its local final state ``S_j``;
2. summarises how an incoming state would pass through it: the decay
   ``T_j = exp(sum of log alpha over the shard)``, or 0 when a segment reset (packed documents) happens
   anywhere in the shard, including at its first position;
3. exchanges the summaries ``(T_j, S_j)`` with one ``all_gather`` (``D x batch x heads x headdim x state``
   floats, independent of the sequence length) and forms its true incoming state by the short recurrence
   ``h_in_0 = initial_state``, ``h_in_{j+1} = T_j h_in_j + S_j`` (every shard evaluates the D-step scan; it is
   tiny);
4. adds the contribution of that incoming state to its outputs explicitly,
   ``y_t += exp(sum_{s <= t} log alpha_s) * C_t . h_in`` for the positions before the shard's first reset.

Why an explicit correction rather than running the local SSD a second time from ``h_in``: the second run
would double the SSD cost of every layer; the correction is one ``(l, heads, state) x (heads, headdim,
state)`` contraction (the cost of the inter-chunk term of one SSD pass) plus a cumulative sum of the
log-decays. Steps 1 and 4 are linear in the state, so the result equals the single-device scan up to
rounding (test: float64 agreement to 1e-10). Everything is plain JAX inside ``jax.shard_map``;
gradients (every input, including the initial state) come from autodiff through the collectives.

Any ``impl`` of :func:`ssm_jax.ssd` runs inside the shards. Pallas kernels must declare how their outputs
vary over the mesh axes (``ShapeDtypeStruct(..., manual_axis_type=...)``) to run under
``shard_map(check_vma=True)``; until they do, ``impl="auto"`` falls back to "xla" in the shards with a
warning.

Mitigations: ``forget_more`` and ``dt_scale`` are transforms of the inputs and work unchanged.
``state_norm`` (a clip of the state at chunk boundaries, a nonlinear sequential operation) and
``sliding_window`` are not supported under sequence sharding and raise a ValueError naming them.

The model: the mixer's projections and norms are per token; the depthwise causal conv needs the previous
shard's last ``d_conv - 1`` raw columns (and, with packed documents, their segment ids), which
:func:`mixer_in_shard` fetches with one ``ppermute`` (shard 0 reads zeros, like the unsharded conv).

Public functions:
  * :func:`ssd_in_shard` -- the building block, called inside an enclosing ``shard_map``.
  * :func:`ssd_sequence_parallel` -- global arrays in, ``shard_map`` over ``mesh`` inside.
  * :func:`mixer_in_shard` -- what ``Mamba2Mixer(..., sequence_axis=...)`` runs.
  * :func:`sharded_apply`, :func:`sequence_parallel_loss` (with :func:`token_loss_sums`,
    :func:`chunked_lm_loss_sums`) -- model logits and the training loss with the sequence sharded.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.ssd import accumulation_dtype, document_ids, input_weight_and_log_decay, resolve_impl, ssd

Array = jax.Array

__all__ = [
    "ssd_in_shard",
    "ssd_sequence_parallel",
    "mixer_in_shard",
    "sharded_apply",
    "sequence_parallel_loss",
    "token_loss_sums",
    "chunked_lm_loss_sums",
    "check_mitigation",
]


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def check_mitigation(mitigation: Optional[mitigations_lib.Mitigation]) -> Optional[mitigations_lib.Mitigation]:
    """Resolves ``mitigation`` and raises a ValueError for the ones sequence sharding cannot run exactly."""
    mitigation = mitigations_lib.resolve(mitigation)
    if mitigation is None:
        return None
    if mitigation.max_norm is not None:
        raise ValueError(
            "sequence parallelism does not support the state_norm mitigation: it clips the state at chunk "
            "boundaries, a nonlinear sequential operation that the per-shard state passing cannot reproduce. "
            "Run state_norm unsharded (or streaming with ssm_jax.inference)."
        )
    if mitigation.window is not None:
        raise ValueError(
            "sequence parallelism does not support the sliding_window mitigation (the window would need the "
            "inputs of earlier shards). Run sliding_window unsharded (or streaming with ssm_jax.inference)."
        )
    return mitigation


def _precision(dtype) -> jax.lax.Precision:
    # Same policy as ssm_jax.ssd: float32 contractions must not drop to TF32 / bf16 passes.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT


def _from_previous_shard(a: Array, axis_name: str, num_shards: int) -> Array:
    """Shard ``j`` receives ``a`` of shard ``j - 1``; shard 0 receives zeros."""
    if num_shards == 1:
        return jnp.zeros_like(a)
    return jax.lax.ppermute(a, axis_name, perm=[(j, j + 1) for j in range(num_shards - 1)])


def _continues_previous_document(segment_ids: Array, axis_name: str, num_shards: int) -> Array:
    """``(batch, l_local)`` bool: position t still belongs to the document running at the shard start
    (no segment change in ``[start - 1, t]`` along the global sequence)."""
    shard = jax.lax.axis_index(axis_name)
    prev_last = _from_previous_shard(segment_ids[:, -1:], axis_name, num_shards)
    prev_last = jnp.where(shard == 0, segment_ids[:, :1], prev_last)  # shard 0: the initial state's document
    with_prev = jnp.concatenate([prev_last, segment_ids], axis=1)
    doc = document_ids(with_prev, with_prev.shape)[:, 1:]
    return doc == 0


def _vma(*arrays) -> frozenset:
    """The mesh axes any of ``arrays`` varies over (inside ``shard_map``)."""
    axes = frozenset()
    for a in arrays:
        if a is None:
            continue
        aval = jax.typeof(a)
        manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
        axes |= frozenset(manual.varying if manual is not None else getattr(aval, "vma", frozenset()))
    return axes


def _pvary(a: Array, axes: frozenset) -> Array:
    """Marks ``a`` as varying over ``axes`` (``lax.scan`` carries under shard_map must keep one type)."""
    missing = tuple(sorted(frozenset(axes) - _vma(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


# --------------------------------------------------------------------------------------------------
# SSD
# --------------------------------------------------------------------------------------------------


def ssd_in_shard(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    axis_name: str,
    D: Optional[Array] = None,
    chunk_size: int = 256,
    initial_state: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    impl: str = "auto",
) -> Tuple[Array, Array]:
    """The SSD of one sequence shard; call it inside ``shard_map`` with the sequence split over ``axis_name``.

    Arguments are those of :func:`ssm_jax.ssd` restricted to this shard's positions: ``x (b, l_local, h, p)``,
    ``dt (b, l_local, h)``, ``B, C (b, l_local, g, n)``, ``segment_ids (b, l_local)``; ``A``, ``D`` per head.
    ``initial_state (b, h, p, n)`` is the state before global position 0 (it must be the same on every shard
    of ``axis_name``; only shard 0's positions read it directly). Shards are ordered by
    ``lax.axis_index(axis_name)``.

    Returns:
      ``y_local`` shaped like ``x``: the outputs of this shard's positions of the global scan, and the
      global final state ``(b, h, p, n)`` (float32 / float64), identical on every shard (invariant over
      ``axis_name``).
    """
    mitigation = check_mitigation(mitigation)
    num_shards = jax.lax.axis_size(axis_name)
    shard = jax.lax.axis_index(axis_name)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc = accumulation_dtype(x.dtype)

    # 1. The local scan from a zero state (local resets are handled by ssd itself). The zero state is passed
    # explicitly, typed as varying over the mesh axes the inputs vary over, so that the scans inside ssd
    # keep one carry type under shard_map.
    varying = _vma(x, dt, A, B, C, D, segment_ids, initial_state) | {axis_name}
    zero_state = _pvary(jnp.zeros((b, h, p, n), acc), varying)
    y0, local_state = _local_ssd(
        x,
        dt,
        A,
        B,
        C,
        D=D,
        chunk_size=chunk_size,
        initial_state=zero_state,
        segment_ids=segment_ids,
        mitigation=mitigation,
        impl=impl,
    )
    local_state = local_state.astype(acc)

    # 2. How an incoming state decays through each position of the shard.
    _, log_a = input_weight_and_log_decay(dt, A, mitigation, acc)  # (b, l, h)
    log_cum = jnp.cumsum(log_a, axis=1)  # sum over [0, t]; <= 0, so exp never overflows
    weight = jnp.exp(log_cum)  # (b, l, h)
    if segment_ids is not None:
        keep = _continues_previous_document(segment_ids, axis_name, num_shards)  # (b, l)
        weight = jnp.where(keep[..., None], weight, 0.0)
    passes = weight[:, -1]  # (b, h): the decay of the whole shard, 0 if a reset happened in it

    # 3. Exchange the summaries and form each shard's incoming state.
    all_passes = jax.lax.all_gather(passes, axis_name)  # (D, b, h)
    all_states = jax.lax.all_gather(local_state, axis_name)  # (D, b, h, p, n)
    h0 = jnp.zeros((b, h, p, n), acc) if initial_state is None else initial_state.astype(acc)
    h0 = _pvary(h0, varying)

    def through_shard(state, summary):
        decay, local = summary
        return decay[..., None, None] * state + local, state

    _, entering = jax.lax.scan(through_shard, h0, (all_passes, all_states))  # entering[j]: state before shard j
    h_in = entering[shard]  # (b, h, p, n)
    h_out = passes[..., None, None] * h_in + local_state  # the state after this shard
    # The global final state is the last shard's; the psum makes it identical (invariant) on every shard.
    final_state = jax.lax.psum(jnp.where(shard == num_shards - 1, h_out, 0.0), axis_name)

    # 4. The incoming state's contribution to this shard's outputs.
    # Head h reads group h // (h / g): contract per group, never materialising C repeated over heads.
    correction = jnp.einsum("blgn,bgkpn->blgkp", C.astype(acc), h_in.reshape(b, g, h // g, p, n), precision=_precision(acc)).reshape(b, l, h, p)
    y = (y0.astype(acc) + weight[..., None] * correction).astype(x.dtype)
    return y, final_state


def _local_ssd(*args, impl: str, **kwargs):
    """:func:`ssm_jax.ssd` inside ``shard_map``.

    Pallas calls under ``shard_map(check_vma=True)`` need output shapes that state how they vary over the
    mesh axes. Kernels that do not state it fail while tracing; with ``impl="auto"`` this falls back to the
    XLA path with a warning (an explicit ``impl="pallas"`` raises).
    """
    resolved = resolve_impl(impl)
    if resolved != "pallas":
        return ssd(*args, impl=resolved, **kwargs)
    try:
        return ssd(*args, impl="pallas", **kwargs)
    except ValueError as e:
        if "manual_axis_type" not in str(e) and "vma" not in str(e):
            raise
        if impl == "pallas":
            raise ValueError(
                "the Pallas SSD kernels cannot run inside shard_map here: their pallas_call out_shape must carry "
                "the inputs' manual_axis_type (varying mesh axes). Use impl='xla' or 'auto'."
            ) from e
        warnings.warn(
            "ssm_jax.parallel.sequence: the Pallas SSD kernels do not support shard_map(check_vma=True) yet "
            f"({str(e).splitlines()[0][:120]}...); the sequence shards use impl='xla'.",
            RuntimeWarning,
            stacklevel=3,
        )
        return ssd(*args, impl="xla", **kwargs)


def _spec(batch_axis, seq_axis, ndim: int) -> P:
    return P(batch_axis, seq_axis, *([None] * (ndim - 2)))


def _has_explicit_axes(mesh: Mesh) -> bool:
    types = getattr(mesh, "axis_types", None) or ()
    return any(str(t).endswith("Explicit") for t in types)


def _place(a: Array, mesh: Mesh, spec: P) -> Array:
    """With an Explicit-axes mesh, shard_map needs its inputs already sharded as ``spec``."""
    if _has_explicit_axes(mesh):
        return jax.sharding.reshard(a, NamedSharding(mesh, spec))
    return a


def ssd_sequence_parallel(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    mesh: Mesh,
    seq_axis: str,
    batch_axis: Any = None,
    D: Optional[Array] = None,
    chunk_size: int = 256,
    initial_state: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    impl: str = "auto",
) -> Tuple[Array, Array]:
    """:func:`ssm_jax.ssd` with the sequence split over the devices of mesh axis ``seq_axis``.

    Takes global arrays (the arguments of :func:`ssm_jax.ssd`); ``seqlen`` must be divisible by the size of
    ``seq_axis``. ``batch_axis``: a mesh axis name (or tuple of names) that the batch is split over, or None
    (replicated over the other mesh axes). Returns ``y`` (global shape, sharded over ``seq_axis`` and
    ``batch_axis``) and the final state (replicated over ``seq_axis``). Exact up to rounding and
    differentiable in every array argument. Works under ``jax.jit``.
    """
    check_mitigation(mitigation)
    if x.ndim != 4:
        raise ValueError(f"ssd_sequence_parallel: `x` must be (batch, seqlen, heads, headdim), got {tuple(x.shape)}")
    num_shards = mesh.shape[seq_axis]
    if x.shape[1] % num_shards:
        raise ValueError(f"ssd_sequence_parallel: seqlen {x.shape[1]} is not divisible by the {num_shards} devices of mesh axis {seq_axis!r}")

    seq_args = {"x": x, "dt": dt, "B": B, "C": C}
    if segment_ids is not None:
        seq_args["segment_ids"] = segment_ids
    per_head = {"A": A}
    if D is not None:
        per_head["D"] = D
    batch_only = {}
    if initial_state is not None:
        batch_only["initial_state"] = initial_state

    seq_specs = {k: _spec(batch_axis, seq_axis, v.ndim) for k, v in seq_args.items()}
    head_specs = {k: P() for k in per_head}
    batch_specs = {k: P(batch_axis) for k in batch_only}
    in_specs = (seq_specs, head_specs, batch_specs)
    args = tuple({k: _place(v, mesh, specs[k]) for k, v in group.items()} for group, specs in zip((seq_args, per_head, batch_only), in_specs))

    def body(seq, heads, batch):
        return ssd_in_shard(
            seq["x"],
            seq["dt"],
            heads["A"],
            seq["B"],
            seq["C"],
            axis_name=seq_axis,
            D=heads.get("D"),
            chunk_size=chunk_size,
            initial_state=batch.get("initial_state"),
            segment_ids=seq.get("segment_ids"),
            mitigation=mitigation,
            impl=impl,
        )

    out_specs = (_spec(batch_axis, seq_axis, 4), P(batch_axis))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def mixer_in_shard(
    mixer,
    u: Array,
    segment_ids: Optional[Array],
    mitigation: Optional[mitigations_lib.Mitigation],
    impl: str,
    axis_name: str,
) -> Array:
    """One :class:`ssm_jax.model.Mamba2Mixer` on this device's sequence shard (inside ``shard_map``).

    ``u (b, l_local, d_model)``, ``segment_ids (b, l_local)`` or None. The causal conv reads the previous
    shard's last ``d_conv - 1`` raw columns (one ``ppermute``; shard 0 reads zeros) and, with packed
    documents, masks taps that reach into another document using the previous shard's segment ids.
    Returns ``(b, l_local, d_model)``.
    """
    cfg = mixer.config
    num_shards = jax.lax.axis_size(axis_name)
    shard = jax.lax.axis_index(axis_name)
    halo = cfg.d_conv - 1
    b, l = u.shape[:2]
    if num_shards > 1 and l < halo:
        raise ValueError(f"sequence sharding needs at least d_conv - 1 = {halo} positions per shard, got {l} (seqlen / {num_shards} devices)")

    z, xBC_raw, dt_raw = mixer.project(u)
    conv_prefix = None
    padded_doc = None
    if halo > 0:
        conv_prefix = _from_previous_shard(xBC_raw[:, l - halo :], axis_name, num_shards)
        if segment_ids is not None:
            prev_seg = _from_previous_shard(segment_ids[:, l - halo :], axis_name, num_shards)
            # Shard 0's prefix is zeros; give it the first document's id (as the unsharded conv does).
            prev_seg = jnp.where(shard == 0, jnp.broadcast_to(segment_ids[:, :1], prev_seg.shape), prev_seg)
            padded_seg = jnp.concatenate([prev_seg, segment_ids], axis=1)
            padded_doc = document_ids(padded_seg, padded_seg.shape)
    inputs = mixer.ssm_inputs_from_projection(z, xBC_raw, dt_raw, conv_prefix=conv_prefix, padded_doc=padded_doc)
    y, _ = ssd_in_shard(
        inputs.x,
        inputs.dt,
        inputs.A,
        inputs.B,
        inputs.C,
        axis_name=axis_name,
        D=mixer.D[...].astype(jnp.float32),
        chunk_size=cfg.chunk_size,
        segment_ids=segment_ids,
        mitigation=mitigation,
        impl=impl,
    )
    return mixer.output(y, inputs.z)


def _check_divisible(seqlen: int, mesh: Mesh, seq_axis: str, where: str) -> None:
    if seqlen % mesh.shape[seq_axis]:
        raise ValueError(f"{where}: seqlen {seqlen} is not divisible by the {mesh.shape[seq_axis]} devices of mesh axis {seq_axis!r}")


def sharded_apply(
    model,
    input_ids: Array,
    *,
    mesh: Mesh,
    seq_axis: str,
    batch_axis: Any = None,
    segment_ids: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    impl: Optional[str] = None,
) -> Array:
    """``model(input_ids, segment_ids=...)`` with the sequence split over mesh axis ``seq_axis``.

    ``model`` is a :class:`ssm_jax.model.Mamba2LM` (parameters replicated over the mesh). Returns the
    logits ``(batch, seqlen, padded_vocab)`` sharded over ``batch_axis`` and ``seq_axis``. Differentiable
    with ``nnx.grad`` / ``jax.grad`` of a function that calls it.
    """
    _check_divisible(input_ids.shape[1], mesh, seq_axis, "sharded_apply")
    graphdef, state = nnx.split(model)
    tokens_spec = P(batch_axis, seq_axis)
    seq = {"input_ids": _place(input_ids, mesh, tokens_spec)}
    if segment_ids is not None:
        seq["segment_ids"] = _place(segment_ids, mesh, tokens_spec)

    def body(state, seq):
        local_model = nnx.merge(graphdef, state)
        return local_model(seq["input_ids"], segment_ids=seq.get("segment_ids"), mitigation=mitigation, impl=impl, sequence_axis=seq_axis)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), {k: tokens_spec for k in seq}), out_specs=P(batch_axis, seq_axis, None))(state, seq)


def token_loss_sums(logits: Array, targets: Array, loss_mask: Optional[Array] = None, vocab_size: Optional[int] = None) -> Tuple[Array, Array]:
    """``(sum of masked next-token cross-entropy, sum of the mask)`` over the given positions, in float32.

    ``vocab_size``: logits of ids ``>= vocab_size`` (the vocabulary padding) are left out of the softmax,
    as in :mod:`ssm_jax.train_lib`.
    """
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and logits.shape[-1] > vocab_size:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -1e30)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = jnp.ones(log_z.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - picked) * mask), jnp.sum(mask)


def chunked_lm_loss_sums(model, hidden: Array, targets: Array, loss_mask: Optional[Array], *, chunk_size: int = 0) -> Tuple[Array, Array]:
    """:func:`token_loss_sums` of ``model``'s logits on ``hidden (b, l, d_model)`` (vocabulary padding excluded).

    With ``chunk_size > 0`` the logits are built ``chunk_size`` positions at a time inside a rematerialised
    scan, so the ``(b, l, vocab)`` float32 logits never exist at once (forward or backward).
    """
    vocab = model.config.vocab_size
    b, l = hidden.shape[:2]
    if loss_mask is None:
        loss_mask = jnp.ones((b, l), jnp.float32)
    if chunk_size <= 0 or chunk_size >= l:
        return token_loss_sums(model.logits_from_hidden(hidden), targets, loss_mask, vocab)
    head = model.embedding[...] if model.config.tie_embeddings else model.lm_head[...]

    @jax.checkpoint
    def piece(h, t, m):
        logits = jnp.einsum("bld,vd->blv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return token_loss_sums(logits, t, m, vocab)

    n_full = l // chunk_size
    main = n_full * chunk_size

    def split(a):
        return jnp.moveaxis(a[:, :main].reshape((b, n_full, chunk_size) + a.shape[2:]), 1, 0)

    def body(acc, xs):
        return tuple(x + y for x, y in zip(acc, piece(*xs))), None

    zero = _pvary(jnp.zeros((), jnp.float32), _vma(hidden, targets, loss_mask))
    acc, _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(loss_mask)))
    if main < l:
        acc = tuple(x + y for x, y in zip(acc, piece(hidden[:, main:], targets[:, main:], loss_mask[:, main:])))
    return acc


def sequence_parallel_loss(
    model,
    batch: Mapping[str, Array],
    *,
    mesh: Mesh,
    seq_axis: str,
    batch_axis: Any = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    impl: Optional[str] = None,
    loss_chunk_size: int = 0,
) -> Tuple[Array, Array]:
    """Mean next-token loss of ``model`` on ``batch`` with the sequence sharded over ``seq_axis``.

    ``batch`` holds global ``(batch, seqlen)`` arrays in the layout of :mod:`ssm_jax.data.pipeline`:
    ``inputs``, ``targets`` (the token after each input), optional ``segment_ids`` and ``loss_mask``.
    Each device computes the logits of its positions only (``loss_chunk_size`` > 0: that many positions at
    a time, see :func:`chunked_lm_loss_sums`), and the loss sums are ``psum``-ed over ``seq_axis`` (and
    ``batch_axis``). The vocabulary padding is left out of the softmax.

    Returns ``(loss, num_tokens)``: ``sum(mask * nll) / max(sum(mask), 1)`` and ``sum(mask)``, replicated.
    Use it inside ``jax.jit``; ``jax.grad`` / ``nnx.grad`` of it gives the gradients of the unsharded loss.
    """
    inputs = batch["inputs"]
    _check_divisible(inputs.shape[1], mesh, seq_axis, "sequence_parallel_loss")
    graphdef, state = nnx.split(model)
    tokens_spec = P(batch_axis, seq_axis)
    seq = {k: _place(batch[k], mesh, tokens_spec) for k in ("inputs", "targets", "segment_ids", "loss_mask") if batch.get(k) is not None}
    reduce_axes = (seq_axis,) + (() if batch_axis is None else tuple(_as_tuple(batch_axis)))

    def body(state, seq):
        local_model = nnx.merge(graphdef, state)
        hidden, _ = local_model.hidden_states(
            seq["inputs"], segment_ids=seq.get("segment_ids"), mitigation=mitigation, impl=impl, sequence_axis=seq_axis
        )
        total, count = chunked_lm_loss_sums(local_model, hidden, seq["targets"], seq.get("loss_mask"), chunk_size=loss_chunk_size)
        return jax.lax.psum(total, reduce_axes), jax.lax.psum(count, reduce_axes)

    total, count = jax.shard_map(body, mesh=mesh, in_specs=(P(), {k: tokens_spec for k in seq}), out_specs=(P(), P()))(state, seq)
    return total / jnp.maximum(count, 1.0), count


def _as_tuple(axis) -> Tuple[str, ...]:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
