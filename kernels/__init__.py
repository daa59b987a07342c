"""Pallas SSD kernels of ssm-jax (installed as ``ssm_jax.kernels``). Imports run one way, from the bottom:

* :mod:`ssm_jax.kernels.ssd_reference`  -- the recurrence (the definition) and the accumulation dtype;
* :mod:`ssm_jax.kernels.support`        -- what the kernels accept (chunk, head and state sizes, dtypes, platforms);
* :mod:`ssm_jax.kernels.ssd_common`     -- the per-chunk mathematics shared by every launcher;
* :mod:`ssm_jax.kernels.config`         -- ``KernelConfig`` (tile and launch sizes) and the per-call ``Plan``;
* GPU launcher, by phase: :mod:`~ssm_jax.kernels.gpu_launch` (what its Triton kernels share),
  :mod:`~ssm_jax.kernels.gpu_prologue` (per-position scalars, ``C B^T``), :mod:`~ssm_jax.kernels.gpu_scan` (state
  scan and join), :mod:`~ssm_jax.kernels.gpu_state_norm` (the state pass with the state_norm clip),
  :mod:`~ssm_jax.kernels.gpu_output` (forward output, Triton), :mod:`~ssm_jax.kernels.ssd_mosaic_gpu` (forward
  output, Mosaic GPU on Hopper), :mod:`~ssm_jax.kernels.gpu_backward` (input gradients);
* :mod:`ssm_jax.kernels.ssd_tpu`        -- TPU launcher (Mosaic TPU);
* :mod:`ssm_jax.kernels.ssd_ops`        -- ``ssd_pallas``: the custom_vjp and the wiring of the GPU phases;
* :mod:`ssm_jax.kernels.ssd_stepwise`   -- the per-step recurrence in one kernel (exact per-step state_norm).

Nothing here imports ``ssm_jax.ssd``. Importing this package imports no module; ``ssd_reference`` and ``support``
import no Pallas module.
"""
