"""Parallelism: device meshes and partition rules (``mesh``), and sequence (context) parallelism (``sequence``)."""

from ssm_jax.parallel.sequence import sequence_parallel_loss, sharded_apply, ssd_in_shard, ssd_sequence_parallel

__all__ = ["ssd_sequence_parallel", "ssd_in_shard", "sharded_apply", "sequence_parallel_loss"]
