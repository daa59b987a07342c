"""Loading a trained model with what its training says about it (for evaluation and fine-tuning).

Three kinds of checkpoint path (:func:`checkpoint_kind`):

* a ``train.py`` work directory: orbax checkpoints (:mod:`ssm_jax.checkpoint`) whose ``meta`` item holds
  the model config and the training config (:func:`load_model_from_workdir`);
* a ``from_pretrained`` directory: ``config.json`` and weights in the state-spaces or Hugging Face format
  (:func:`ssm_jax.convert.from_pretrained`), optionally with an ``ssm_jax_train.json`` training config
  beside them;
* ``"random"``: a randomly initialised model, for smoke tests.

:func:`load_model` returns a :class:`LoadedModel`: the model, its tokenizer, the training length
``T_train`` and the training data split, read from the training config where there is one, since
evaluation streams the same held-out documents the model never trained on. orbax and the tokenizers are
imported on first use, so that importing this module (``ssm_jax.train_lib`` re-exports
:func:`load_model_from_workdir`) stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging
from flax import nnx

from ssm_jax.model import Mamba2Config, Mamba2LM

__all__ = [
    "CHECKPOINT_KINDS",
    "PUBLIC_TRAIN_LEN",
    "LoadedModel",
    "checkpoint_kind",
    "resolve_step",
    "load_model_from_workdir",
    "tokenizer_name_for_vocab",
    "load_model",
]

CHECKPOINT_KINDS = ("workdir", "pretrained", "random")
PUBLIC_TRAIN_LEN = 2048  # the public Mamba-2 checkpoints were trained at 2K tokens
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_TRAIN_INFO = "ssm_jax_train.json"  # optional training config written next to exported models


def checkpoint_kind(path: str) -> str:
    """``"random"``, ``"pretrained"`` (config.json + weights) or ``"workdir"`` (a ``checkpoints/`` directory).

    Raises ``FileNotFoundError`` naming the path when it is none of them.
    """
    if path == "random":
        return "random"
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"checkpoint {path!r} is not a directory; accepted: a train.py work directory, "
            "a from_pretrained directory (config.json + weights) or 'random'"
        )
    if os.path.isfile(os.path.join(path, "config.json")) and any(os.path.isfile(os.path.join(path, w)) for w in _WEIGHT_FILES):
        return "pretrained"
    if os.path.isdir(os.path.join(path, "checkpoints")):  # ssm_jax.checkpoint.checkpoint_dir
        return "workdir"
    raise FileNotFoundError(
        f"checkpoint {path!r} holds neither checkpoints/ (a train.py work directory) nor "
        f"config.json with one of {', '.join(_WEIGHT_FILES)} (a from_pretrained directory)"
    )


def resolve_step(workdir: str, step: int) -> int:
    """The checkpoint step of a work directory that ``step`` names (-1: the latest); raises
    ``FileNotFoundError`` listing the saved steps when there is no such checkpoint."""
    from ssm_jax import checkpoint as ckpt_lib

    return int(ckpt_lib.read_meta(ckpt_lib.checkpoint_dir(workdir), None if step < 0 else step)["step"])


def _abstract_params(config: Mamba2Config) -> Tuple[Any, Any]:
    """``(graphdef, abstract pure-dict params)`` of a model, without allocating it."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def load_model_from_workdir(workdir: str, step: Optional[int] = None, *, dtype: Optional[str] = None):
    """Loads a model trained by ``train.py``: returns ``(Mamba2LM, config)``.

    ``step``: a checkpoint step (None or negative: the latest). ``config`` is the training config (an
    ``ml_collections.ConfigDict``; ``config.model`` reflects the model actually trained, and
    ``config.data.tokenizer`` names its tokenizer). ``dtype`` overrides the compute dtype. The
    parameters are placed on the default device.
    """
    from ssm_jax import checkpoint as ckpt_lib
    from ssm_jax.train_config import model_config_from

    directory = ckpt_lib.checkpoint_dir(workdir)
    meta = ckpt_lib.read_meta(directory, None if step is None or step < 0 else step)
    model_cfg = model_config_from(meta["model_config"])
    if dtype is not None:
        model_cfg = model_cfg.replace(dtype=dtype)
    graphdef, abstract = _abstract_params(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params, _ = ckpt_lib.restore_params(directory, abstract, meta["step"])
    model = nnx.merge(graphdef, params)
    config = meta.get("config")
    try:
        import ml_collections

        config = ml_collections.ConfigDict(config) if config is not None else None
    except ImportError:  # plain dict without ml_collections
        pass
    return model, config


def tokenizer_name_for_vocab(vocab_size: int) -> str:
    """``"byte"`` for byte-level vocabularies (257, padded 272), ``"neox"`` for GPT-NeoX sized ones."""
    if vocab_size <= 512:
        return "byte"
    if vocab_size >= 50277:
        return "neox"
    raise ValueError(f"cannot tell the tokenizer of a vocabulary of {vocab_size}; accepted: 'byte', 'neox'")


@dataclasses.dataclass
class LoadedModel:
    """A model with what evaluation needs to know about it."""

    model: Mamba2LM
    tokenizer: Any  # an ssm_jax.data tokenizer (encode / decode / eos_id / vocab_size)
    tokenizer_name: str  # "byte" | "neox"
    train_len: int  # T_train: the training sequence length (the window length under truncated BPTT)
    kind: str  # one of CHECKPOINT_KINDS
    path: str
    step: Optional[int]  # the checkpoint step of a work directory, else None
    data: Dict[str, Any]  # corpus, validation_fraction, split_seed, local_data_dir, local_name (when known)

    @property
    def config(self) -> Mamba2Config:
        return self.model.config

    def describe(self) -> Dict[str, Any]:
        """A JSON-ready description: where the model comes from, its sizes and its state size ``N_S``."""
        cfg = self.config
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
        return {
            "kind": self.kind,
            "path": self.path,
            "step": self.step,
            "tokenizer": self.tokenizer_name,
            "train_len": self.train_len,
            "state_size": cfg.state_size,
            "n_s_millions": cfg.state_size / 1e6,
            "params": params,
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "nheads": cfg.nheads,
            "headdim": cfg.headdim,
            "d_state": cfg.d_state,
            "vocab_size": cfg.vocab_size,
            "data": self.data,
        }


def _to_dict(tree: Any) -> Any:
    return tree.to_dict() if hasattr(tree, "to_dict") else tree


def _find(tree: Any, names: Sequence[str]) -> Any:
    """The first non-empty scalar stored under one of ``names`` in a nested dict (breadth-first), or None."""
    queue = [_to_dict(tree)]
    while queue:
        node = queue.pop(0)
        if not isinstance(node, Mapping):
            continue
        for name in names:
            if name in node and node[name] not in (None, "") and not isinstance(node[name], Mapping):
                return node[name]
        queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


_DATA_FIELDS = (
    ("corpus", ("corpus", "corpus_name")),
    ("validation_fraction", ("validation_fraction", "val_fraction")),
    ("split_seed", ("split_seed",)),
    ("local_data_dir", ("local_data_dir",)),
    ("local_name", ("local_name",)),
    ("tokens_dir", ("tokens_dir",)),
)


def load_model(
    path: str,
    *,
    step: int = -1,
    tokenizer: str = "",
    train_len: int = 0,
    dtype: str = "float32",
    random_model: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
) -> LoadedModel:
    """Loads the model at ``path`` (see the module docstring) with its tokenizer and training facts.

    Args:
      step: checkpoint step of a work directory (-1: the latest).
      tokenizer: ``"byte"`` / ``"neox"``; empty: from the training config, else from the vocabulary size.
      train_len: ``T_train``; 0: from the training config, else 2048 (the public checkpoints').
      dtype: compute dtype of a work directory's or a pretrained model.
      random_model: ``Mamba2Config`` fields of the ``"random"`` model, initialised from ``seed``.
    """
    from ssm_jax.data import get_tokenizer

    kind = checkpoint_kind(path)
    train_config, resolved_step = None, None
    if kind == "random":
        model = Mamba2LM(Mamba2Config(**dict(random_model or {})), rngs=nnx.Rngs(seed))
    elif kind == "pretrained":
        from ssm_jax.convert import from_pretrained

        model = from_pretrained(path, dtype=dtype)
        info = os.path.join(path, _TRAIN_INFO)
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                train_config = json.load(f)
    else:
        resolved_step = resolve_step(path, step)
        model, train_config = load_model_from_workdir(path, step=resolved_step, dtype=dtype)

    tree = _to_dict(train_config)
    data_tree = tree.get("data") if isinstance(tree, Mapping) else None

    def lookup(names: Sequence[str]) -> Any:  # the training config's `data` section first (train.py), then anywhere
        found = _find(data_tree, names)
        return found if found is not None else _find(tree, names)

    found_tok = lookup(("tokenizer", "tokenizer_name"))
    tok_name = tokenizer or (str(found_tok) if found_tok else "")
    if not tok_name:
        try:
            tok_name = tokenizer_name_for_vocab(model.config.vocab_size)
        except ValueError as e:
            raise ValueError(f"config.tokenizer='': {e}") from None
    if not train_len:
        found = lookup(("train_len", "seq_len", "seqlen", "sequence_length", "max_len"))
        if found:
            train_len = int(found)
            if lookup(("tbptt",)):
                logging.warning(
                    "%s was trained with truncated BPTT (state carried across windows): T_train = %d is "
                    "the window length, not the longest context seen",
                    path,
                    train_len,
                )
        else:
            train_len = PUBLIC_TRAIN_LEN
            logging.warning("training length unknown for %s: using %d (set config.train_len)", path, train_len)
    data = {key: value for key, names in _DATA_FIELDS if (value := lookup(names)) is not None}
    tok = get_tokenizer(tok_name)
    if tok.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"config.tokenizer={tok_name!r}: the tokenizer has {tok.vocab_size} ids but the model's "
            f"vocabulary is {model.config.padded_vocab_size}; accepted: byte, neox (one that fits)"
        )
    return LoadedModel(
        model=model, tokenizer=tok, tokenizer_name=tok_name, train_len=int(train_len), kind=kind, path=path, step=resolved_step, data=data
    )
