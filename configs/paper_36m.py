"""The paper's 36.4M from-scratch model (arXiv 2410.07145 section 5): 6 layers, d_model 512, 16 heads of dim 64.

python train.py --config=configs/paper_36m.py --workdir=/tmp/paper_36m --config.data.seq_len=2048
"""

from ssm_jax.train_config import paper_small_config


def get_config():
    return paper_small_config(d_model=512, n_layer=6)
