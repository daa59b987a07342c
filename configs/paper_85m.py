"""The paper's 84.6M from-scratch model (arXiv 2410.07145 section 5): 12 layers, d_model 768, 24 heads of dim 64.

python train.py --config=configs/paper_85m.py --workdir=/tmp/paper_85m --config.data.seq_len=2048
"""

from ssm_jax.train_config import paper_small_config


def get_config():
    return paper_small_config(d_model=768, n_layer=12)
