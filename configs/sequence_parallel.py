"""Sequence (context) parallelism: configs/default.py with every device on the mesh's "seq" axis.

Each device holds seq_len / num_devices consecutive tokens of every sequence; the SSD state and the conv
halo pass between devices (ssm_jax/parallel/sequence.py). On 2 GPUs:

    python train.py --config=configs/sequence_parallel.py --workdir=/tmp/run_seq

On a CPU, as 8 virtual devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py \
        --config=configs/sequence_parallel.py --workdir=/tmp/run_seq --config.train.num_steps=20 \
        --config.optim.warmup_steps=5

seq_len must be divisible by the number of devices on "seq" (with at least d_conv - 1 = 3 tokens per
device). To mix with data parallelism, set e.g. --config.mesh.data=2 --config.mesh.seq=4.
Not combinable with train.tbptt (the carried state would have to be sharded too).
"""

from ssm_jax.train_config import load_sibling_config


def get_config():
    config = load_sibling_config(__file__)
    config.mesh.update(data=1, fsdp=1, seq=-1)  # all devices split the sequence
    # 4x the default context; 4096 is divisible by 1, 2, 4, 8, 16 ... devices.
    config.data.update(seq_len=4096)
    config.train.update(batch_size=4, loss_chunk_size=1024)
    config.model.update(chunk_size=128)
    return config
