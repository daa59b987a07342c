"""Public checkpoint formats load exactly: a random transformers Mamba2ForCausalLM is the reference, and for the
mamba_ssm options transformers lacks (d_ssm, D_has_hdim, norm_before_gate) a float64 NumPy statement of
mamba_ssm's definition (tests/state_spaces_reference.py). Bad checkpoints raise CheckpointError naming the file."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import state_spaces_reference as ref  # noqa: E402

import ssm_jax  # noqa: E402
from ssm_jax import CheckpointError  # noqa: E402

VOCAB = 96  # already a multiple of 16, as Hugging Face configs store the padded size


def random_hf_model(tie: bool, groups: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        state_size=16,
        head_dim=16,
        num_heads=8,
        n_groups=groups,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
        tie_word_embeddings=tie,
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
        "d_model": c.hidden_size,
        "n_layer": c.num_hidden_layers,
        "vocab_size": VOCAB,
        "ssm_cfg": ssm_cfg
        if ssm_cfg is not None
        else {"layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim, "ngroups": c.n_groups, "chunk_size": c.chunk_size},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "attn_layer_idx": [],
        "d_intermediate": 0,
        **(extra or {}),
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf_model.state_dict().items()}
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
    # Older transformers wrote `norm_before_gate: true` and `rms_norm` (Codestral's config has them); transformers
    # ignores both (its mixer always gates before the norm), and so must we.
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "norm_before_gate": True, "rms_norm": False}))
    model = ssm_jax.from_pretrained(str(tmp_path / "hf"), ssd_impl="xla")
    assert not model.config.norm_before_gate and rel_err(model(jnp.asarray(ids)), want) < 1e-4
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


@pytest.mark.parametrize(
    "ssm_cfg,extra,message",
    [
        ({}, None, "Mamba1"),
        ({"layer": "Mamba1"}, None, "Mamba-2"),
        ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, {"attn_layer_idx": [1]}, "attn_layer_idx"),
        ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2}, {"d_intermediate": 128}, "d_intermediate"),
        ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "rmsnorm": False}, None, "rmsnorm"),
        ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "d_ssm": 100}, None, "d_ssm"),
    ],
)
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


# ---- mamba_ssm options transformers lacks: a float64 statement of mamba_ssm's definition is the reference ----

OPTIONS = {  # d_inner = 64, 2 groups; shapes shared between cases where they can be (fewer compilations)
    "D_has_hdim": dict(D_has_hdim=True),
    "norm_before_gate": dict(norm_before_gate=True),
    "d_ssm": dict(d_ssm=32),  # 32 SSM channels (4 heads) and 32 gated-MLP channels
    "all": dict(D_has_hdim=True, norm_before_gate=True, d_ssm=32),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_state_spaces_options_match_float64_reference(tmp_path, options):
    config = {
        "d_model": 32,
        "n_layer": 2,
        "vocab_size": 90,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8, **options},
    }
    weights = ref.random_weights(config, seed=len(options))
    path = ref.write_checkpoint(str(tmp_path / "ss"), config, weights)
    ids = np.random.default_rng(3).integers(0, 90, (2, 21))  # several chunks of 8, odd length
    model = ssm_jax.from_pretrained(path, ssd_impl="xla")
    for name, value in options.items():
        assert getattr(model.config, name) == value
    ours = np.asarray(model(jnp.asarray(ids)))
    assert rel_err(ours, ref.lm_logits(config, weights, ids)) < 1e-4
    without = ("D_has_hdim", "norm_before_gate")
    plain = {**config, "ssm_cfg": {k: v for k, v in config["ssm_cfg"].items() if k not in without}}
    if "d_ssm" not in options:  # the same weights read without the option give other logits: the option matters
        assert rel_err(ref.lm_logits(plain, {**weights, **_per_head_D(weights, options)}, ids), ref.lm_logits(config, weights, ids)) > 1e-3
    ssm_jax.save_state_spaces(model, str(tmp_path / "again"))  # every option survives our state-spaces export
    np.testing.assert_array_equal(np.asarray(ssm_jax.from_pretrained(str(tmp_path / "again"), ssd_impl="xla")(jnp.asarray(ids))), ours)
    with pytest.raises(ValueError, match="transformers' Mamba2 has no option.*save_state_spaces"):
        ssm_jax.save_hf(model, str(tmp_path / "hf"))


def _per_head_D(weights, options):
    """With D_has_hdim dropped, D must be one value per head: take each head's first channel."""
    if not options.get("D_has_hdim"):
        return {}
    return {k: v[::8] for k, v in weights.items() if k.endswith("mixer.D")}


