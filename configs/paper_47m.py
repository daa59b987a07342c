"""The paper's 47.0M from-scratch model (arXiv 2410.07145 section 5): 12 layers, d_model 512, 16 heads of dim 64.

python train.py --config=configs/paper_47m.py --workdir=/tmp/paper_47m --config.data.seq_len=2048
"""

from ssm_jax.train_config import paper_small_config


def get_config():
    return paper_small_config(d_model=512, n_layer=12)
