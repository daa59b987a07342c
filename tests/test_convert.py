"""Public checkpoint formats load exactly: a random transformers Mamba2ForCausalLM is the reference."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import ssm_jax  # noqa: E402
from ssm_jax.convert import CheckpointError  # noqa: E402

VOCAB = 96  # already a multiple of 16, as Hugging Face configs store the padded size


def random_hf_model(tie: bool, groups: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8,
        n_groups=groups, expand=2, conv_kernel=4, chunk_size=16, tie_word_embeddings=tie,
    )
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # move every parameter away from its special init value (ones, zeros, aranges)
        for name, p in model.named_parameters():
            if "A_log" in name:
                p.copy_(torch.log(torch.rand_like(p) * 15 + 1))
            elif "dt_bias" in name:
                p.copy_(torch.randn_like(p) * 0.5 - 2.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def write_state_spaces(hf_model, directory: str, *, use_bin: bool = True, ssm_cfg=None, extra=None):
    """The same weights in the mamba_ssm layout: backbone.embedding.*, config with a partial ssm_cfg."""
    c = hf_model.config
    os.makedirs(directory, exist_ok=True)
    config = {
        "d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": VOCAB,
        "ssm_cfg": ssm_cfg if ssm_cfg is not None else {
            "layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim, "ngroups": c.n_groups,
            "chunk_size": c.chunk_size},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
        "tie_embeddings": bool(c.tie_word_embeddings), "attn_layer_idx": [], "d_intermediate": 0,
        **(extra or {}),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in hf_model.state_dict().items()}
    if use_bin:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        if c.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
    return directory


@pytest.mark.parametrize("tie,groups", [(False, 2), (True, 1)])
def test_hf_and_state_spaces_formats_give_the_same_logits(tmp_path, tie, groups):
    hf = random_hf_model(tie, groups)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 45))  # several chunks of 16, odd length
    want = torch_logits(hf, ids)
    hf.save_pretrained(tmp_path / "hf")
    model = ssm_jax.from_pretrained(str(tmp_path / "hf"), ssd_impl="xla")
    assert model.config.ngroups == groups and model.config.tie_embeddings == tie
    assert rel_err(model(jnp.asarray(ids)), want) < 1e-4
    for use_bin in (True, False):
        path = write_state_spaces(hf, str(tmp_path / f"ss_{use_bin}"), use_bin=use_bin)
        model = ssm_jax.from_pretrained(path, ssd_impl="xla")
        assert rel_err(model(jnp.asarray(ids)), want) < 1e-4


def test_export_reloads_in_transformers(tmp_path):
    hf = random_hf_model(tie=True)
    model = ssm_jax.from_pretrained(write_state_spaces(hf, str(tmp_path / "ss")), ssd_impl="xla")
    ssm_jax.save_hf(model, str(tmp_path / "export"))
    reloaded = transformers.Mamba2ForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 37))
    assert rel_err(np.asarray(model(jnp.asarray(ids))), torch_logits(reloaded, ids)) < 1e-4
    assert rel_err(torch_logits(reloaded, ids), torch_logits(hf, ids)) < 1e-5


def test_partial_ssm_cfg_takes_mamba2_defaults(tmp_path):
    raw = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"layer": "Mamba2"}}
    cfg = ssm_jax.convert.config_from_state_spaces(raw)
    assert (cfg.d_state, cfg.headdim, cfg.ngroups, cfg.chunk_size, cfg.d_conv, cfg.expand) == (128, 64, 1, 256, 4, 2)
    assert cfg.pad_vocab_size_multiple == 8 and cfg.padded_vocab_size == 104 and cfg.tie_embeddings


@pytest.mark.parametrize("ssm_cfg,extra,message", [
    ({}, None, "Mamba1"),
    ({"layer": "Mamba1"}, None, "Mamba-2"),
    ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, {"attn_layer_idx": [1]}, "attn_layer_idx"),
    ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, {"d_intermediate": 128}, "d_intermediate"),
    ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "norm_before_gate": True}, None,
     "norm_before_gate"),
])
def test_unsupported_layers_are_named(tmp_path, ssm_cfg, extra, message):
    path = write_state_spaces(random_hf_model(False), str(tmp_path / "ss"), ssm_cfg=ssm_cfg, extra=extra)
    with pytest.raises(CheckpointError, match=message):
        ssm_jax.from_pretrained(path)


def test_missing_files_and_bad_tensors_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ssm_jax.from_pretrained(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="config.json"):
        ssm_jax.from_pretrained(str(tmp_path / "empty"))
    hf = random_hf_model(False)
    hf.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing weights"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"))

    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    broken = dict(state)
    broken["backbone.layers.1.mixer.conv1d.weight"] = torch.zeros(10, 1, 4)
    save_file(broken, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.conv1d\.weight.*\(10, 1, 4\).*\(192, 1, 4\)"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"))
    missing = dict(state)
    del missing["backbone.layers.0.mixer.A_log"]
    save_file(missing, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor `backbone\.layers\.0\.mixer\.A_log`"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"))
    extra = dict(state)
    extra["backbone.layers.0.mixer.q_proj.weight"] = torch.zeros(4, 4)
    save_file(extra, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"))