# ---- weight files: shards, half precision, and every fault a CheckpointError naming the file ----


def test_sharded_and_half_precision_weights_load(tmp_path):
    hf = random_hf_model(tie=False, seed=1)
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 19))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    model = ssm_jax.from_pretrained(str(tmp_path / "sharded"), ssd_impl="xla")
    assert rel_err(model(jnp.asarray(ids)), torch_logits(hf, ids)) < 1e-4
    for dtype in (torch.bfloat16, torch.float16):
        half = random_hf_model(tie=False, seed=1).to(dtype)
        half.save_pretrained(tmp_path / str(dtype))
        model = ssm_jax.from_pretrained(str(tmp_path / str(dtype)), ssd_impl="xla")
        stored = half.backbone.layers[1].mixer.in_proj.weight.detach().float().numpy().T  # the half values, exactly
        np.testing.assert_array_equal(np.asarray(model.layers[1].mixer.in_proj.kernel[...]), stored)
        if dtype == torch.bfloat16:  # and the model they make computes what transformers computes with them
            assert rel_err(model(jnp.asarray(ids)), torch_logits(half.float(), ids)) < 1e-4


def test_corrupt_files_are_named(tmp_path):
    hf = random_hf_model(tie=True)
    hf.save_pretrained(tmp_path / "good")
    good = (tmp_path / "good" / "model.safetensors").read_bytes()
    config = (tmp_path / "good" / "config.json").read_text()

    def checkpoint(name, weights=good, config_text=config):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(config_text)
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        return str(tmp_path / name)

    with pytest.raises(CheckpointError, match=r"truncated/model\.safetensors is truncated: tensor `.*` needs bytes"):
        ssm_jax.from_pretrained(checkpoint("truncated", good[: len(good) - 1000]))
    with pytest.raises(CheckpointError, match=r"header/model\.safetensors: the header claims \d+ bytes"):
        ssm_jax.from_pretrained(checkpoint("header", good[:40]))
    with pytest.raises(CheckpointError, match=r"json/config\.json is not valid JSON"):
        ssm_jax.from_pretrained(checkpoint("json", config_text=config[: len(config) // 2]))
    with pytest.raises(CheckpointError, match=r"neither/config\.json: neither a state-spaces config"):
        ssm_jax.from_pretrained(checkpoint("neither", config_text='{"n_embd": 64, "n_layer": 2}'))
    with pytest.raises(CheckpointError, match=r"types/config\.json: d_state must be a positive int"):
        ssm_jax.from_pretrained(checkpoint("types", config_text=config.replace('"state_size": 16', '"state_size": "16"')))

    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    shards[-1].unlink()
    listed = r"\(a shard listed in model\.safetensors\.index\.json\)"
    with pytest.raises(CheckpointError, match=rf"missing file .*{shards[-1].name} {listed}"):
        ssm_jax.from_pretrained(str(tmp_path / "sharded"))


def test_dtype_arguments_take_every_form(tmp_path):
    hf = random_hf_model(tie=True)
    hf.save_pretrained(tmp_path / "hf")
    for dtype in ("bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16)):
        model = ssm_jax.from_pretrained(str(tmp_path / "hf"), dtype=dtype, param_dtype=np.dtype("float32"))
        assert (model.config.dtype, model.config.param_dtype) == ("bfloat16", "float32")
        assert model.embedding[...].dtype == jnp.float32
    model = ssm_jax.from_pretrained(str(tmp_path / "hf"), dtype=jnp.float16)
    assert model.config.param_dtype == "float16" and model.embedding[...].dtype == jnp.float16
    with pytest.raises(ValueError, match=r"`dtype` must be one of .* got 'int8'"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"), dtype="int8")
    with pytest.raises(ValueError, match=r"`param_dtype` must be one of .* got <class 'float'>"):
        ssm_jax.from_pretrained(str(tmp_path / "hf"), param_dtype=float)
