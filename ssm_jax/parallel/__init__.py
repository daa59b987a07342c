"""Parallelism: device meshes and partition rules (``mesh``), and sequence (context) parallelism (``sequence``)."""
