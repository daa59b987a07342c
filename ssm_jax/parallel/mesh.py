"""Device meshes, partition rules and multi-host initialisation for training.

Mesh axes (:data:`MESH_AXES`): ``"data"`` (pure data parallelism: parameters replicated), ``"fsdp"``
(fully sharded data parallelism: the batch is split over it too, and the large parameter and optimiser
arrays are sharded over it, gathered by XLA where needed) and ``"seq"`` (sequence / context parallelism,
:mod:`ssm_jax.parallel.sequence`; size 1 unless asked for). The batch dimension of every input is split
over :data:`BATCH_AXES` = ``("data", "fsdp")``.

Partition rules map a parameter's path (``"layers/3/mixer/in_proj/kernel"``; optimiser-state leaves keep
the parameter path as a suffix, e.g. ``"1/0/mu/layers/3/mixer/in_proj/kernel"``) and shape to a
``PartitionSpec``. A rule is ``(regex, spec)``: the first rule whose regex ``re.search``-es the path wins;
``spec`` is a ``PartitionSpec`` (used as is) or :data:`FSDP` (shard the largest dimension that the fsdp
axis size divides, when the array has at least ``min_fsdp_size`` elements; otherwise replicate).
The default rules replicate the small per-head / per-channel vectors and apply :data:`FSDP` to the rest.

Multi-host: :func:`initialize_distributed` wraps ``jax.distributed.initialize`` (from arguments or the
environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) and can select
the gloo CPU collectives so that several CPU processes on one machine form one JAX runtime.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "FSDP",
    "DEFAULT_RULES",
    "make_mesh",
    "data_parallel_size",
    "batch_spec",
    "batch_sharding",
    "replicated",
    "path_to_str",
    "partition_spec",
    "tree_partition_specs",
    "tree_shardings",
    "initialize_distributed",
]

MESH_AXES: Tuple[str, str, str] = ("data", "fsdp", "seq")
BATCH_AXES: Tuple[str, str] = ("data", "fsdp")


class _FsdpRule:
    """Marker: shard the largest fsdp-divisible dimension over ``"fsdp"`` (see the module docstring)."""

    def __repr__(self) -> str:
        return "FSDP"


FSDP = _FsdpRule()
Rule = Tuple[str, Union[P, _FsdpRule]]

DEFAULT_RULES: Tuple[Rule, ...] = (
    # Per-head / per-channel vectors: tiny, replicated.
    (r"(^|/)(A_log|D|dt_bias|conv_bias|bias|norm_weight|norm_f_weight)$", P()),
    # Everything else (embedding, in_proj / out_proj kernels, conv weights): FSDP when big enough.
    (r".*", FSDP),
)


def make_mesh(data: int = -1, fsdp: int = 1, seq: int = 1, *, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``("data", "fsdp", "seq")`` mesh over ``devices`` (default: all devices of all processes).

    One size may be -1 (only ``data`` by convention): it takes the remaining devices. The product of the
    sizes must equal the number of devices. ``seq`` is for sequence parallelism
    (:mod:`ssm_jax.parallel.sequence`).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "seq": seq}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}={size!r} must be a positive int (or -1: the remaining devices)")
    auto = [k for k, v in sizes.items() if v == -1]
    if len(auto) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {auto}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if auto:
        if n % fixed:
            raise ValueError(f"{n} devices are not divisible by the fixed mesh axes {sizes} (product {fixed})")
        sizes[auto[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(f"mesh sizes {sizes} (product {math.prod(sizes.values())}) != {n} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: GSPMD propagates the shardings of the jit inputs (explicit axes are jax.make_mesh's default).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (``data * fsdp``)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_spec(ndim: int = 2) -> P:
    """``PartitionSpec`` of a batch array: dim 0 over :data:`BATCH_AXES`, the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_to_str(path: Sequence[Any]) -> str:
    """``"a/b/0/c"`` from a jax key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], fsdp_size: int, min_fsdp_size: int) -> P:
    if fsdp_size <= 1 or len(shape) == 0 or math.prod(shape) < min_fsdp_size:
        return P()
    # Largest dimension first; ties: the later dimension (the output features of a kernel).
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True)
    for d in order:
        if shape[d] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def partition_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    min_fsdp_size: int = 2**12,
) -> P:
    """The ``PartitionSpec`` of one array (see the module docstring). Scalars are always replicated."""
    if len(shape) == 0:
        return P()
    fsdp_size = mesh.shape.get("fsdp", 1)
    for pattern, spec in rules:
        if re.search(pattern, path):
            if isinstance(spec, _FsdpRule):
                return _fsdp_spec(shape, fsdp_size, min_fsdp_size)
            _check_spec(path, shape, spec, mesh)
            return spec
    return P()


def _check_spec(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"partition rule {spec} for {path!r} has more entries than the array's rank {len(shape)}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % size:
            raise ValueError(f"partition rule {spec} for {path!r}: dimension {dim} is not divisible by {size}")


def tree_partition_specs(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *, min_fsdp_size: int = 2**12) -> Any:
    """A pytree of ``PartitionSpec`` matching ``tree`` (arrays or ``ShapeDtypeStruct`` leaves)."""

    def spec(path, leaf):
        return partition_spec(path_to_str(path), tuple(np.shape(leaf)), mesh, rules, min_fsdp_size=min_fsdp_size)

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES, *, min_fsdp_size: int = 2**12) -> Any:
    """A pytree of ``NamedSharding`` matching ``tree``."""
    specs = tree_partition_specs(tree, mesh, rules, min_fsdp_size=min_fsdp_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    local_device_ids: Optional[Sequence[int]] = None,
    cpu_collectives: Optional[str] = None,
    num_cpu_devices: Optional[int] = None,
    initialization_timeout: int = 300,
) -> bool:
    """Starts JAX's multi-controller runtime; returns whether it was started.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; when none of them is set either, ``jax.distributed.initialize()`` auto-detects the
    cluster (TPU pods, SLURM, Open MPI, ...). ``cpu_collectives`` ("gloo" or "mpi") selects the
    cross-process collectives of the CPU backend and ``num_cpu_devices`` the CPU devices per process;
    both must be set before the first JAX computation. Call once, before anything else uses JAX.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True
