"""Pallas SSD kernels of ssm-jax (installed as ``ssm_jax.kernels``).

* :mod:`ssm_jax.kernels.ssd_common` -- the per-chunk mathematics shared by every launcher;
* :mod:`ssm_jax.kernels.ssd_gpu`    -- GPU launcher (plain ``pl.pallas_call`` lowered through Triton);
* :mod:`ssm_jax.kernels.ssd_tpu`    -- TPU launcher (Mosaic TPU);
* :mod:`ssm_jax.kernels.ssd_ops`    -- ``ssd_pallas``: custom_vjp wiring and backend dispatch.

Importing this package does not import Pallas; ``ssm_jax.kernels.ssd_ops`` does.
"""
